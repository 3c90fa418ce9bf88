"""Distillation losses and batching on hand-made score matrices."""

from __future__ import annotations

import numpy as np
import pytest
import dataclasses

import torch

from fastslow import distill, losses, stages
from fastslow.config import DataConfig, DistillConfig, TrainConfig, make_config
from fastslow.models.cross_attention import CrossAttentionModel
from fastslow.models.dual_encoder import DualEncoder
from fastslow.losses import distillation_kl, dynamic_sample_weights, keep_hardest_negatives, symmetric_info_nce


def test_kl_is_zero_when_the_student_equals_the_teacher():
    scores = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3], [0.2, 0.1, 3.0]])
    assert distillation_kl(scores, scores).item() == pytest.approx(0.0, abs=1e-6)
    # The same distribution reached through different temperatures is also a perfect match.
    assert distillation_kl(scores * 2, scores, student_temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_kl(scores.flip(1), scores).item() > 0.1


def test_kl_ignores_candidates_outside_the_kept_set():
    teacher = torch.tensor([[3.0, 1.0, float("-inf")]])
    student_a = torch.tensor([[3.0, 1.0, 50.0]])
    student_b = torch.tensor([[3.0, 1.0, -50.0]])
    assert distillation_kl(student_a, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_kl(student_b, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_hard_negative_selection_keeps_the_positive_and_the_teachers_top_k():
    teacher = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.7, 0.2],  # positive 0 scores lowest: still kept
            [0.3, 0.8, 0.1, 0.6, 0.4],  # positive 1 is the best: the two next negatives join it
        ]
    )
    keep = keep_hardest_negatives(teacher, torch.tensor([0, 1]), k=2)
    assert keep.tolist() == [
        [True, True, False, True, False],
        [False, True, False, True, True],
    ]
    assert keep.sum(1).tolist() == [3, 3]


def test_dynamic_weights_are_normalised_and_follow_the_teacher():
    confident = torch.tensor([0.97, 0.01, 0.01, 0.01])
    unsure = torch.tensor([0.25, 0.25, 0.25, 0.25])
    probs = torch.stack([confident, unsure, confident])
    for progress in (0.0, 0.3, 0.5, 0.9, 1.0):
        weights = dynamic_sample_weights(probs, progress)
        assert weights.mean().item() == pytest.approx(1.0)
    early, middle, late = (dynamic_sample_weights(probs, p) for p in (0.0, 0.5, 1.0))
    assert early[0] > early[1]  # early: the teacher's confident rows weigh most
    assert late[1] > late[0]  # late: its ambiguous rows weigh most
    assert torch.allclose(middle, torch.ones(3))
    changed = dynamic_sample_weights(torch.stack([unsure, unsure, confident]), 0.0)
    assert not torch.allclose(changed, early)


def test_the_control_run_has_no_teacher_term():
    logits = torch.randn(6, 6)
    teacher = torch.randn(6, 6)
    loss, extras = losses.distillation_loss("control", DistillConfig(), logits, teacher, 0.3)
    assert loss.item() == pytest.approx(symmetric_info_nce(logits).item())
    assert extras == {}


def test_tfs_and_dcd_pull_the_student_towards_the_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(8, 8) + 3 * torch.eye(8)
    config = DistillConfig(teacher_temperature=1.0, dcd_hard_negatives=3)
    for method in ("tfs", "dcd"):
        student = torch.zeros(8, 8, requires_grad=True)
        optimiser = torch.optim.SGD([student], lr=1.0)
        first = None
        for _ in range(50):
            loss, extras = losses.distillation_loss(method, config, student, teacher, 0.5)
            first = first if first is not None else extras["kl"]
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        assert extras["kl"] < 0.5 * first, method


def test_hard_batches_partition_images_into_neighbourhoods():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 8))
    points = np.repeat(centres, 16, axis=0) + 0.05 * rng.standard_normal((64, 8))
    embeddings = torch.nn.functional.normalize(torch.tensor(points, dtype=torch.float32), dim=1)
    batches = distill.hard_batches(embeddings, batch_size=16, seed=0)
    assert batches.shape == (4, 16)
    assert len(np.unique(batches)) == 64
    clusters = batches // 16
    assert all(len(np.unique(row)) == 1 for row in clusters)


def test_seeds_of_a_distillation_run_differ_in_batches_and_captions(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSLOW_CACHE", str(tmp_path))
    cfg = dataclasses.replace(
        make_config("smoke"), data=DataConfig(n_train=96, n_val=16, n_test=16, image_size=32),
        distill=dataclasses.replace(make_config("smoke").distill, train=TrainConfig(epochs=1, batch_size=16)),
    )
    data = stages.load_study(cfg)
    train = data.splits["train"]
    student = stages.build_seeded(lambda: DualEncoder(data.tokenizer.vocab_size, cfg.dual, 32), 0).eval()
    teacher = stages.build_seeded(lambda: CrossAttentionModel(data.tokenizer.vocab_size, cfg.cross, 32), 0).eval()
    first, second = (distill.prepare(cfg, data, student, teacher, "s", "t", seed) for seed in (0, 1))
    assert not np.array_equal(first["batches"], second["batches"])
    assert not np.array_equal(first["captions"], second["captions"])
    for prepared in (first, second):  # each seed still draws one caption of the right image
        assert all(train.caption_image[c] == i for i, c in enumerate(prepared["captions"]))
    again = distill.prepare(cfg, data, student, teacher, "s", "t", 0)
    assert np.array_equal(first["batches"], again["batches"])
