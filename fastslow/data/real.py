"""Real photographs with human captions, from the layouts people have them in.

* Flickr8k in its release layout: ``Flickr8k.token.txt`` (``<image>.jpg#<0-4>\\t<caption>``), the
  ``Flickr_8k.{train,dev,test}Images.txt`` lists and the photographs in ``images/`` or
  ``Flicker8k_Dataset/`` (sic, the release's spelling).
* Karpathy-split JSON (``dataset_flickr30k.json``, ``dataset_coco.json``, ``dataset_flickr8k.json``)
  and the folder of images it names.
* Hugging Face ``datasets``: saved with ``save_to_disk``, an "imagefolder" with ``metadata.jsonl``,
  or (online only) a hub name.

Every loader returns ``{"train", "val", "test"}`` :class:`CaptionedImages` with images resized to a
square uint8 array. Bad input raises an error naming the file or record; unreadable images are
skipped, listed in ``skipped`` and logged, never dropped silently. ``max_images`` caps a split with a
seeded subset, so quick profiles read only the images they use.

Nothing is ever chosen on the split a number is reported on. Flickr8k's validation is its dev list when
the release has a test list; without one (the shared sample leaves it out) the dev list is the test
split and validation is a seeded subset carved out of the train list (see :func:`load_flickr8k`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastslow.data.folder import METADATA_FILES, ImageSource, read_resized_images, real_captioned_images
from fastslow.data.types import SPLITS, CaptionedImages
from fastslow.files import read_lines, read_text

log = logging.getLogger(__name__)

REAL_DATASETS = ("flickr8k", "flickr30k", "coco")
# ``data_dir`` values starting with this name a dataset on the Hugging Face hub (needs a network).
HUB_PREFIX = "hf://"

# A cap on the images of every split (int), per split (mapping; a missing split is not capped), or none.
MaxImages = int | Mapping[str, int | None] | None

FLICKR8K_TOKENS = "Flickr8k.token.txt"
FLICKR8K_LISTS = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
FLICKR8K_IMAGE_DIRS = ("images", "Flicker8k_Dataset", "Flickr8k_Dataset")
# Without a test list, validation is carved out of the train list: this many images (the shared sample's
# README asks for about 500), but at most a fifth of the list (carved_validation_size).
CARVED_VALIDATION_IMAGES = 500
# A seed stream of its own, so the carving never correlates with the caps' subsets (choose_images).
CARVE_SEED_STREAM = 1

# The images and provenance (``meta``) of one split, before any images are read.
SplitNames = tuple[list[str], dict[str, Any]]

# Karpathy's "restval" images (COCO) are training images by the usual convention.
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
KARPATHY_IMAGE_DIRS = ("images", "flickr30k-images", "Flicker8k_Dataset", "Flickr8k_Dataset", ".")

# Names of splits and columns in HF datasets.
HF_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid", "dev"), "test": ("test",)}
HF_SPLIT_VALUES = {
    "train": "train", "restval": "train", "val": "val", "validation": "val", "dev": "val", "test": "test"
}
HF_IMAGE_COLUMNS = ("image", "img", "jpg")
HF_CAPTION_COLUMNS = ("caption", "captions", "text", "sentences", "raw")
HF_ID_COLUMNS = ("filename", "file_name", "image_id", "img_id", "cocoid", "imgid", "id")


def load_real_dataset(
    name: str, data_dir: str | Path | None, image_size: int, max_images: MaxImages = None, seed: int = 0
) -> dict[str, CaptionedImages]:
    """Load dataset ``name`` from ``data_dir``, recognising its layout.

    In order: Flickr8k's release files, ``dataset_<name>.json`` (Karpathy splits; ``data_dir`` may also be
    the JSON file itself), a dataset saved with ``datasets.save_to_disk``, an HF imagefolder
    (``metadata.jsonl``/``.csv``), or ``hf://<hub name>`` (online).
    """
    if name not in REAL_DATASETS:
        raise ValueError(f"unknown real dataset {name!r}; choose one of {', '.join(REAL_DATASETS)}")
    if not data_dir:
        raise ValueError(f"dataset {name!r} needs data_dir: the folder that holds it")
    if str(data_dir).startswith(HUB_PREFIX):
        hub_name = str(data_dir)[len(HUB_PREFIX) :]
        return load_hf_dataset(hub_name, image_size, max_images, seed, dataset=name)
    root = Path(data_dir)
    if root.is_file() and root.suffix == ".json":
        return load_karpathy_json(root, image_size, max_images=max_images, seed=seed, dataset=name)
    if root.is_file():
        raise NotADirectoryError(
            f"data_dir of dataset {name!r} is a file, not a folder: {root} "
            f"(give the folder that holds it, or a dataset_{name}.json)"
        )
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir of dataset {name!r} not found: {root}")
    karpathy_json = root / f"dataset_{name}.json"
    if name == "flickr8k" and (root / FLICKR8K_TOKENS).is_file():
        return load_flickr8k(root, image_size, max_images, seed)
    if karpathy_json.is_file():
        return load_karpathy_json(karpathy_json, image_size, max_images=max_images, seed=seed, dataset=name)
    if _is_saved_hf_dataset(root) or _has_metadata_file(root):
        return load_hf_dataset(root, image_size, max_images, seed, dataset=name)
    expected = [karpathy_json.name, "dataset_dict.json (datasets.save_to_disk)", "metadata.jsonl (imagefolder)"]
    if name == "flickr8k":
        expected.insert(0, FLICKR8K_TOKENS)
    raise FileNotFoundError(f"no known layout of {name!r} in {root}: expected one of {', '.join(expected)}")


# --- Flickr8k release layout -----------------------------------------------------------------------


def load_flickr8k(
    root: str | Path, image_size: int, max_images: MaxImages = None, seed: int = 0
) -> dict[str, CaptionedImages]:
    """Flickr8k as released, split by :func:`flickr8k_split_names`.

    With ``Flickr_8k.testImages.txt``: train, dev and test lists are train, val and test. Without it,
    the dev list is the test split and validation is ``CARVED_VALIDATION_IMAGES`` images carved, seeded,
    out of the train list and removed from train, so hyper-parameters and models are chosen on images
    no reported number uses. The carving comes before ``max_images``, which then caps each split as
    for any loader; each split's ``meta`` says which list it came from and how.
    """
    root = Path(root)
    tokens_path = _required_file(root / FLICKR8K_TOKENS)
    captions_by_image = _read_flickr8k_tokens(tokens_path)
    image_dir = _first_dir(root, FLICKR8K_IMAGE_DIRS)
    splits = {}
    for split, (names, meta) in flickr8k_split_names(root, seed).items():
        missing = [name for name in names if name not in captions_by_image]
        if missing:
            raise ValueError(f"{meta['source']}: image {missing[0]!r} has no captions in {tokens_path}")
        splits[split] = _load_split(
            "flickr8k", split, names, [captions_by_image[name] for name in names],
            lambda chosen, names=names: [image_dir / names[i] for i in chosen],
            image_size, _limit(max_images, split), seed, where=str(image_dir), meta=meta,
        )
    return splits


def flickr8k_split_names(root: str | Path, seed: int = 0) -> dict[str, SplitNames]:
    """The image names and ``meta`` of Flickr8k's train/val/test, from its lists alone (no image is read).

    Without a test list, validation is carved out of the train list (:func:`carve_validation`), and
    the warning saying so is logged here, once per load.
    """
    root = Path(root)
    list_paths = {listed: root / file_name for listed, file_name in FLICKR8K_LISTS.items()}
    train_path, dev_path = _required_file(list_paths["train"]), _required_file(list_paths["dev"])
    train_names, dev_names = _read_image_list(train_path), _read_image_list(dev_path)
    if list_paths["test"].is_file():
        return {
            "train": (train_names, {"source": str(train_path), "source_split": "train"}),
            "val": (dev_names, {"source": str(dev_path), "source_split": "dev"}),
            "test": (_read_image_list(list_paths["test"]), {"source": str(list_paths["test"]), "source_split": "test"}),
        }
    if len(train_names) < 2:
        raise ValueError(
            f"{train_path} lists only one image: too few to carve a validation split out of it "
            f"(the release has no {FLICKR8K_LISTS['test']}, so the dev list is the test split)"
        )
    kept_names, carved_names = carve_validation(train_names, seed)
    n_carved = len(carved_names)
    test_note = f"no {FLICKR8K_LISTS['test']} in the release: test is the dev split"
    log.warning(
        "%s has no %s: test is the dev split (%d images, %s) and validation is %d images carved out of %s "
        "(seed %d), which train no longer holds; choose on validation, report on test",
        root, FLICKR8K_LISTS["test"], len(dev_names), dev_path.name, n_carved, train_path.name, seed,
    )
    carving = {"carved_images": n_carved, "carve_seed": seed}
    return {
        "train": (kept_names, {
            "source": str(train_path), "source_split": "train", **carving,
            "note": f"{n_carved} of the {len(train_names)} listed images were carved out as validation",
        }),
        "val": (carved_names, {
            "source": str(train_path), "source_split": "train", "carved_from": "train", **carving,
            "note": f"{test_note}; validation is {n_carved} images carved out of the train list",
        }),
        "test": (dev_names, {"source": str(dev_path), "source_split": "dev", "note": test_note}),
    }


def carved_validation_size(n_listed: int) -> int:
    """Images carved out of a train list of ``n_listed``: ``CARVED_VALIDATION_IMAGES``, but at most a fifth
    of the list so a tiny dataset still trains on most of its images, and at least one."""
    return max(1, min(CARVED_VALIDATION_IMAGES, n_listed // 5))


def carve_validation(train_names: Sequence[str], seed: int) -> tuple[list[str], list[str]]:
    """``(train, validation)``: a seeded subset of :func:`carved_validation_size` names becomes validation,
    the rest stays train; both keep listed order, and they are disjoint."""
    n_carved = carved_validation_size(len(train_names))
    picked = np.random.default_rng([seed, CARVE_SEED_STREAM]).permutation(len(train_names))[:n_carved]
    is_carved = np.zeros(len(train_names), dtype=bool)
    is_carved[picked] = True
    kept = [name for name, carved in zip(train_names, is_carved) if not carved]
    carved = [name for name, carved in zip(train_names, is_carved) if carved]
    return kept, carved


def _read_flickr8k_tokens(path: Path) -> dict[str, list[str]]:
    """Captions of each image, in file order, from ``<image>#<k>\\t<caption>`` lines."""
    captions: dict[str, list[str]] = {}
    for line_number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        image, hash_sign, _ = key.partition("#")
        if not tab or not hash_sign or not image or not caption.strip():
            raise ValueError(
                f"{path} line {line_number}: expected '<image>#<k>\\t<caption>', got {line.strip()[:80]!r}"
            )
        captions.setdefault(image, []).append(caption.strip())
    if not captions:
        raise ValueError(f"{path} has no captions")
    return captions


