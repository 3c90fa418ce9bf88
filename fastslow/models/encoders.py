"""Image and text towers shared by the Fast and the Slow model, and what the image towers read.

The image tower returns feature maps at several scales (fine to coarse), so the dual encoder can
use the coarsest one and the cross-attention model can upsample it progressively, fusing the finer
ones (:mod:`fastslow.models.cross_attention`).

Two backbones: ``tiny`` (a :class:`ConvTower` trained from scratch on uint8 pixels) and
``pretrained`` (a :class:`FrozenFeatureTower` over EfficientNet-Lite0 features computed once,
:mod:`fastslow.features`). Both read a split's images through :func:`fastslow.inputs.model_input`:
a uint8 array of pixels, or :class:`~fastslow.inputs.FeatureImages` indexed like one.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fastslow.config import EncoderConfig
from fastslow.inputs import FEATURE_CHANNELS, FEATURE_STRIDES, PAD_ID, POOLED_DIM, FeatureImages, frames_per_item, is_clips, model_input

def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.GELU(),
    )


class ConvTower(nn.Module):
    """A small CNN: each stage halves the resolution; the last three stages' maps are returned.

    For 64x64 input the maps are 16x16, 8x8 and 4x4 (strides 4, 8, 16).
    """

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        stages = []
        previous = 3
        for i, width in enumerate(channels):
            layers = [_conv_block(previous, width, stride=2)]
            if i > 0:  # the stem stays single-conv: it runs at the highest resolution
                layers.append(_conv_block(width, width, stride=1))
            stages.append(nn.Sequential(*layers))
            previous = width
        self.stages = nn.ModuleList(stages)
        self.out_channels = tuple(channels[-3:])
        self.strides = tuple(2 ** (i + 1) for i in range(len(channels)))[-3:]

    def summary_dim(self, image_size: int) -> int:
        """Size of :meth:`summary`: the coarse map flattened."""
        return self.out_channels[-1] * (image_size // self.strides[-1]) ** 2

    def summary(self, images: torch.Tensor) -> torch.Tensor:
        """One vector per image for the dual encoder: the coarse map flattened. Flattening (rather
        than average pooling) keeps where things are, so the vector can encode spatial relations."""
        return self(images)[-1].flatten(1)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        x = images
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps[-3:]


class TextTransformer(nn.Module):
    """Token embeddings + learned positions + a pre-norm transformer encoder."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, max_tokens: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width, padding_idx=PAD_ID)
        self.position_embedding = nn.Parameter(torch.zeros(max_tokens, width))
        nn.init.normal_(self.position_embedding, std=0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True, norm_first=True, activation="gelu"
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.width = width

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` token ids (0 = padding) to ``(B, L, width)`` states."""
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.position_embedding[:length]
        x = self.encoder(x, src_key_padding_mask=tokens.eq(PAD_ID))
        return self.norm(x)


class FrozenFeatureTower(nn.Module):
    """The image tower of the ``pretrained`` backbone: it reads :class:`FeatureImages` computed once
    by the frozen EfficientNet-Lite0 (:mod:`fastslow.features`), so it has no weights of its own;
    the heads on top (projections, upsampler, decoders) are what trains."""

    def __init__(self, channels: tuple[int, ...], strides: tuple[int, ...], pooled_dim: int):
        super().__init__()
        self.out_channels, self.strides, self.pooled_dim = tuple(channels), tuple(strides), pooled_dim

    def summary_dim(self, image_size: int) -> int:
        return self.pooled_dim

    def summary(self, features: FeatureImages) -> torch.Tensor:
        """The backbone's pooled head features: what it was trained to classify from."""
        return features.pooled

    def forward(self, features: FeatureImages) -> list[torch.Tensor]:
        return features.maps


def build_image_tower(config: EncoderConfig) -> ConvTower | FrozenFeatureTower:
    if config.backbone == "pretrained":
        return FrozenFeatureTower(FEATURE_CHANNELS, FEATURE_STRIDES, POOLED_DIM)
    if config.backbone != "tiny":
        raise ValueError(f"unknown backbone {config.backbone!r}")
    return ConvTower(config.channels)


# Frozen maps are kept in float32 in memory (rounding them would change the trained model); past
# this size a Slow model reads pixels instead (a COCO-size split would need tens of GB).
FROZEN_MAPS_MAX_BYTES = 4 * 2**30


@torch.no_grad()
def frozen_tower_maps(
    tower: ConvTower, images: np.ndarray, batch_size: int = 256, max_bytes: int = FROZEN_MAPS_MAX_BYTES
) -> FeatureImages | None:
    """A frozen ``tiny`` tower's maps of uint8 images or clips, computed once on the tower's device
    in batches of about ``batch_size`` frames and kept on the CPU (each batch moves them to where
    the model trains): what a Slow model that keeps the tower frozen reads every epoch instead of
    pixels (on ``shapes-video`` the tower was a third of a training step). None when they would
    take more than ``max_bytes``.

    The tower runs in evaluation mode, as a frozen one trains. Its output for an image does not
    depend on the batch around it from 64 frames a batch up (measured bit for bit on the CPU; it
    does at 1 or 7), so a model trained on these maps is the one trained on the pixels."""
    height, width = images.shape[-3:-1]
    per_frame = sum(c * -(-height // s) * -(-width // s) for c, s in zip(tower.out_channels, tower.strides))
    if 4 * per_frame * frames_per_item(images) * len(images) > max_bytes:
        return None
    was_training = tower.training
    tower.eval()
    clips = is_clips(images)
    step = max(1, batch_size // frames_per_item(images))
    chunks = []
    device = next(tower.parameters()).device
    for start in range(0, len(images), step):
        batch = model_input(images[start : start + step], device)
        maps = tower(batch.flatten(0, 1) if clips else batch)
        chunks.append([(m.unflatten(0, batch.shape[:2]) if clips else m).cpu() for m in maps])
    tower.train(was_training)
    finest = chunks[0][0].flatten(0, 1) if clips else chunks[0][0]
    # Pixels reach the tower channels-last (images_to_tensor moves the channel axis), and so leave it.
    layout = torch.channels_last if finest.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return FeatureImages([torch.cat(scale) for scale in zip(*chunks)], memory_format=layout)
