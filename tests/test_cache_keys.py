"""Cache keys follow the content of the data, not only its path and sizes: an edited caption
retrains the models, a replaced photograph gets new features, and a symlinked image folder counts
by what is in it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from fastslow.config import DataConfig, config_hash, make_config
from fastslow.data import files_fingerprint
from fastslow.data.real import load_real_dataset
from fastslow.features import FeatureParams, feature_key
from fastslow.stages import cross_attention_key, dual_encoder_key


def fingerprint_now(data_dir: str | Path) -> str:
    """The fingerprint as a new process would compute it (each process computes it once)."""
    files_fingerprint.cache_clear()
    return files_fingerprint(str(data_dir))


def replace_image(path: Path, seed: int) -> None:
    """New pixels under the same name, with the old modification time."""
    before = path.stat()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_an_edited_caption_changes_the_keys_of_both_models(tiny_real: DataConfig):
    cfg = make_config("smoke", dataset="flickr8k", data_dir=tiny_real.data_dir, device="cpu")
    fingerprint_now(tiny_real.data_dir)
    before = [config_hash(key(cfg)) for key in (dual_encoder_key, cross_attention_key)]
    tokens = Path(tiny_real.data_dir) / "Flickr8k.token.txt"
    tokens.write_text(tokens.read_text().replace("a photo number 3 ,", "a picture number 3 ,"))
    fingerprint_now(tiny_real.data_dir)
    after = [config_hash(key(cfg)) for key in (dual_encoder_key, cross_attention_key)]
    assert before[0] != after[0], "the dual encoder would load stale from the cache"
    assert before[1] != after[1], "the Slow model would load stale from the cache"


def test_generated_data_is_keyed_by_its_config_alone():
    assert "files" not in dual_encoder_key(make_config("smoke", device="cpu"))


def test_a_replaced_image_changes_the_features_key(tiny_real: DataConfig):
    data = load_real_dataset("flickr8k", tiny_real.data_dir, 32)["train"]
    params = FeatureParams(data=tiny_real)
    fingerprint_now(tiny_real.data_dir)
    before = config_hash(feature_key(params, data))
    replace_image(Path(tiny_real.data_dir) / "images" / data.image_ids[0], seed=99)
    fingerprint_now(tiny_real.data_dir)
    assert config_hash(feature_key(params, data)) != before, "its old features would be reused"


def test_a_copy_with_new_modification_times_keeps_its_keys(tiny_real: DataConfig):
    before = fingerprint_now(tiny_real.data_dir)
    for path in Path(tiny_real.data_dir).rglob("*"):
        if path.is_file():
            os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**12))
    assert fingerprint_now(tiny_real.data_dir) == before, "a fresh copy of the same data would retrain"


def test_a_symlinked_image_folder_is_fingerprinted_by_its_contents(tiny_real: DataConfig, tmp_path):
    real = Path(tiny_real.data_dir)
    linked = tmp_path / "linked"
    linked.mkdir()
    for path in real.glob("*.txt"):
        shutil.copy2(path, linked / path.name)
    (linked / "images").symlink_to(real / "images", target_is_directory=True)
    assert fingerprint_now(linked) == fingerprint_now(real)

    before = fingerprint_now(linked)
    replace_image(real / "images" / "im0.png", seed=99)
    assert fingerprint_now(linked) != before


def test_a_folder_linked_into_itself_is_read_once(tiny_real: DataConfig):
    real = Path(tiny_real.data_dir)
    before = fingerprint_now(real)
    (real / "images" / "loop").symlink_to(real, target_is_directory=True)
    assert fingerprint_now(real) == before

