"""Datasets of the study: every one arrives as ``{"train", "val", "test"}`` :class:`CaptionedImages`."""

from __future__ import annotations

import functools
from pathlib import Path

from fastslow.config import DataConfig
from fastslow.data.folder import load_image_folder
from fastslow.data.real import REAL_DATASETS, load_real_dataset
from fastslow.data.shapes import make_shapes
from fastslow.data.text import WordTokenizer
from fastslow.data.types import CaptionedImages, CaptionedVideos
from fastslow.data.video import make_shapes_video
from fastslow.data.video_folder import load_video_captions

__all__ = [
    "CaptionedImages",
    "CaptionedVideos",
    "WordTokenizer",
    "load_dataset",
    "load_image_folder",
    "load_real_dataset",
    "load_video_captions",
    "make_shapes",
    "make_shapes_video",
]

# Real captioned clips (VATEX or MSR-VTT layout, see fastslow.data.video_folder).
VIDEO_DATASETS = ("vatex", "msrvtt")


def split_caps(config: DataConfig) -> dict[str, int]:
    """The profile's size of each split: the number generated, or at most the number read."""
    return {"train": config.n_train, "val": config.n_val, "test": config.n_test}


@functools.lru_cache(maxsize=4)
def load_dataset(config: DataConfig) -> dict[str, CaptionedImages]:
    """The splits ``config`` names (cached in memory: notebooks ask for them several times)."""
    if config.dataset == "shapes":
        return make_shapes(
            config.n_train,
            config.n_val,
            config.n_test,
            image_size=config.image_size,
            captions_per_image=config.captions_per_image,
            seed=config.seed,
        )
    if config.dataset == "folder":
        root = Path(config.data_dir or "")
        return {split: load_image_folder(root, split, config.image_size) for split in ("train", "val", "test")}
    if config.dataset in REAL_DATASETS:
        # The profile's split sizes cap the real splits (a seeded subset), so smoke and quick runs stay
        # small; a split smaller than its cap is used whole.
        return load_real_dataset(config.dataset, config.data_dir, config.image_size, split_caps(config), config.seed)
    if config.dataset == "shapes-video":
        return make_shapes_video(
            config.n_train,
            config.n_val,
            config.n_test,
            frames=config.frames,
            image_size=config.image_size,
            captions_per_clip=config.captions_per_image,
            seed=config.seed,
        )
    if config.dataset in VIDEO_DATASETS:
        # The profile's split sizes cap the clips read: the first ones of each split's captions file.
        root = Path(config.data_dir or "")
        return {
            split: load_video_captions(root, split, config.frames, config.image_size, max_clips=cap)
            for split, cap in split_caps(config).items()
        }
    raise ValueError(f"dataset {config.dataset!r} has no loader yet")
