"""The study's configuration: one frozen dataclass tree, built from a named profile.

A profile is data (a :class:`Profile` per name), not ``if`` chains through the code. Everything a
trained artifact depends on lives in :class:`StudyConfig`, so hashing the relevant part of it keys
the cache (:mod:`fastslow.cache`): a changed parameter never reuses a stale model.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

DATASETS = ("shapes", "shapes-video", "folder", "flickr8k", "flickr30k", "coco")
BACKBONES = ("tiny", "pretrained")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "shapes"
    data_dir: str | None = None
    n_train: int = 8000
    n_val: int = 500
    n_test: int = 1000
    image_size: int = 48
    captions_per_image: int = 5
    seed: int = 0


@dataclass(frozen=True)
class EncoderConfig:
    """Sizes of the image and text towers (the ``tiny`` backbone trains them from scratch)."""

    backbone: str = "tiny"
    channels: tuple[int, ...] = (32, 48, 64, 96)
    text_width: int = 128
    text_layers: int = 2
    heads: int = 4
    max_caption_tokens: int = 24


@dataclass(frozen=True)
class DualEncoderConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    embed_dim: int = 128
    init_temperature: float = 0.07


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    patience: int = 3
    grad_clip: float = 1.0


@dataclass(frozen=True)
class Profile:
    """How big a run is: data sizes, training budgets and evaluation sizes."""

    name: str
    data: DataConfig
    train_dual: TrainConfig
    # Captions per test image used as queries in the comparable ("headline") evaluation. The Slow
    # model scores every (query, image) pair, so its cost sets this number.
    headline_captions_per_image: int


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        data=DataConfig(n_train=512, n_val=64, n_test=100),
        train_dual=TrainConfig(epochs=2, batch_size=64, patience=2),
        headline_captions_per_image=1,
    ),
    "quick": Profile(
        name="quick",
        data=DataConfig(n_train=6000, n_val=500, n_test=1000),
        train_dual=TrainConfig(epochs=10, batch_size=128),
        headline_captions_per_image=1,
    ),
    "full": Profile(
        name="full",
        data=DataConfig(n_train=40000, n_val=1000, n_test=1000, image_size=64),
        train_dual=TrainConfig(epochs=40, batch_size=256, patience=5),
        headline_captions_per_image=5,
    ),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}") from None


def default_profile() -> str:
    """The profile a notebook runs when papermill does not override it."""
    return os.environ.get("FASTSLOW_PROFILE", "quick")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class StudyConfig:
    profile: str
    data: DataConfig
    dual: DualEncoderConfig
    train_dual: TrainConfig
    headline_captions_per_image: int
    seed: int = 0
    device: str = "cpu"

    @property
    def run_name(self) -> str:
        """Names ``results/<run>/``: the profile and the dataset."""
        return f"{self.profile}-{self.data.dataset}"


def make_config(
    profile: str | None = None,
    dataset: str = "shapes",
    data_dir: str | None = None,
    backbone: str = "tiny",
    seed: int = 0,
    device: str | None = None,
) -> StudyConfig:
    """Build the configuration a notebook's ``parameters`` cell asks for, validating every name."""
    chosen = get_profile(profile or default_profile())
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if dataset not in ("shapes", "shapes-video") and not data_dir:
        raise ValueError(f"dataset {dataset!r} needs data_dir: the folder that holds it")
    # The data seed stays fixed: runs with other training seeds are evaluated on the same test set.
    data = dataclasses.replace(chosen.data, dataset=dataset, data_dir=data_dir)
    encoder = EncoderConfig(backbone=backbone)
    return StudyConfig(
        profile=chosen.name,
        data=data,
        dual=DualEncoderConfig(encoder=encoder),
        train_dual=chosen.train_dual,
        headline_captions_per_image=chosen.headline_captions_per_image,
        seed=seed,
        device=device or default_device(),
    )
