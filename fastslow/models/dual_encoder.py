"""The Fast model: image and text embedded independently, compared by a dot product.

Embeddings are L2-normalised, so a FAISS inner-product index over image embeddings answers a
caption query by nearest-neighbour search (:mod:`fastslow.index`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastslow.config import DualEncoderConfig
from fastslow.models.encoders import FeatureImages, TextTransformer, build_image_tower, model_input, text_input


class DualEncoder(nn.Module):
    def __init__(self, vocab_size: int, config: DualEncoderConfig, image_size: int):
        super().__init__()
        enc = config.encoder
        self.image_tower = build_image_tower(enc)
        # Flatten is a no-op on the tower's summary vector; it keeps the checkpoints' key names.
        self.image_projection = nn.Sequential(
            nn.Flatten(),
            nn.Linear(self.image_tower.summary_dim(image_size), 2 * config.embed_dim),
            nn.GELU(),
            nn.Linear(2 * config.embed_dim, config.embed_dim),
        )
        if enc.backbone == "pretrained":
            # The frozen sentence embedding (fastslow.features) is the text tower's output.
            self.text_tower = None
            self.text_projection = nn.Sequential(
                nn.Linear(enc.pretrained_text_width, 2 * config.embed_dim), nn.GELU(), nn.Linear(2 * config.embed_dim, config.embed_dim)
            )
        else:
            self.text_tower = TextTransformer(vocab_size, enc.text_width, enc.text_layers, enc.heads, enc.max_caption_tokens)
            self.text_projection = nn.Linear(enc.text_width, config.embed_dim)
        self.log_inv_temperature = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))

    @property
    def logit_scale(self) -> torch.Tensor:
        # Clamped as in CLIP: an unbounded scale destabilises training.
        return self.log_inv_temperature.clamp(max=math.log(100.0)).exp()

    def encode_images(self, images: torch.Tensor | FeatureImages) -> torch.Tensor:
        return F.normalize(self.image_projection(self.image_tower.summary(images)), dim=-1)

    def encode_texts(self, texts: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, L)`` (tiny backbone) or frozen sentence features ``(B, D)`` (pretrained)."""
        if self.text_tower is None:
            return F.normalize(self.text_projection(texts), dim=-1)
        states = self.text_tower(texts)
        mask = texts.ne(0).unsqueeze(-1).float()
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def forward(self, images: torch.Tensor | FeatureImages, texts: torch.Tensor) -> torch.Tensor:
        """Scaled similarity logits ``(texts, images)`` of a batch of matched pairs."""
        return self.logit_scale * self.encode_texts(texts) @ self.encode_images(images).T


@torch.no_grad()
def embed_images(model: DualEncoder, images: np.ndarray | FeatureImages, device: str = "cpu", batch_size: int = 512) -> torch.Tensor:
    """L2-normalised embeddings of uint8 images (or their frozen features), in batches (returned on the CPU)."""
    model.eval()
    chunks = [
        model.encode_images(model_input(images[i : i + batch_size], device)).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


@torch.no_grad()
def embed_texts(model: DualEncoder, texts: torch.Tensor, device: str = "cpu", batch_size: int = 1024) -> torch.Tensor:
    """L2-normalised embeddings of captions (token ids, or frozen sentence features), in batches
    (returned on the CPU)."""
    model.eval()
    chunks = [
        model.encode_texts(text_input(texts[i : i + batch_size]).to(device)).cpu()
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(chunks)