def _read_image_list(path: Path) -> list[str]:
    names = list(dict.fromkeys(line.strip() for line in read_lines(path)))
    names = [name for name in names if name]
    if not names:
        raise ValueError(f"{path} lists no images")
    return names


# --- Karpathy-split JSON ---------------------------------------------------------------------------


def load_karpathy_json(
    json_path: str | Path,
    image_size: int,
    image_dir: str | Path | None = None,
    max_images: MaxImages = None,
    seed: int = 0,
    dataset: str | None = None,
) -> dict[str, CaptionedImages]:
    """Flickr30K / COCO / Flickr8k in Karpathy's splits; ``restval`` images join ``train``.

    ``image_dir`` defaults to the first of ``images/``, ``flickr30k-images/``, ``Flicker8k_Dataset/``
    or the JSON's own folder that holds the first listed image (COCO's ``filepath`` such as
    ``val2014`` is joined below it).
    """
    json_path = _required_file(Path(json_path))
    records = _read_karpathy_records(json_path)
    image_root = _karpathy_image_root(json_path, records[0][0], image_dir)
    name = dataset or json_path.stem.removeprefix("dataset_")
    by_split: dict[str, list[tuple[str, list[str]]]] = {split: [] for split in SPLITS}
    for relative_path, split, captions in records:
        by_split[split].append((relative_path, captions))
    splits = {}
    for split, rows in by_split.items():
        if not rows:
            raise ValueError(f"{json_path} has no images in split {split!r}")
        paths = [path for path, _ in rows]
        splits[split] = _load_split(
            name, split, paths, [captions for _, captions in rows],
            lambda chosen, paths=paths: [image_root / paths[i] for i in chosen],
            image_size, _limit(max_images, split), seed, where=str(image_root),
            meta={"source": str(json_path)},
        )
    return splits


