"""Config, cache, metrics, index, results table and the training loop."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fastslow import cache, metrics, results
from fastslow.batches import headline_queries
from fastslow.config import TrainConfig, config_hash, make_config
from fastslow.data.types import CaptionedImages
from fastslow.index import VectorIndex, recall_against_exact
from fastslow.train import fit


def test_unknown_names_are_rejected_with_the_name():
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        make_config("huge")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        make_config("smoke", dataset="mnist")
    with pytest.raises(ValueError, match="unknown backbone 'resnet'"):
        make_config("smoke", backbone="resnet")
    with pytest.raises(ValueError, match="needs data_dir"):
        make_config("smoke", dataset="flickr8k")


def test_profile_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("FASTSLOW_PROFILE", "smoke")
    assert make_config().profile == "smoke"
    assert make_config().run_name == "smoke-shapes"


def test_config_hash_changes_with_any_parameter():
    base = make_config("smoke")
    changed = dataclasses.replace(base, train_dual=dataclasses.replace(base.train_dual, lr=1e-4))
    assert config_hash(base) == config_hash(make_config("smoke"))
    assert config_hash(base) != config_hash(changed)


def test_load_or_build_rebuilds_only_for_a_new_config(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSLOW_CACHE", str(tmp_path))
    builds = []

    def build(value):
        builds.append(value)
        return {"value": value}

    assert cache.load_or_build("stage", {"x": 1}, lambda: build(1)) == {"value": 1}
    assert cache.load_or_build("stage", {"x": 1}, lambda: build(99)) == {"value": 1}
    assert cache.load_or_build("stage", {"x": 2}, lambda: build(2)) == {"value": 2}
    assert builds == [1, 2]
    assert not list(tmp_path.glob("*.tmp"))


def test_interrupted_build_leaves_no_artifact(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSLOW_CACHE", str(tmp_path))

    def failing_build():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.load_or_build("stage", {"x": 1}, failing_build)
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".lock"] == []  # the entry's lock file stays


def test_ranks_follow_the_standard_protocol():
    # 3 images, 2 captions each; caption_image = [0,0,1,1,2,2]
    caption_image = np.array([0, 0, 1, 1, 2, 2])
    scores = np.array(
        [
            [0.9, 0.1, 0.0],  # own image first
            [0.1, 0.9, 0.0],  # own image second
            [0.0, 0.8, 0.1],  # first
            [0.0, 0.1, 0.8],  # second
            [0.5, 0.4, 0.3],  # third
            [0.1, 0.2, 0.3],  # first
        ]
    )
    np.testing.assert_array_equal(metrics.text_to_image_ranks(scores, caption_image), [1, 2, 1, 2, 3, 1])
    # image 0: its captions score 0.9, 0.1; others 0.0, 0.0, 0.5, 0.1 -> best rank 1
    # image 1: its captions score 0.8, 0.1; caption 1 of image 0 scores 0.9 -> best rank 2
    # image 2: its captions score 0.3, 0.3; others 0.0, 0.0, 0.1, 0.8 -> ties count against: rank 3
    np.testing.assert_array_equal(metrics.image_to_text_ranks(scores, caption_image), [1, 2, 3])
    summary = metrics.retrieval_metrics(scores, caption_image)
    assert summary["t2i"]["R@1"] == pytest.approx(50.0)
    assert summary["t2i"]["MdR"] == 1.5
    assert summary["RSUM"]["RSUM"] == pytest.approx(50 + 100 + 100 + 100 / 3 + 100 + 100)


def test_constant_scores_do_not_look_good():
    caption_image = np.repeat(np.arange(10), 2)
    summary = metrics.retrieval_metrics(np.zeros((20, 10)), caption_image)
    assert summary["t2i"]["R@1"] == 0.0
    assert summary["i2t"]["R@1"] == 0.0


def test_exact_index_matches_brute_force_and_survives_save_load(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((500, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:20] + 0.1 * rng.standard_normal((20, 16)).astype(np.float32)
    brute = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    index = VectorIndex.build(vectors, "Flat")
    _, ids = index.search(queries, 10)
    assert recall_against_exact(ids, brute) == 1.0
    index.save(tmp_path / "gallery.faiss")
    _, loaded_ids = VectorIndex.load(tmp_path / "gallery.faiss").search(queries, 10)
    np.testing.assert_array_equal(ids, loaded_ids)
    hnsw = VectorIndex.build(vectors, "HNSW32")
    _, approx = hnsw.search(queries, 10)
    assert 0.5 < recall_against_exact(approx, brute) <= 1.0
    with pytest.raises(FileNotFoundError, match="missing.faiss"):
        VectorIndex.load(tmp_path / "missing.faiss")


def test_summary_rows_are_replaced_not_duplicated(tmp_path):
    row = {"notebook": "02", "experiment": "headline", "method": "dual_encoder", "variant": "", "dataset": "shapes",
           "gallery": 100, "direction": "t2i", "K": None, "seed": 0, "R@1": 10.0}
    results.record(tmp_path, [row])
    results.record(tmp_path, [{**row, "R@1": 20.0}, {**row, "direction": "i2t", "R@1": 5.0}])
    table = results.read_summary(tmp_path)
    assert len(table) == 2
    assert table.set_index("direction").loc["t2i", "R@1"] == 20.0
    assert list(table.columns) == results.SUMMARY_COLUMNS
    with pytest.raises(ValueError, match="lack key columns"):
        results.record(tmp_path, [{"notebook": "02"}])


class _Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)


def _regression_task():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]])

    def loss_fn(model, batch, progress):
        inputs, targets = batch
        return torch.nn.functional.mse_loss(model.linear(inputs), targets)

    def epoch_batches(epoch):
        order = torch.randperm(64, generator=torch.Generator().manual_seed(epoch))
        return [(x[order[i : i + 16]], y[order[i : i + 16]]) for i in range(0, 64, 16)]

    def validate(model):
        return -torch.nn.functional.mse_loss(model.linear(x), y).item()

    return loss_fn, epoch_batches, validate


def test_fit_learns_and_resumes_from_its_checkpoint(tmp_path):
    loss_fn, epoch_batches, validate = _regression_task()
    config = TrainConfig(epochs=6, lr=0.05, patience=10, warmup_fraction=0.1)
    straight = _Regression()
    history = fit(straight, loss_fn, epoch_batches, validate, config, seed=0)
    assert history["epochs"][-1]["val_score"] > history["epochs"][0]["val_score"]

    # Interrupt after 3 epochs (the checkpoint holds them), then resume to 6.
    checkpoint = tmp_path / "run.ckpt"
    interrupted = _Regression()
    fit(interrupted, loss_fn, epoch_batches, validate, dataclasses.replace(config, epochs=3), seed=0, checkpoint=checkpoint)
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["state"]["epoch"] == 3
    saved["scheduler"]["base_lrs"] = [config.lr]
    resumed = _Regression()
    resumed_history = fit(resumed, loss_fn, epoch_batches, validate, config, seed=0, checkpoint=checkpoint)
    assert [e["epoch"] for e in resumed_history["epochs"]] == [1, 2, 3, 4, 5, 6]


def test_fit_with_weight_averaging_validates_and_keeps_the_moving_average():
    loss_fn, epoch_batches, _ = _regression_task()
    trained_weights = []  # the weights each step starts from, then the last step's result

    def recording_loss(model, batch, progress):
        trained_weights.append(model.linear.weight.detach().clone())
        return loss_fn(model, batch, progress)

    def validate(averaged):
        assert averaged is not model, "validation sees the average, not the training weights"
        trained_weights.append(model.linear.weight.detach().clone())
        return 0.0

    decay = 0.5
    model = _Regression()
    fit(model, recording_loss, epoch_batches, validate, TrainConfig(epochs=1, lr=0.05, weight_average=decay), seed=0)
    expected = trained_weights[0]
    for weights in trained_weights[1:]:  # each step's result enters the average once
        expected = decay * expected + (1 - decay) * weights
    torch.testing.assert_close(model.linear.weight, expected)
    assert not torch.allclose(model.linear.weight, trained_weights[-1]), "not the last step's weights"


class _Crash(Exception):
    pass


def test_fit_resumes_the_weight_average_from_its_checkpoint(tmp_path):
    loss_fn, epoch_batches, validate = _regression_task()
    config = TrainConfig(epochs=4, lr=0.05, patience=10, weight_average=0.9)
    straight = _Regression()
    fit(straight, loss_fn, epoch_batches, validate, config, seed=0)

    def crashing_loss(model, batch, progress):
        if progress >= 0.5:  # the first step of epoch 3: the checkpoint holds epochs 1 and 2
            raise _Crash
        return loss_fn(model, batch, progress)

    checkpoint = tmp_path / "run.ckpt"
    with pytest.raises(_Crash):
        fit(_Regression(), crashing_loss, epoch_batches, validate, config, seed=0, checkpoint=checkpoint)
    resumed = _Regression()
    fit(resumed, loss_fn, epoch_batches, validate, config, seed=0, checkpoint=checkpoint)
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, msg=name)


def test_fit_stops_early_when_validation_stalls():
    loss_fn, epoch_batches, _ = _regression_task()
    history = fit(_Regression(), loss_fn, epoch_batches, lambda model: 0.0, TrainConfig(epochs=10, patience=2), seed=0)
    assert len(history["epochs"]) == 3  # the first sets the best, two without improvement stop it


def test_fit_keeps_the_weights_it_starts_from_when_validated_first_and_no_epoch_beats_them():
    loss_fn, epoch_batches, _ = _regression_task()
    model = _Regression()
    start = {name: value.clone() for name, value in model.state_dict().items()}
    worse_each_epoch = iter(range(0, -100, -1))
    history = fit(model, loss_fn, epoch_batches, lambda m: next(worse_each_epoch), TrainConfig(epochs=3, lr=0.05),
                  seed=0, validate_start=True)
    assert [e["epoch"] for e in history["epochs"]] == [0, 1, 2, 3]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, start[name], msg=name)


def test_fit_with_batchnorm_frozen_leaves_its_running_statistics_alone():
    x = torch.randn(64, 4) * 3 + 5
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    before = model[1].running_mean.clone(), model[1].running_var.clone()

    def loss_fn(m, batch, progress):
        return m(batch).pow(2).mean()

    config = TrainConfig(epochs=2, lr=0.01)
    fit(model, loss_fn, lambda epoch: [x[:32], x[32:]], lambda m: 0.0, config, seed=0, freeze_batchnorm=True)
    assert torch.equal(model[1].running_mean, before[0]) and torch.equal(model[1].running_var, before[1])
    assert not torch.equal(model[1].weight, torch.ones(4)), "its scale still learns"
    fit(model, loss_fn, lambda epoch: [x[:32], x[32:]], lambda m: 0.0, config, seed=0)
    assert not torch.equal(model[1].running_mean, before[0])


def test_a_row_carries_its_interval_and_its_ranks(tmp_path):
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.1, 0.8], [0.3, 0.4, 0.2], [0.1, 0.0, 0.7]])
    measured = metrics.retrieval_metrics(scores, np.array([0, 1, 1, 2]))
    rows = results.metric_rows(measured, notebook="02", experiment="headline", method="dual_encoder", dataset="shapes",
                               gallery=measured["gallery"], seed=0)
    table = results.record(tmp_path, rows).set_index("direction")
    assert table.loc["t2i", "R@1"] == 75.0 and table.loc["t2i", "queries"] == 4 and table.loc["t2i", "gallery"] == 3
    assert table.loc["t2i", "R@1_lo"] <= 75.0 <= table.loc["t2i", "R@1_hi"]
    ranks = results.read_ranks(tmp_path, table.loc["t2i", "ranks"])
    assert ranks.tolist() == measured["ranks"]["t2i"].tolist() == [1, 3, 1, 1]


def test_headline_queries_take_each_images_captions_in_rounds():
    split = CaptionedImages(
        dataset="toy", split="test", images=np.zeros((3, 2, 2, 3), np.uint8),
        captions=["a", "b", "c", "d", "e"], caption_image=[0, 1, 0, 1, 2], image_ids=["0", "1", "2"],
        twin=-np.ones(3), twin_kind=[""] * 3, caption_kind=[""] * 5, skipped=[],
    )
    assert headline_queries(split, 1).tolist() == [0, 1, 4]
    assert headline_queries(split, 2).tolist() == [0, 1, 4, 2, 3]
