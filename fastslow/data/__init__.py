"""Datasets of the study: every one arrives as ``{"train", "val", "test"}`` :class:`CaptionedImages`."""

from __future__ import annotations

import functools
from pathlib import Path

from fastslow.config import DataConfig
from fastslow.data.folder import load_image_folder
from fastslow.data.shapes import make_shapes
from fastslow.data.text import WordTokenizer
from fastslow.data.types import CaptionedImages

__all__ = ["CaptionedImages", "WordTokenizer", "load_dataset", "load_image_folder", "make_shapes"]


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
    raise ValueError(f"dataset {config.dataset!r} has no loader yet")
