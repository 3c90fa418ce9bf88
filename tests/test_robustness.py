"""A cache and results that never lie: damaged cache files are rebuilt, concurrent writers lose
nothing, and bad input files get errors that say where the problem is."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastslow import cache, results
from fastslow.config import TrainConfig
from fastslow.data.folder import load_image_folder, read_resized_images
from fastslow.data.real import load_real_dataset
from fastslow.train import fit

PACKAGE = Path(__file__).resolve().parents[1] / "fastslow"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FASTSLOW_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "zero-byte": lambda data: b"",
    "garbage": lambda data: b"\x80\x04not a torch file at all" * 10,
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cache_file_is_rebuilt_with_a_warning(cache_dir, caplog, damage):
    builds = []

    def build():
        builds.append(1)
        return {"weights": torch.arange(1000.0), "history": [{"loss": 0.5}]}

    cache.load_or_build("stage", {"x": 1}, build)
    path = cache.artifact_path("stage", {"x": 1})
    path.write_bytes(DAMAGE[damage](path.read_bytes()))

    with caplog.at_level(logging.WARNING, logger="fastslow.cache"):
        rebuilt = cache.load_or_build("stage", {"x": 1}, build)
    assert torch.equal(rebuilt["weights"], torch.arange(1000.0)) and len(builds) == 2
    assert any(r.levelno == logging.WARNING and str(path) in r.getMessage() for r in caplog.records)
    assert torch.equal(cache.load_or_build("stage", {"x": 1}, build)["weights"], torch.arange(1000.0))
    assert len(builds) == 2  # the rebuilt entry is trusted again


def test_an_entry_without_its_record_is_rebuilt(cache_dir, caplog):
    """The record (format, checksum) is written last: an entry without one was interrupted, or is older."""
    cache.load_or_build("stage", {"x": 1}, lambda: {"value": torch.ones(3)})
    cache.record_path(cache.artifact_path("stage", {"x": 1})).unlink()
    with caplog.at_level(logging.WARNING, logger="fastslow.cache"):
        assert cache.load_or_build("stage", {"x": 1}, lambda: {"value": torch.zeros(3)})["value"].sum() == 0
    assert "has no" in caplog.text


def test_weights_of_another_form_of_the_model_under_the_same_config_are_trained_again(cache_dir, caplog):
    """The cache is keyed by config; a model whose code changed (a new layer) under the same config
    must not load the old weights, nor stop the run: it trains again."""
    from fastslow.stages import train_or_load

    def train(make_model):
        return train_or_load(
            "stage", {"x": 1}, make_model, loss_fn=lambda model, batch, progress: model(batch).sum(),
            epoch_batches=lambda epoch: [torch.ones(2, 3)], validate=lambda model: 0.0,
            train_config=TrainConfig(epochs=1, batch_size=2), seed=0, device="cpu",
        )

    first = train(lambda: torch.nn.Linear(3, 1))
    with caplog.at_level(logging.WARNING, logger="fastslow.cache"):
        grown = train(lambda: torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)))
    assert isinstance(grown.model, torch.nn.Sequential)
    assert grown.config_hash != first.config_hash  # scores cached under the old weights stay apart
    assert "another form of the model" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastslow.cache"):
        train(lambda: torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)))
    assert "another form" not in caplog.text  # the retrained entry serves from now on


def test_artifacts_that_are_not_tensors_are_stored_through_their_conversion(cache_dir):
    """The cache loads with weights_only=True: a numpy array goes in as a tensor and comes back as an array."""
    convert = {"to_stored": lambda a: {"a": torch.from_numpy(a)}, "from_stored": lambda s: s["a"].numpy()}
    cache.load_or_build("arrays", {"x": 1}, lambda: np.arange(4), **convert)
    loaded = cache.load_or_build("arrays", {"x": 1}, lambda: pytest.fail("rebuilt a sound entry"), **convert)
    assert isinstance(loaded, np.ndarray) and loaded.tolist() == [0, 1, 2, 3]


def test_two_builders_of_one_entry_build_it_once(cache_dir):
    builds = []

    def slow_build():
        builds.append(1)
        time.sleep(0.3)
        return {"value": torch.tensor(len(builds))}

    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.load_or_build("s", {"x": 1}, slow_build)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and [g["value"].item() for g in got] == [1, 1]


def test_no_unsafe_loading_remains_in_the_package():
    for source in PACKAGE.rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        assert "weights_only=False" not in text and "pickle.load" not in text, source


class _Line(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)


def test_a_corrupted_checkpoint_starts_training_over_with_a_warning(tmp_path, caplog):
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    y = x.sum(1, keepdim=True)

    def loss_fn(model, batch, progress):
        return torch.nn.functional.mse_loss(model.linear(batch[0]), batch[1])

    checkpoint = tmp_path / "run.ckpt"
    checkpoint.write_bytes(b"PK\x03\x04 half of a zip file")
    with caplog.at_level(logging.WARNING):
        history = fit(_Line(), loss_fn, lambda epoch: [(x, y)], lambda m: 0.0, TrainConfig(epochs=2, patience=5),
                      seed=0, checkpoint=checkpoint)
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    assert "starting over" in caplog.text and str(checkpoint) in caplog.text
    saved = torch.load(checkpoint, weights_only=True)  # what it writes now is a sound checkpoint
    assert saved["state"]["epoch"] == 2


def _record_rows(run: str, writer: int, count: int) -> None:
    for i in range(count):
        row = {"notebook": "02", "experiment": f"writer{writer}", "method": "m", "variant": "", "dataset": "d",
               "gallery": 10, "direction": "t2i", "K": None, "seed": i, "R@1": float(i)}
        results.record(Path(run), [row])


def test_two_processes_recording_at_once_lose_no_row(tmp_path):
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_record_rows, args=(str(tmp_path), w, 150)) for w in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=60)
    assert [w.exitcode for w in writers] == [0, 0]
    table = results.read_summary(tmp_path)
    assert len(table) == 300 and table.groupby("experiment").size().tolist() == [150, 150]


def _write_flickr8k_lists(root: Path, encoding: str, prefix: str = "") -> None:
    names = [f"im{i}.png" for i in range(8)]
    lines = [f"{name}#{k}\ta café number {i} , take {k} ." for i, name in enumerate(names) for k in range(2)]
    (root / "Flickr8k.token.txt").write_bytes((prefix + "\n".join(lines) + "\n").encode(encoding))
    (root / "Flickr_8k.trainImages.txt").write_bytes((prefix + "\n".join(names[:6])).encode(encoding))


def test_a_byte_order_mark_does_not_eat_the_first_caption(tiny_real):
    root = Path(tiny_real.data_dir)
    _write_flickr8k_lists(root, "utf-8", prefix="\ufeff")
    train = load_real_dataset("flickr8k", root, 64)["train"]
    first = train.image_ids.index("im0.png")
    assert train.captions_of(first) == ["a café number 0 , take 0 .", "a café number 0 , take 1 ."]


def test_a_captions_file_that_is_not_utf8_names_its_file_and_line(tiny_real):
    root = Path(tiny_real.data_dir)
    _write_flickr8k_lists(root, "latin-1")
    with pytest.raises(ValueError, match=r"Flickr8k.token.txt line 1 \(byte 15\) is not UTF-8"):
        load_real_dataset("flickr8k", root, 64)


def test_a_data_dir_that_is_a_file_says_so(tmp_path):
    not_a_folder = tmp_path / "flickr8k.zip"
    not_a_folder.write_bytes(b"zip")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder: .*flickr8k.zip"):
        load_real_dataset("flickr8k", not_a_folder, 64)
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        load_image_folder(not_a_folder, "train", 64)


def test_no_readable_images_names_the_split(tmp_path):
    with pytest.raises(ValueError, match="no readable images for mine/val"):
        read_resized_images([tmp_path / "missing.png"], 8, where=str(tmp_path), desc="mine/val")
