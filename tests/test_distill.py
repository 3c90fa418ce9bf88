"""Distillation losses and batching on hand-made score matrices."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from fastslow import distill, losses, stages
from fastslow.config import DataConfig, DistillConfig, TrainConfig, make_config
from fastslow.models.cross_attention import CrossAttentionModel, pair_scores, visual_tokens
from fastslow.losses import dcd_sample_weights, distillation_kl, symmetric_info_nce


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


def test_the_tfs_term_is_zero_when_the_student_matches_the_softened_teacher_on_its_candidates():
    config = DistillConfig(tfs_candidates=3, tfs_temperature=2.0)
    teacher = torch.tensor([[1.0, 0.2, -0.5, 3.0], [0.5, 0.4, 0.1, 0.0]])
    candidates = torch.tensor([[0, 2, 3, 1], [1, 0, 3, 2]])
    logits = torch.zeros(2, 4)
    logits.scatter_(1, candidates, teacher / 2.0 + 5.0)  # a row's shift changes no softmax
    term, _ = losses.tfs_distillation(config, logits, candidates, teacher)
    assert term.item() == pytest.approx(0.0, abs=1e-6)
    logits[0, 3] += 1.0  # caption 0's third candidate (position 3) is among the first three
    assert losses.tfs_distillation(config, logits, candidates, teacher)[0].item() > 1e-3


def test_dcd_weights_are_each_rows_share_of_the_teacher_entropy_as_in_the_official_code():
    teacher = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # KD_loss.distillation_loss: t_entropy = sum(p log p) per row / sum(p log p) over the batch.
    uniform, skewed = -math.log(2.0), 0.75 * math.log(0.75) + 0.25 * math.log(0.25)
    expected = torch.tensor([uniform, skewed]) / (uniform + skewed)
    torch.testing.assert_close(dcd_sample_weights(teacher), expected)
    assert dcd_sample_weights(teacher)[0] > dcd_sample_weights(teacher)[1]  # the unsure row weighs most


def official_dcd_loss(student: torch.Tensor, teacher: torch.Tensor, alpha: float = 0.2) -> torch.Tensor:
    """raojay7/DCD's KD_loss.distillation_loss at T = 1 on kept candidates (the positive first)."""
    t_probs = torch.softmax(teacher, dim=1)
    t_entropy = (t_probs * torch.log(t_probs)).sum(1)
    t_entropy = t_entropy / (t_probs * torch.log(t_probs)).sum()
    r_t_weight = torch.softmax((1 - t_entropy) ** 2, dim=0)
    d_loss = (torch.nn.functional.mse_loss(teacher, student) * r_t_weight).sum()
    label = torch.zeros(student.shape[1])
    label[0] = 1
    nll = sum(torch.nn.functional.binary_cross_entropy_with_logits(student[i], label) * t_entropy[i]
              for i in range(len(student)))
    return alpha * d_loss + (1 - alpha) * nll


def test_dcd_keeps_the_positive_and_the_teachers_hardest_and_scores_them_as_the_official_code():
    config = DistillConfig(dcd_kept=2)
    # Five candidates per caption (batch positions), the positive first; the teacher's two
    # highest-scored negatives are columns 3 and 2 for caption 0 (batch positions 3 and 1), columns
    # 2 and 4 for caption 1 (batch positions 0 and 2).
    candidates = torch.tensor([[0, 2, 1, 3, 4], [1, 4, 0, 3, 2]])
    teacher = torch.tensor([[-1.0, -4.0, -3.0, -2.0, -5.0], [-2.0, -6.0, -1.0, -7.0, -3.0]])
    logits = torch.randn(2, 5, generator=torch.Generator().manual_seed(0)).requires_grad_()
    loss, _ = losses.dcd_distillation(config, logits, candidates, teacher)
    loss.backward()
    assert (logits.grad[0] != 0).tolist() == [True, True, False, True, False]
    assert (logits.grad[1] != 0).tolist() == [True, True, True, False, False]
    # Where the kept scores are centred already, ours is the official loss exactly.
    kept_teacher = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, -1.0]])
    kept_student = torch.tensor([[2.0, -1.0, -1.0], [0.0, 1.0, -1.0]])
    ours, _ = losses.dcd_distillation(config, kept_student, torch.arange(3).expand(2, 3), kept_teacher)
    assert ours.item() == pytest.approx(official_dcd_loss(kept_student, kept_teacher).item(), rel=1e-5)


def test_the_control_is_the_dual_encoder_and_loses_nothing_by_name():
    logits = torch.randn(6, 6)
    loss, extras = losses.distillation_loss("control", DistillConfig(), logits, torch.zeros(6, 2, dtype=torch.long), torch.randn(6, 2))
    assert loss.item() == pytest.approx(symmetric_info_nce(logits).item())
    assert extras == {}