def _read_karpathy_records(json_path: Path) -> list[tuple[str, str, list[str]]]:
    """``(relative image path, split, captions)`` per image, validated."""
    try:
        content = json.loads(read_text(json_path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{json_path} is not valid JSON: {error}") from None
    images = content.get("images") if isinstance(content, dict) else None
    if not isinstance(images, list) or not images:
        raise ValueError(f"{json_path} has no 'images' list")
    records = []
    for index, image in enumerate(images):
        filename = image.get("filename") if isinstance(image, dict) else None
        where = f"{json_path}: images[{index}] ({filename!r})"
        if not filename:
            raise ValueError(f"{where} has no 'filename'")
        split = KARPATHY_SPLITS.get(str(image.get("split")))
        if split is None:
            raise ValueError(f"{where} has split {image.get('split')!r}; expected one of {', '.join(KARPATHY_SPLITS)}")
        sentences = image.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise ValueError(f"{where} has no 'sentences'")
        captions = [str(s.get("raw", "")).strip() if isinstance(s, dict) else "" for s in sentences]
        if not all(captions):
            raise ValueError(f"{where} has a sentence without 'raw' text")
        relative_path = str(Path(image.get("filepath") or "") / filename)
        records.append((relative_path, split, captions))
    return records


def _karpathy_image_root(json_path: Path, first_image: str, image_dir: str | Path | None) -> Path:
    if image_dir is not None:
        image_dir = Path(image_dir)
        if not image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {image_dir}")
        return image_dir
    candidates = [(json_path.parent / name).resolve() for name in KARPATHY_IMAGE_DIRS]
    for candidate in candidates:
        if (candidate / first_image).is_file():
            return candidate
    raise FileNotFoundError(
        f"image folder of {json_path} not found: no {first_image} under any of "
        f"{', '.join(str(c) for c in candidates)}; pass image_dir"
    )


# --- Hugging Face datasets -------------------------------------------------------------------------


def load_hf_dataset(
    source: str | Path,
    image_size: int,
    max_images: MaxImages = None,
    seed: int = 0,
    dataset: str | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, CaptionedImages]:
    """An HF dataset: ``save_to_disk`` output or an imagefolder at a local path, else a hub name.

    Splits are the dataset's ``train``/``validation``/``test`` (``val``/``dev`` accepted), or, for a
    single-split dataset with a ``split`` column (as Karpathy-split uploads have), that column.
    Rows naming the same image (an id column, or the image file) are grouped into one image.
    """
    import datasets  # heavy import, only when this layout is used

    local = Path(source)
    if local.exists():
        if _is_saved_hf_dataset(local):
            loaded = datasets.load_from_disk(str(local))
        else:
            loaded = datasets.load_dataset("imagefolder", data_dir=str(local), cache_dir=cache_dir)
        name = dataset or local.name
    else:  # a hub name: needs the network (or the local HF cache)
        loaded = datasets.load_dataset(str(source), cache_dir=cache_dir)
        name = dataset or str(source).rsplit("/", 1)[-1]
    parts = _hf_splits(loaded, str(source))
    return {
        split: _load_hf_split(part, name, split, image_size, _limit(max_images, split), seed, str(source))
        for split, part in parts.items()
    }


def _hf_splits(loaded: Any, source: str) -> dict[str, Any]:
    """The train/val/test parts of a loaded ``Dataset`` or ``DatasetDict``."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    available = list(loaded)
    if len(available) == 1 and "split" in loaded[available[0]].column_names:
        only = loaded[available[0]]
        values = [str(value) for value in only["split"]]
        unknown = sorted(set(values) - set(HF_SPLIT_VALUES))
        if unknown:
            raise ValueError(f"{source}: unknown values in the 'split' column: {unknown}")
        parts = {
            split: only.select([i for i, value in enumerate(values) if HF_SPLIT_VALUES[value] == split])
            for split in SPLITS
        }
    else:
        parts = {}
        for split, names in HF_SPLIT_NAMES.items():
            found = next((name for name in names if name in loaded), None)
            if found is not None:
                parts[split] = loaded[found]
    for split in SPLITS:
        if split not in parts or len(parts[split]) == 0:
            raise ValueError(
                f"{source} has no {split!r} split (looked for {', '.join(HF_SPLIT_NAMES[split])}); "
                f"splits found: {available}"
            )
    return parts


def _load_hf_split(
    part: Any, dataset: str, split: str, image_size: int, limit: int | None, seed: int, source: str
) -> CaptionedImages:
    import datasets

    where = f"{source} ({split})"
    image_column = next(
        (name for name, feature in part.features.items() if isinstance(feature, datasets.Image)),
        next((name for name in HF_IMAGE_COLUMNS if name in part.column_names), None),
    )
    caption_column = next((name for name in HF_CAPTION_COLUMNS if name in part.column_names), None)
    if image_column is None or caption_column is None:
        raise ValueError(
            f"{where} needs an image column ({', '.join(HF_IMAGE_COLUMNS)}) and a caption column "
            f"({', '.join(HF_CAPTION_COLUMNS)}); columns found: {part.column_names}"
        )
    if isinstance(part.features[image_column], datasets.Image):
        part = part.cast_column(image_column, datasets.Image(decode=False))  # we decode: bad files get counted
    id_column = next((name for name in HF_ID_COLUMNS if name in part.column_names), None)
    ids = [str(value) for value in part[id_column]] if id_column else _hf_image_paths(part[image_column])
    first_row: dict[str, int] = {}
    captions: dict[str, list[str]] = {}
    for row, (image_id, value) in enumerate(zip(ids, part[caption_column])):
        row_captions = _hf_captions(value)
        if not row_captions or not all(row_captions):
            raise ValueError(f"{where}: row {row} ({image_id!r}) has an empty caption ({caption_column!r})")
        first_row.setdefault(image_id, row)
        captions.setdefault(image_id, []).extend(row_captions)
    image_ids = list(first_row)

    def sources(chosen: np.ndarray) -> list[ImageSource]:
        cells = part.select([first_row[image_ids[i]] for i in chosen])[image_column]
        return [_hf_image_source(cell) for cell in cells]

    return _load_split(
        dataset, split, image_ids, [captions[i] for i in image_ids], sources, image_size, limit, seed,
        where=where, meta={"source": source},
    )


def _hf_image_paths(cells: Sequence[Any]) -> list[str]:
    """Ids from undecoded image cells: the file's path below the folder all of them share, where the
    cells have paths (an imagefolder's do), else the row number."""
    paths = [cell.get("path") if isinstance(cell, dict) else None for cell in cells]
    if not all(paths):
        return [str(row) for row in range(len(cells))]
    base = os.path.commonpath([os.path.dirname(path) for path in paths])
    return [os.path.relpath(path, base) for path in paths]


def _hf_image_source(cell: Any) -> ImageSource:
    if isinstance(cell, dict):
        return cell.get("bytes") or cell.get("path") or b""
    if isinstance(cell, (str, bytes)):
        return cell
    return b""  # an undecodable cell: counted as skipped


def _hf_captions(value: Any) -> list[str]:
    """A caption cell: a string, a list of strings, or Karpathy-style ``[{"raw": ...}, ...]``."""
    values = value if isinstance(value, list) else [value]
    return [str(v.get("raw", "") if isinstance(v, dict) else v or "").strip() for v in values]


def _is_saved_hf_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _has_metadata_file(root: Path) -> bool:
    return any(path.name in METADATA_FILES for path in root.glob("*")) or any(
        path.name in METADATA_FILES for path in root.glob("*/*")
    )


# --- shared ----------------------------------------------------------------------------------------


def _load_split(
    dataset: str,
    split: str,
    image_ids: Sequence[str],
    captions: Sequence[Sequence[str]],
    sources_of: Callable[[np.ndarray], list[ImageSource]],
    image_size: int,
    limit: int | None,
    seed: int,
    where: str,
    meta: dict[str, Any],
) -> CaptionedImages:
    """Read the (capped) images of one split; ``sources_of(chosen)`` gives what to read them from.

    A skipped image is reported by its path, or by its id when it came as bytes.
    """
    chosen = choose_images(len(image_ids), limit, seed)
    sources = sources_of(chosen)
    names = [str(s) if isinstance(s, (str, Path)) else image_ids[i] for s, i in zip(sources, chosen)]
    desc = f"{dataset}/{split}"
    images, kept, skipped = read_resized_images(sources, image_size, where=where, names=names, desc=desc)
    kept_images = chosen[kept]
    if limit is not None and limit < len(image_ids):
        meta = {**meta, "max_images": limit, "of_images": len(image_ids)}
    return real_captioned_images(
        dataset, split, images, [image_ids[i] for i in kept_images], [captions[i] for i in kept_images],
        skipped, meta,
    )


def choose_images(n_images: int, limit: int | None, seed: int) -> np.ndarray:
    """Indices of the images a capped split keeps, in listed order: a seeded random subset.

    Subsets for a smaller cap lie inside those for a larger one (same seed), so a smoke run's images are
    among a quick run's.
    """
    if limit is None or limit >= n_images:
        return np.arange(n_images)
    if limit < 1:
        raise ValueError(f"max_images must be at least 1, got {limit}")
    order = np.random.default_rng(seed).permutation(n_images)
    return np.sort(order[:limit])


def _limit(max_images: MaxImages, split: str) -> int | None:
    if max_images is None or isinstance(max_images, int):
        return max_images
    return max_images.get(split)


def _required_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    return path


def _first_dir(root: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"image folder not found: none of {', '.join(str(root / n) for n in names)}")
