"""Real captioned images from a folder in the Hugging Face ``datasets`` "imagefolder" layout.

``root/<split>/metadata.jsonl`` (or ``metadata.csv``) has a ``file_name`` column, relative to the split
folder, and the captions in a ``text``, ``caption`` or ``captions`` column: a string or a list of
strings. Several rows may name the same file; their captions are grouped. Unreadable or missing
images are skipped, listed in ``skipped`` and logged, never dropped silently.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fastslow.data.types import SPLITS, CaptionedImages
from fastslow.files import read_lines, read_text

log = logging.getLogger(__name__)

# What an image can be read from: a file path, or the encoded bytes (as HF `datasets` stores them).
ImageSource = str | Path | bytes

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("text", "caption", "captions")
# The folder names each split may have on disk (HF datasets writes "validation").
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}


def load_image_folder(
    root: str | Path, split: str, image_size: int, dataset: str | None = None
) -> CaptionedImages:
    """Load one split, resizing every image to ``image_size`` x ``image_size`` RGB uint8 (bicubic).

    ``dataset`` names the result; by default the name of ``root``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    if root.is_file():
        raise NotADirectoryError(f"dataset folder is a file, not a folder: {root}")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    split_dir = _split_folder(root, split)
    metadata_path = _metadata_file(split_dir)
    rows = _read_rows(metadata_path)
    file_names, captions_by_file = _group_captions(rows, metadata_path)

    sources = [split_dir / file_name for file_name in file_names]
    desc = f"{dataset or root.name}/{split}"
    images, kept, skipped = read_resized_images(sources, image_size, where=str(split_dir), desc=desc)
    loaded = [file_names[i] for i in kept]
    return real_captioned_images(
        dataset or root.name, split, images, loaded, [captions_by_file[name] for name in loaded], skipped
    )


def read_resized_images(
    sources: Sequence[ImageSource],
    image_size: int,
    where: str,
    names: Sequence[str] | None = None,
    desc: str | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode and resize images to ``image_size`` x ``image_size`` RGB uint8 (bicubic, aspect not kept).

    ``sources`` are file paths or encoded bytes. Returns the readable images, their positions in
    ``sources``, and the ``names`` (default: the paths) of the ones skipped as missing or unreadable,
    which are logged as a warning: a real dataset with a few broken files still loads, never silently.
    Raises ``ValueError`` naming ``desc`` (the split, e.g. ``flickr8k/train``; it also labels the progress
    bar) and ``where`` when no image is readable.
    """
    if names is None:
        names = [f"<bytes #{i}>" if isinstance(s, bytes) else str(s) for i, s in enumerate(sources)]
    images = np.empty((len(sources), image_size, image_size, 3), dtype=np.uint8)
    kept: list[int] = []
    skipped: list[str] = []
    for position, source in enumerate(tqdm(sources, desc=desc or where, unit="image")):
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                resized = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            # OSError covers missing files and PIL's UnidentifiedImageError; truncated or malformed
            # files can raise SyntaxError or ValueError from the decoders.
            log.debug("cannot read %s: %s", names[position], error)
            skipped.append(names[position])
            continue
        images[len(kept)] = np.asarray(resized, dtype=np.uint8)
        kept.append(position)
    if skipped:
        log.warning(
            "skipped %d of %d images in %s (missing or unreadable), e.g. %s",
            len(skipped), len(sources), where, skipped[0],
        )
    if not kept:
        raise ValueError(f"no readable images for {desc or 'the split'} in {where}: all {len(skipped)} were skipped")
    return images[: len(kept)], np.asarray(kept, dtype=np.int64), skipped


def real_captioned_images(
    dataset: str,
    split: str,
    images: np.ndarray,
    image_ids: Sequence[str],
    captions: Sequence[Sequence[str]],
    skipped: Sequence[str],
    meta: dict[str, Any] | None = None,
) -> CaptionedImages:
    """A split of real data: ``captions[i]`` are image ``i``'s captions; no twins, no caption kinds."""
    flat = [caption for image_captions in captions for caption in image_captions]
    caption_image = np.repeat(np.arange(len(image_ids)), [len(c) for c in captions])
    return CaptionedImages(
        dataset=dataset,
        split=split,
        images=images,
        captions=flat,
        caption_image=caption_image,
        image_ids=list(image_ids),
        twin=np.full(len(image_ids), -1, dtype=np.int64),
        twin_kind=[""] * len(image_ids),
        caption_kind=[""] * len(flat),
        skipped=list(skipped),
        meta=dict(meta or {}),
    )


def _split_folder(root: Path, split: str) -> Path:
    candidates = [root / name for name in SPLIT_FOLDERS[split]]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"split folder not found: {' or '.join(str(c) for c in candidates)}")


def _metadata_file(split_dir: Path) -> Path:
    for name in METADATA_FILES:
        if (split_dir / name).is_file():
            return split_dir / name
    raise FileNotFoundError(f"no metadata file in {split_dir}: expected {' or '.join(METADATA_FILES)}")


def _read_rows(metadata_path: Path) -> list[dict[str, Any]]:
    if metadata_path.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(read_text(metadata_path), newline="")))
    rows = []
    for line_number, line in enumerate(read_lines(metadata_path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            message = f"{metadata_path} line {line_number} is not valid JSON: {error}"
            raise ValueError(message) from None
        if not isinstance(row, dict):
            raise ValueError(f"{metadata_path} line {line_number} is not a JSON object")
        rows.append(row)
    return rows


def _group_captions(
    rows: list[dict[str, Any]], metadata_path: Path
) -> tuple[list[str], dict[str, list[str]]]:
    """File names in first-seen order, and every caption of each file."""
    if not rows:
        raise ValueError(f"{metadata_path} has no rows: no captions at all")
    columns = sorted({column for row in rows for column in row})
    if "file_name" not in columns:
        raise ValueError(f"{metadata_path} has no 'file_name' column; columns found: {columns}")
    caption_column = next((name for name in CAPTION_COLUMNS if name in columns), None)
    if caption_column is None:
        raise ValueError(
            f"{metadata_path} has no caption column (one of {', '.join(CAPTION_COLUMNS)}); "
            f"columns found: {columns}"
        )
    captions_by_file: dict[str, list[str]] = {}
    for row in rows:
        file_name = row.get("file_name")
        if not file_name:
            raise ValueError(f"{metadata_path} has a row without a file_name: {row}")
        captions = _parse_captions(row.get(caption_column))
        if not captions or not all(captions):
            raise ValueError(f"{metadata_path}: {file_name!r} has an empty caption ({caption_column!r})")
        captions_by_file.setdefault(str(file_name), []).extend(captions)
    return list(captions_by_file), captions_by_file


def _parse_captions(value: Any) -> list[str]:
    """A caption cell as a list of stripped captions; a CSV cell may hold a JSON list."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # a caption that happens to start with "[" is still a caption
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [str(caption).strip() for caption in values]
