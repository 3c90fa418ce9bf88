"""Real captioned clips in the VATEX or MSR-VTT layout: a captions JSON and the frames of each clip.

``root`` holds

* a captions file for the split, either VATEX's (a list of ``{"videoID": ..., "enCap": [...]}``;
  one file per split) or MSR-VTT's (``{"videos": [{"video_id", "split"}], "sentences":
  [{"video_id", "caption"}]}``; one file for several splits, ``split`` being ``train``,
  ``validate`` or ``test``). The names looked for are in :data:`CAPTION_FILES`;
* the clips: ``frames/<id>/`` with the clip's frames as ``.jpg``/``.png`` files (in natural name
  order), or ``videos/<id>.mp4`` (or ``.webm``/``.mkv``/``.avi``), decoded with PyAV when it is
  installed. Extracting frames once (``ffmpeg -i clip.mp4 -vf fps=4 frames/<id>/%05d.jpg``) is
  faster to load than decoding every clip each time, and needs no decoder here.

Each clip becomes ``frames`` frames sampled uniformly over its length (the middle of ``frames``
equal segments), resized to ``image_size`` square. A missing or unreadable clip is skipped, listed
in ``skipped`` and logged, never dropped silently; a malformed captions file raises an error naming
the file and the record.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fastslow.data.folder import read_resized_images, real_captioned_images
from fastslow.data.types import SPLITS, CaptionedVideos
from fastslow.files import read_text

log = logging.getLogger(__name__)

# Looked for in this order; VATEX's are per split, MSR-VTT's hold several splits.
CAPTION_FILES = {
    "train": ("train.json", "vatex_training_v1.0.json", "train_val_videodatainfo.json", "videodatainfo.json"),
    "val": (
        "val.json",
        "validation.json",
        "vatex_validation_v1.0.json",
        "train_val_videodatainfo.json",
        "videodatainfo.json",
    ),
    "test": ("test.json", "vatex_public_test_english_v1.1.json", "test_videodatainfo.json", "videodatainfo.json"),
}
# MSR-VTT's name for each split.
MSRVTT_SPLITS = {"train": ("train",), "val": ("validate", "val"), "test": ("test",)}
FRAMES_DIR = "frames"
VIDEOS_DIR = "videos"
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi")


def load_video_captions(
    root: str | Path,
    split: str,
    frames: int,
    image_size: int,
    max_clips: int | None = None,
    dataset: str | None = None,
) -> CaptionedVideos:
    """Load one split as clips ``(N, frames, image_size, image_size, 3)`` uint8 with their captions.

    ``max_clips`` caps the clips loaded: the first ones of the captions file that are on disk (a
    missing clip before the cap is skipped and counted). ``dataset`` names the result; by default
    the name of ``root``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if frames < 1 or image_size < 1:
        raise ValueError(f"frames and image_size must be >= 1, got {frames} and {image_size}")
    root = Path(root)
    if root.is_file():
        raise NotADirectoryError(f"dataset folder is a file, not a folder: {root}")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    captions_path = _captions_file(root, split)
    captions_by_clip = read_clip_captions(captions_path, split)
    if not (root / FRAMES_DIR).is_dir() and not (root / VIDEOS_DIR).is_dir():
        raise FileNotFoundError(
            f"no clips in {root}: expected frames in {root / FRAMES_DIR}/<id>/ "
            f"or videos in {root / VIDEOS_DIR}/<id>.mp4"
        )

    frame_files: dict[str, list[Path]] = {}  # clip id -> its sampled frame files
    video_files: dict[str, Path] = {}
    skipped: list[str] = []
    for clip_id in captions_by_clip:
        if max_clips is not None and len(frame_files) + len(video_files) >= max_clips:
            break
        frame_dir = root / FRAMES_DIR / clip_id
        video = _video_file(root, clip_id)
        if frame_dir.is_dir():
            files = sorted((p for p in frame_dir.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural_key)
            if files:
                frame_files[clip_id] = [files[i] for i in sample_frame_indices(len(files), frames)]
            else:
                log.debug("no %s frames in %s", "/".join(FRAME_SUFFIXES), frame_dir)
                skipped.append(str(frame_dir))
        elif video is not None:
            video_files[clip_id] = video
        else:
            log.debug("clip %r has neither %s nor a video file", clip_id, frame_dir)
            skipped.append(str(frame_dir))

    considered = len(skipped) + len(frame_files) + len(video_files)
    clips = _read_frame_folders(frame_files, frames, image_size, root, split, skipped)
    clips |= _decode_videos(video_files, frames, image_size, root, skipped)
    if skipped:
        log.warning(
            "skipped %d of %d clips for %s/%s (missing or unreadable), e.g. %s",
            len(skipped), considered, root.name, split, skipped[0],
        )
    loaded = [clip_id for clip_id in captions_by_clip if clip_id in clips]
    if not loaded:
        raise ValueError(f"no readable clips for split {split!r} in {root}: all {len(skipped)} were skipped")
    return real_captioned_images(
        dataset or root.name,
        split,
        np.stack([clips[clip_id] for clip_id in loaded]),
        loaded,
        [captions_by_clip[clip_id] for clip_id in loaded],
        skipped,
        meta={"captions_file": str(captions_path), "frames": frames},
    )


def sample_frame_indices(n_available: int, frames: int) -> np.ndarray:
    """``frames`` indices spread uniformly over ``n_available`` frames: the middle of ``frames``
    equal segments (a short clip repeats frames rather than failing)."""
    return ((np.arange(frames) + 0.5) * n_available / frames).astype(np.int64)


def read_clip_captions(path: Path, split: str) -> dict[str, list[str]]:
    """Clip id -> captions (file order) of ``split`` in a VATEX or MSR-VTT captions file."""
    try:
        content = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if isinstance(content, list):
        captions = _vatex_captions(content, path)
    elif isinstance(content, dict) and {"videos", "sentences"} <= set(content):
        captions = _msrvtt_captions(content, path, split)
    else:
        found = f"an object with keys {sorted(content)}" if isinstance(content, dict) else type(content).__name__
        raise ValueError(
            f"{path} is neither VATEX captions (a list of {{'videoID', 'enCap'}} records) nor MSR-VTT "
            f"captions (an object with 'videos' and 'sentences'); found {found}"
        )
    if not captions:
        raise ValueError(f"{path} has no clips for split {split!r}")
    return captions


def _vatex_captions(records: list[Any], path: Path) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = {}
    for position, record in enumerate(records):
        where = f"{path} record {position}"
        if not isinstance(record, dict) or not isinstance(record.get("videoID"), str) or not record["videoID"]:
            raise ValueError(f"{where} has no 'videoID' string: {str(record)[:200]}")
        english = record.get("enCap")
        if not isinstance(english, list) or not english:
            raise ValueError(f"{where} ({record['videoID']!r}) has no 'enCap' list of English captions")
        stripped = [str(caption).strip() for caption in english]
        if not all(stripped):
            raise ValueError(f"{where} ({record['videoID']!r}) has an empty caption in 'enCap'")
        captions.setdefault(record["videoID"], []).extend(stripped)
    return captions


def _msrvtt_captions(content: dict[str, Any], path: Path, split: str) -> dict[str, list[str]]:
    wanted: list[str] = []
    for position, video in enumerate(content["videos"]):
        if not isinstance(video, dict) or "video_id" not in video or "split" not in video:
            raise ValueError(f"{path} videos[{position}] needs 'video_id' and 'split': {str(video)[:200]}")
        if video["split"] in MSRVTT_SPLITS[split]:
            wanted.append(str(video["video_id"]))
    captions: dict[str, list[str]] = {video_id: [] for video_id in wanted}
    for position, sentence in enumerate(content["sentences"]):
        if not isinstance(sentence, dict) or "video_id" not in sentence or "caption" not in sentence:
            raise ValueError(f"{path} sentences[{position}] needs 'video_id' and 'caption': {str(sentence)[:200]}")
        video_id = str(sentence["video_id"])
        if video_id in captions:
            caption = str(sentence["caption"]).strip()
            if not caption:
                raise ValueError(f"{path} sentences[{position}] ({video_id!r}) is an empty caption")
            captions[video_id].append(caption)
    uncaptioned = [video_id for video_id, clip_captions in captions.items() if not clip_captions]
    if uncaptioned:
        raise ValueError(f"{path}: {len(uncaptioned)} {split} videos have no sentences, e.g. {uncaptioned[0]!r}")
    return captions


def _captions_file(root: Path, split: str) -> Path:
    for name in CAPTION_FILES[split]:
        if (root / name).is_file():
            return root / name
    expected = ", ".join(CAPTION_FILES[split])
    raise FileNotFoundError(f"no captions file for split {split!r} in {root}: expected one of {expected}")


def _video_file(root: Path, clip_id: str) -> Path | None:
    candidates = (root / VIDEOS_DIR / f"{clip_id}{suffix}" for suffix in VIDEO_SUFFIXES)
    return next((path for path in candidates if path.is_file()), None)


def _natural_key(path: Path) -> list[Any]:
    """Sort ``frame_2`` before ``frame_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _read_frame_folders(
    frame_files: dict[str, list[Path]], frames: int, image_size: int, root: Path, split: str, skipped: list[str]
) -> dict[str, np.ndarray]:
    """Clip id -> (frames, S, S, 3) for every clip whose sampled frames all read; the others are
    added to ``skipped``."""
    if not frame_files:
        return {}
    sources = [path for files in frame_files.values() for path in files]
    images, kept, _ = read_resized_images(
        sources, image_size, where=str(root / FRAMES_DIR), desc=f"{root.name}/{split} frames"
    )
    readable = np.zeros(len(sources), dtype=bool)
    readable[kept] = True
    slot = np.full(len(sources), -1, dtype=np.int64)
    slot[kept] = np.arange(len(kept))
    clips = {}
    for number, clip_id in enumerate(frame_files):
        positions = np.arange(number * frames, (number + 1) * frames)
        if readable[positions].all():
            clips[clip_id] = images[slot[positions]]
        else:
            skipped.append(str(root / FRAMES_DIR / clip_id))
    return clips


def _decode_videos(
    video_files: dict[str, Path], frames: int, image_size: int, root: Path, skipped: list[str]
) -> dict[str, np.ndarray]:
    """Clip id -> (frames, S, S, 3) decoded with PyAV; a video that does not decode is skipped."""
    if not video_files:
        return {}
    first = next(iter(video_files.values()))
    try:
        av = importlib.import_module("av")
    except ImportError:
        raise ImportError(
            f"{first} is a video file, and reading videos needs PyAV, which is not installed: "
            f"`pip install av`, or extract each clip's frames into {root / FRAMES_DIR}/<id>/ "
            f"(e.g. `ffmpeg -i {first} -vf fps=4 {root / FRAMES_DIR / first.stem}/%05d.jpg`)"
        ) from None
    clips = {}
    for clip_id, path in tqdm(video_files.items(), desc=f"{root.name} videos", unit="clip"):
        try:
            with av.open(str(path)) as container:
                size = (image_size, image_size)
                decoded = [
                    np.asarray(frame.to_image().convert("RGB").resize(size, Image.Resampling.BICUBIC))
                    for frame in container.decode(video=0)
                ]
        except (OSError, ValueError, av.error.FFmpegError) as error:
            log.debug("cannot decode %s: %s", path, error)
            decoded = []
        if decoded:
            clips[clip_id] = np.stack([decoded[i] for i in sample_frame_indices(len(decoded), frames)])
        else:
            skipped.append(str(path))
    return clips
