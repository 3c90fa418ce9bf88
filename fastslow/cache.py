"""Artifacts keyed by the hash of the full config that produced them, written atomically.

One entry per (stage, config hash): ``<cache>/<stage>-<hash>.pt`` plus ``.json`` with the config, so
a changed parameter never reuses a stale model, and an interrupted write (temp file + rename) never
leaves a half-written file that a later run would trust.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from fastslow.config import REPO_ROOT, config_hash, to_jsonable

log = logging.getLogger(__name__)
T = TypeVar("T")

def cache_root() -> Path:
    root = Path(os.environ.get("FASTSLOW_CACHE", REPO_ROOT / ".cache" / "fastslow"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def artifact_path(stage: str, config: Any, suffix: str = ".pt") -> Path:
    return cache_root() / f"{stage}-{config_hash(config)}{suffix}"


def load_or_build(stage: str, config: Any, build: Callable[[], T]) -> T:
    """Return the cached artifact for ``(stage, config)``, or build, save and return it.

    ``build`` returns anything ``torch.save`` can store (state dicts, tensors, plain data).
    """
    path = artifact_path(stage, config)
    if path.exists():
        log.info("loading %s from %s", stage, path)
        return torch.load(path, weights_only=False)
    log.info("building %s (no cache entry %s)", stage, path.name)
    artifact = build()
    atomic_torch_save(artifact, path)
    path.with_suffix(".json").write_text(json.dumps(to_jsonable(config), indent=1, sort_keys=True))
    return artifact
