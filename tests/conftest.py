"""Fixtures shared by several test files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastslow.config import DataConfig


@pytest.fixture
def tiny_real(tmp_path) -> DataConfig:
    """A Flickr8k-layout dataset of 64-pixel images, two captions each: 6 train and 2 dev images, no test list.

    Without a test list the loader carves validation out of the train list: 5 train images stay
    (seed 0 carves im1.png), 1 is validation, and the 2 dev images are the test split.
    """
    root = tmp_path / "tiny8k"
    rng = np.random.default_rng(0)
    names = [f"im{i}.png" for i in range(8)]
    for name in names:
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "images" / name)
    lines = [f"{name}#{k}\ta photo number {i} , take {k} ." for i, name in enumerate(names) for k in range(2)]
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:6]))
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(names[6:]))
    return DataConfig(dataset="flickr8k", data_dir=str(root), n_train=5, n_val=1, n_test=2, image_size=64)
