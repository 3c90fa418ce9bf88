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

import torch
from torch import nn

from fastslow.config import EncoderConfig
from fastslow.inputs import FEATURE_CHANNELS, FEATURE_STRIDES, PAD_ID, POOLED_DIM, FeatureImages

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
