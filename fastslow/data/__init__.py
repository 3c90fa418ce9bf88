"""Datasets of the study: every one arrives as ``{"train", "val", "test"}`` :class:`CaptionedImages`."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastslow.cache import load_or_build
from fastslow.config import GENERATED_DATASETS, VIDEO_DATASETS, DataConfig
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
REAL_VIDEO_DATASETS = tuple(d for d in VIDEO_DATASETS if d not in GENERATED_DATASETS)


def files_fingerprint(data_dir: str | None) -> str:
    """A digest of every file's path, size and modification time under ``data_dir`` (a hub name
    that is not a local folder digests as itself): what a cached decoding must still match."""
    root = Path(data_dir or "")
    if not data_dir or not root.exists():
        return str(data_dir)
    entries = sorted(
        f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}"
        for path in root.rglob("*")
        if path.is_file() and (stat := path.stat())
    )
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


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
        # small; a split smaller than its cap is used whole. Decoding thousands of photographs takes
        # longer than reading them back, and every notebook loads them: the decoded splits are cached,
        # keyed by the files they come from.
        # "splits" names the split rule, so splits cached under an older rule are never reused.
        key = {"data": config, "files": files_fingerprint(config.data_dir), "splits": "validation-carved-from-train"}
        return load_or_build(
            "dataset", key,
            lambda: load_real_dataset(config.dataset, config.data_dir, config.image_size, split_caps(config), config.seed),
            to_stored=_splits_as_tensors, from_stored=_splits_from_tensors,
        )
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
    if config.dataset in REAL_VIDEO_DATASETS:
        # The profile's split sizes cap the clips read: the first ones of each split's captions file.
        root = Path(config.data_dir or "")
        return {
            split: load_video_captions(root, split, config.frames, config.image_size, max_clips=cap)
            for split, cap in split_caps(config).items()
        }
    raise ValueError(f"dataset {config.dataset!r} has no loader yet")


def _splits_as_tensors(splits: dict[str, CaptionedImages]) -> dict[str, dict[str, Any]]:
    """Each split's fields with its arrays as tensors: the cache loads with ``weights_only=True``,
    which refuses numpy arrays."""
    return {
        name: {f.name: _tensor_if_array(getattr(split, f.name)) for f in dataclasses.fields(split)}
        for name, split in splits.items()
    }


def _splits_from_tensors(stored: dict[str, dict[str, Any]]) -> dict[str, CaptionedImages]:
    return {
        name: CaptionedImages(**{k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in fields.items()})
        for name, fields in stored.items()
    }


def _tensor_if_array(value: Any) -> Any:
    return torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
