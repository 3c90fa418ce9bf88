"""The Fast model: image and text embedded independently, compared by a dot product.

Embeddings are L2-normalised, so a FAISS inner-product index over image embeddings answers a
caption query by nearest-neighbour search (:mod:`fastslow.index`).

Clips ``(B, T, 3, H, W)`` go through the same image tower and projection frame by frame (time
folded into the batch), and :class:`TemporalPooling` turns the T frame embeddings into one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastslow.config import TEMPORAL_POOLINGS, DualEncoderConfig
from fastslow.distributed import gather_rows
from fastslow.inputs import FeatureImages, frames_per_item, model_input, text_input
from fastslow.models.encoders import TextTransformer, build_image_tower


class TemporalPooling(nn.Module):
    """``(B, T, E)`` frame embeddings to ``(B, E)``: their mean, or for ``transformer`` their mean
    after one pre-norm self-attention layer over the frames with learned time positions (so a clip
    and the same frames in another order embed differently)."""

    def __init__(self, kind: str, width: int, frames: int, heads: int):
        super().__init__()
        if kind not in TEMPORAL_POOLINGS:
            raise ValueError(f"unknown temporal pooling {kind!r}; choose one of {', '.join(TEMPORAL_POOLINGS)}")
        self.kind = kind
        if kind == "transformer":
            self.time_embedding = nn.Parameter(torch.zeros(frames, width))
            nn.init.normal_(self.time_embedding, std=0.02)
            self.layer = nn.TransformerEncoderLayer(
                width, heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True, norm_first=True, activation="gelu"
            )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if self.kind == "transformer":
            if frames.shape[1] > len(self.time_embedding):
                raise ValueError(f"clips of {frames.shape[1]} frames; the model was built for at most {len(self.time_embedding)}")
            frames = self.layer(frames + self.time_embedding[: frames.shape[1]])
        return frames.mean(1)


class DualEncoder(nn.Module):
    """``frames``: frames per clip the temporal pooling is built for (1 for images, which skip it)."""

    def __init__(self, vocab_size: int, config: DualEncoderConfig, image_size: int, frames: int = 1):
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
        # Built last, so an image model's weights draw the same random numbers as before clips existed.
        self.temporal_pooling = TemporalPooling(config.temporal, config.embed_dim, frames, enc.heads)

    @property
    def logit_scale(self) -> torch.Tensor:
        # Clamped as in CLIP: an unbounded scale destabilises training.
        return self.log_inv_temperature.clamp(max=math.log(100.0)).exp()

    def encode_images(self, images: torch.Tensor | FeatureImages) -> torch.Tensor:
        """Normalised ``(B, 3, H, W)`` images, ``(B, T, 3, H, W)`` clips or frozen image features to
        unit ``(B, E)`` embeddings."""
        if isinstance(images, torch.Tensor) and images.ndim == 5:
            frames = self.image_projection(self.image_tower.summary(images.flatten(0, 1)))
            return F.normalize(self.temporal_pooling(frames.view(*images.shape[:2], -1)), dim=-1)
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
        """Scaled similarity logits ``(texts, images)`` of a batch of matched pairs; when several
        ranks train, of the global batch (every rank's pairs, :func:`fastslow.distributed.gather_rows`),
        so each caption meets the whole batch's images as negatives."""
        texts, images = gather_rows(self.encode_texts(texts)), gather_rows(self.encode_images(images))
        return self.logit_scale * texts @ images.T


@torch.no_grad()
def embed_images(model: DualEncoder, images: np.ndarray | FeatureImages, device: str = "cpu", batch_size: int = 512) -> torch.Tensor:
    """L2-normalised embeddings of uint8 images or clips (or frozen image features), computed in
    batches of about ``batch_size`` frames (returned on the CPU)."""
    model.eval()
    batch_size = max(1, batch_size // frames_per_item(images))
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
