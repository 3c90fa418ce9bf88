"""Artifacts keyed by the hash of the full config that produced them, written atomically, read verified.

One entry per (stage, config hash): ``<cache>/<stage>-<hash>.pt`` plus ``<stage>-<hash>.pt.json`` with
the format version, the SHA-256 of the ``.pt`` file and the config, so a changed parameter never reuses
a stale model. The ``.pt`` file is written first (temp file + rename) and the ``.json`` last: an entry
whose write was interrupted, whose bytes changed since, or which an older format wrote is treated as
missing (with a warning naming the file) and rebuilt, never trusted. Files are read with
``torch.load(weights_only=True)``, which runs no code from the file: what is stored must be tensors
and plain containers (an artifact that is not, converts itself: ``to_stored`` and ``from_stored``).

A lock per entry makes two processes that need the same artifact build it once: the second waits,
then loads what the first wrote.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from filelock import FileLock, Timeout

from fastslow import distributed
from fastslow.config import REPO_ROOT, config_hash, to_jsonable
from fastslow.files import atomic_write, atomic_write_text, file_sha256

log = logging.getLogger(__name__)
T = TypeVar("T")

# Bumped when what a cache file holds changes shape; entries of another version are rebuilt.
FORMAT_VERSION = 2


def cache_root() -> Path:
    root = Path(os.environ.get("FASTSLOW_CACHE", REPO_ROOT / ".cache" / "fastslow"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def artifact_path(stage: str, config: Any, suffix: str = ".pt") -> Path:
    return cache_root() / f"{stage}-{config_hash(config)}{suffix}"


def record_path(path: Path) -> Path:
    """The JSON beside a saved file: its format version, checksum and what produced it."""
    return path.with_name(path.name + ".json")


def artifact_checksum(stage: str, config: Any) -> str:
    """The SHA-256 of the cached artifact for ``(stage, config)``, as its record holds it."""
    record = record_path(artifact_path(stage, config))
    return json.loads(record.read_text(encoding="utf-8"))["sha256"]


def save_verified(obj: Any, path: Path, about: dict[str, Any] | None = None) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically, then its record (:func:`record_path`)."""
    checksum = {}

    def write(tmp: str) -> None:
        torch.save(obj, tmp)
        checksum["sha256"] = file_sha256(tmp)

    atomic_write(path, write)
    record = {"format": FORMAT_VERSION, **checksum, **(about or {})}
    atomic_write_text(record_path(path), json.dumps(to_jsonable(record), indent=1, sort_keys=True))


def load_verified(path: Path) -> Any | None:
    """What :func:`save_verified` wrote to ``path``; ``None`` when there is nothing there, or when
    what is there cannot be trusted (then with a warning naming the file and why)."""
    if not path.exists():
        return None
    problem = _untrusted_because(path)
    if problem is None:
        try:
            return torch.load(path, weights_only=True)
        # A file that matches its checksum can still fail to load (e.g. a type weights_only refuses);
        # whatever the reason, the entry is rebuilt rather than the run stopped.
        except Exception as error:  # noqa: BLE001
            problem = f"cannot be loaded ({type(error).__name__}: {error})"
    log.warning("cache file %s %s: treating it as missing", path, problem)
    return None


def _untrusted_because(path: Path) -> str | None:
    record = record_path(path)
    try:
        about = json.loads(record.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"has no {record.name} (an interrupted write, or an older format)"
    except (OSError, ValueError) as error:
        return f"has an unreadable {record.name} ({error})"
    if not isinstance(about, dict) or about.get("format") != FORMAT_VERSION:
        found = about.get("format") if isinstance(about, dict) else None
        return f"was written in cache format {found}, not {FORMAT_VERSION}"
    if about.get("sha256") != file_sha256(path):
        return f"does not match the checksum in {record.name} (truncated or changed since it was written)"
    return None


def load_or_build(
    stage: str,
    config: Any,
    build: Callable[[], T],
    *,
    to_stored: Callable[[T], Any] | None = None,
    from_stored: Callable[[Any], T] | None = None,
    unusable: Callable[[Any], str | None] | None = None,
) -> T:
    """Return the cached artifact for ``(stage, config)``, or build, save and return it.

    ``build`` returns tensors and plain containers (state dicts, dicts of lists, floats, strings),
    or anything that ``to_stored`` turns into those and ``from_stored`` turns back.
    ``unusable(stored)`` says why a cached artifact cannot serve although its config matches
    (weights of an older form of the model), or None: such an entry is rebuilt, with a warning.
    """
    path = artifact_path(stage, config)
    # Under torchrun rank 0 alone decides whether the entry can serve (and holds its lock), and
    # every rank takes the same branch: all load it, or all build (a build may need every rank,
    # as DDP training does) and rank 0 alone writes, the others waiting for the write so that what
    # they read next (the entry's record) exists. In one process the rank is 0 and nothing waits.
    with _entry_lock(path, stage) if distributed.is_main() else contextlib.nullcontext():
        stored = _usable(path, unusable) if distributed.is_main() else None
        if distributed.from_main(stored is not None):
            stored = stored if stored is not None else load_verified(path)
            log.info("loaded %s from %s", stage, path)
            return from_stored(stored) if from_stored else stored
        log.info("building %s (no usable cache entry %s)", stage, path.name)
        artifact = build()
        if distributed.is_main():
            save_verified(to_stored(artifact) if to_stored else artifact, path, {"stage": stage, "config": config})
        distributed.barrier()
        return artifact


def _usable(path: Path, unusable: Callable[[Any], str | None] | None) -> Any | None:
    """What the entry at ``path`` holds, or None when it is missing or cannot serve (with a warning)."""
    stored = load_verified(path)
    problem = None if stored is None or unusable is None else unusable(stored)
    if problem is not None:
        log.warning("cache file %s %s: treating it as missing", path, problem)
        return None
    return stored


@contextlib.contextmanager
def _entry_lock(path: Path, stage: str) -> Iterator[None]:
    """Hold the entry's lock file, saying so when another process holds it first."""
    lock = FileLock(path.with_name(path.name + ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process to finish %s (%s)", stage, path.name)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
