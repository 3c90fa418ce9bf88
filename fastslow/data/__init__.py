"""Datasets of the study: every one arrives as ``{"train", "val", "test"}`` :class:`CaptionedImages`."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
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
from fastslow.files import file_sha256

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


# Files the loaders read whole (captions, split lists, metadata): hashed whole, so any edit shows.
TEXT_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".tsv")
# Any other file (an image, a clip, a frame) is known by its size, modification time and the hash of
# this many bytes at its start, middle and end: enough to tell one photograph from another of the
# same size, at a few reads per file. A file no longer than the three samples is hashed whole.
SAMPLE_BYTES = 4096


def data_key(config: DataConfig) -> dict[str, Any]:
    """What a cache key holds of the data an artifact was made from: its config, and for data read
    from ``data_dir`` the fingerprint of the files there (:func:`files_key`). Every stage that
    depends on the data keys on this, or on the key of a stage that does."""
    return {"data": config, **files_key(config.data_dir)}


def files_key(data_dir: str | None) -> dict[str, str]:
    """``{"files": fingerprint}`` of the data under ``data_dir`` (:func:`files_fingerprint`);
    nothing for generated data (no ``data_dir``), which is a function of its config."""
    return {"files": files_fingerprint(data_dir)} if data_dir else {}


@functools.lru_cache(maxsize=16)
def files_fingerprint(data_dir: str) -> str:
    """A digest of the data under ``data_dir``: each file's path, with the hash of its content
    (captions and lists, :data:`TEXT_SUFFIXES`) or its size and sampled hash (images and clips,
    :data:`SAMPLE_BYTES`). Symlinked files and folders are followed. Modification times are left
    out: a copy of the same data (a fresh checkout of a shared folder, a copy without ``-p``)
    keeps its cache, where with them every session's fresh copy of Flickr8k retrained the study
    (23 min on 2 cores); an edit that keeps a file's size and every sampled block is the price. A
    ``data_dir`` that is a file (a Karpathy JSON) stands for its folder, where its images are; a hub
    name that is not a local path digests as itself.

    Computed once per ``data_dir`` in a process (every stage key asks for it): data changed while a
    process runs is seen by the next one, as :func:`load_dataset`'s in-memory splits are.
    """
    root = Path(data_dir)
    if not root.exists():
        return data_dir
    if root.is_file():
        root = root.parent
    digest = hashlib.sha256()
    for relative, path in _data_files(root):
        digest.update(f"{relative}:{_file_fingerprint(path)}\n".encode())
    return digest.hexdigest()[:16]


def _data_files(root: Path) -> list[tuple[str, Path]]:
    """Every file under ``root`` as (path relative to ``root``, path), in a fixed order, through
    symlinked folders too (each real folder once, so a link to a folder above cannot loop)."""
    found = []
    seen_folders = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen_folders:
            subfolders.clear()
            continue
        seen_folders.add((stat.st_dev, stat.st_ino))
        found += [(str(Path(folder, name).relative_to(root)), Path(folder, name)) for name in names]
    return sorted(found)


def _file_fingerprint(path: Path) -> str:
    """What identifies one file's content: see :func:`files_fingerprint`. A broken link or a file
    that vanished reads as missing (the loader reports it, if it needs it)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return "missing"
    if path.suffix.lower() in TEXT_SUFFIXES or stat.st_size <= 3 * SAMPLE_BYTES:
        return file_sha256(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for offset in (0, (stat.st_size - SAMPLE_BYTES) // 2, stat.st_size - SAMPLE_BYTES):
            handle.seek(offset)
            digest.update(handle.read(SAMPLE_BYTES))
    return f"{stat.st_size}:{digest.hexdigest()}"


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
        key = {**data_key(config), "splits": "validation-carved-from-train"}
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