def test_in_batch_mining_puts_each_captions_image_first_then_its_look_alikes():
    texts = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=1)
    images = torch.nn.functional.normalize(torch.tensor([[0.0, 1.0], [1.0, 0.1], [1.0, 0.9]]), dim=1)
    mined = distill.mine_in_batch(texts, images, candidates=3)
    assert mined.tolist() == [[0, 1, 2], [1, 0, 2], [2, 1, 0]]
    assert distill.mine_in_batch(texts, images, candidates=8).shape == (3, 3)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTSLOW_CACHE", str(cache))
        cfg = dataclasses.replace(
            make_config("smoke"), data=DataConfig(n_train=96, n_val=16, n_test=16, image_size=32),
            train_dual=TrainConfig(epochs=2, batch_size=32, patience=2),
            distill=dataclasses.replace(make_config("smoke").distill, candidates=4, tfs_candidates=3, dcd_kept=2),
        )
        data = stages.load_study(cfg)
        fast = stages.train_or_load_dual_encoder(cfg, data)
        teacher = stages.build_seeded(lambda: CrossAttentionModel(data.tokenizer.vocab_size, cfg.cross, 32), 0).eval()
        slow = stages.Trained(teacher, {"epochs": []}, "teacher", 0.0)
        yield cfg, data, fast, slow


def test_a_student_with_its_term_weighted_zero_is_the_dual_encoder_of_its_seed(tiny_study):
    cfg, data, fast, slow = tiny_study
    off = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, tfs_weight=0.0))
    for seed in (0, 1):
        student = stages.train_or_load_student(off, data, "tfs", seed, fast=fast, slow=slow)
        control = stages.train_or_load_student(off, data, "control", seed, fast=fast, slow=slow)
        assert control.config_hash == stages.train_or_load_dual_encoder(dataclasses.replace(cfg, seed=seed), data).config_hash
        for name, value in control.model.state_dict().items():
            torch.testing.assert_close(student.model.state_dict()[name], value, msg=name)
    on = stages.train_or_load_student(cfg, data, "tfs", 0, fast=fast, slow=slow)
    differs = any(not torch.equal(on.model.state_dict()[n], v) for n, v in fast.model.state_dict().items())
    assert differs, "a weighted term changes the student"


def test_teacher_candidates_are_the_teachers_scores_of_the_mined_pairs_of_each_batch(tiny_study):
    cfg, data, fast, slow = tiny_study
    teacher = stages.TeacherCandidates(cfg, data, fast, slow)
    epoch = teacher.epoch(seed=1, epoch=1)
    batches = stages.dual_encoder_batches(cfg, data, 1, 1)
    assert epoch["candidates"].shape == epoch["scores"].shape == (len(batches), 32, 4)
    assert (epoch["candidates"][:, :, 0] == torch.arange(32)).all()
    first = next(iter(batches))
    images = first["image_index"][epoch["candidates"][0]]
    gallery = visual_tokens(slow.model, data.visual["train"])
    expected = pair_scores(slow.model, gallery, first["tokens"], images)
    torch.testing.assert_close(epoch["scores"][0], expected)
    assert not torch.equal(epoch["candidates"], teacher.epoch(seed=0, epoch=1)["candidates"])


def test_a_students_cache_key_holds_its_own_terms_settings_only():
    cfg = make_config("smoke")

    def key(distill_cfg, method):
        changed = dataclasses.replace(cfg, distill=distill_cfg)
        return distill.distillation_key(changed, "student", "fast", "teacher", method)

    base = cfg.distill
    for unrelated in ({"seeds": (5,)}, {"finetune_lr": 1.0}, {"dcd_kept": 3}):
        assert key(dataclasses.replace(base, **unrelated), "tfs") == key(base, "tfs"), unrelated
    assert key(dataclasses.replace(base, tfs_weight=0.7), "tfs") != key(base, "tfs")
    assert key(dataclasses.replace(base, tfs_weight=0.7), "dcd") == key(base, "dcd")


def test_fine_tuning_starts_from_the_fast_model_and_keeps_it_when_no_epoch_beats_it(tiny_study):
    cfg, data, fast, slow = tiny_study
    start_score = stages.dual_encoder_validation(data, cfg.device)(fast.model)
    tuned = stages.train_or_load_finetuned(cfg, data, "tfs", fast=fast, slow=slow)
    epochs = tuned.history["epochs"]
    assert epochs[0]["epoch"] == 0 and epochs[0]["val_score"] == pytest.approx(start_score)
    assert len(epochs) == 1 + cfg.distill.finetune_epochs
    kept_start = max(e["val_score"] for e in epochs[1:]) <= start_score
    unchanged = all(torch.equal(tuned.model.state_dict()[n], v) for n, v in fast.model.state_dict().items())
    assert unchanged == kept_start
    without_teacher = stages.train_or_load_finetuned(cfg, data, "control", fast=fast, slow=slow)
    assert without_teacher.config_hash != tuned.config_hash
    with pytest.raises(ValueError, match="unknown distillation method"):
        stages.train_or_load_finetuned(cfg, data, "kd", fast=fast, slow=slow)


def test_compare_to_gives_each_models_paired_difference_from_the_baseline():
    ranks = {"start": np.array([1, 2, 1, 3, 1, 2]), "better": np.array([1, 1, 1, 1, 1, 2])}
    table = distill.compare_to(ranks, baseline="start")
    assert table.loc["start", "R@1"] == pytest.approx(50.0)
    assert table.loc["better", "R@1"] == pytest.approx(500 / 6)
    assert table.loc["better", "difference"] == pytest.approx(500 / 6 - 50.0)
    assert table.loc["better", "low"] >= 0.0 and np.isnan(table.loc["start", "difference"])
