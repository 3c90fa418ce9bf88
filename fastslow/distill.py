"""Slow -> Fast distillation while the student learns: the TFS way (Miech et al. 2021) and the DCD
way (Rao et al. 2022).

The student is notebook 02's dual encoder trained with notebook 02's recipe (its initialisation for
a seed, its random batches, epochs, learning rate and early stopping on validation RSUM) plus a
distillation term. The control is the same run with the term off, which is notebook 02's dual
encoder of that seed (:func:`fastslow.stages.train_or_load_dual_encoder`): a difference between a
student and its control is the teacher's.

Candidates are in-batch and mined by the Fast model (notebook 02's dual encoder of the study's
seed): for each caption of a batch, its own image first, then the ``candidates - 1`` other images
of the batch the Fast model finds most similar to it (:func:`mine_in_batch`). The teacher scores
these pairs once per (seed, epoch), cached (:class:`fastslow.stages.TeacherCandidates`), so the TFS
and DCD runs of a seed share them. Only text-to-image is distilled: it is the direction both
papers report first, and a captioning teacher's image-to-text scores measure the caption's prior as
much as the match (notebook 03); the student's image-to-text side learns from its own InfoNCE.

The losses (:func:`fastslow.losses.tfs_distillation`, :func:`fastslow.losses.dcd_distillation`),
with ``S`` the student's scaled similarities over a caption's candidates and ``T`` the teacher's:

- TFS: ``InfoNCE + lambda * KL(softmax(T / tau) || softmax(S))`` over the first ``tfs_candidates``
  candidates (the positive and the Fast model's hardest in-batch negatives); the student's logits
  keep their own learned temperature.
- DCD, as its official code computes it (``compute_irtr`` and ``KD_loss.distillation_loss`` in
  raojay7/DCD): the teacher keeps the positive and its ``dcd_kept`` highest-scored negatives of the
  candidates; ``0.2 * MSE(T, S) + 0.8 * sum_i w_i BCE_i``, the hard labels' binary cross-entropy of
  each caption's kept candidates weighted by its share ``w_i`` of the batch's teacher entropy; added
  to the student's own InfoNCE.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pandas as pd
import torch

from fastslow.batches import PairBatches
from fastslow.config import DistillConfig, StudyConfig
from fastslow.intervals import paired_difference
from fastslow.metrics import rank_summary
from fastslow.losses import dcd_kept_columns, dcd_sample_weights


# "control": notebook 02's dual encoder (the same run with the distillation term off).
METHODS = ("control", "tfs", "dcd")
# The method words of summary.csv.
METHOD_NAMES = {"control": "control", "tfs": "distilled_tfs", "dcd": "distilled_dcd"}


# The settings each method's term reads: what its students' cache key holds of DistillConfig, so a
# change to one method's settings (or to the seeds) retrains no other student.
TERM_SETTINGS = {
    "control": (),
    "tfs": ("candidates", "tfs_candidates", "tfs_weight", "tfs_temperature"),
    "dcd": ("candidates", "dcd_kept", "dcd_distillation_weight"),
}


def mine_in_batch(
    text_embeddings: torch.Tensor, image_embeddings: torch.Tensor, candidates: int
) -> torch.Tensor:
    """``(B, candidates)`` batch positions: row ``i`` is caption ``i``'s own image ``i``, then the
    ``candidates - 1`` other images of the batch most similar to it (most similar first)."""
    similarity = text_embeddings @ image_embeddings.T
    similarity.fill_diagonal_(-torch.inf)
    size = len(similarity)
    hardest = similarity.topk(min(candidates, size) - 1, dim=1).indices
    return torch.cat([torch.arange(size)[:, None], hardest], dim=1)


class DistillBatches:
    """Notebook 02's batches of one epoch, each with its captions' candidates and teacher scores."""

    def __init__(self, pairs: PairBatches, teacher: dict[str, torch.Tensor]):
        self.pairs, self.teacher = pairs, teacher

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch, candidates, scores in zip(self.pairs, self.teacher["candidates"], self.teacher["scores"]):
            yield {**batch, "candidates": candidates, "teacher": scores}


def distillation_key(cfg: StudyConfig, student_key: Any, fast_key: str, teacher_key: str, method: str) -> dict[str, Any]:
    """What a student depends on: notebook 02's dual encoder config for its seed (``student_key``),
    the Fast model that mines the candidates, the teacher, the method and its term's settings."""
    settings = {name: getattr(cfg.distill, name) for name in TERM_SETTINGS[method]}
    return {"student": student_key, "fast": fast_key, "teacher": teacher_key, "distill": settings, "method": method}


def finetune_key(cfg: StudyConfig, fast_key: str, teacher_key: str, method: str) -> dict[str, Any]:
    """What a fine-tuned dual encoder depends on: the Fast model it starts from (which also mines
    the candidates), the teacher, the method with its term's settings, and the fine-tuning budget."""
    key = distillation_key(cfg, "starts from the Fast model", fast_key, teacher_key, method)
    return key | {"epochs": cfg.distill.finetune_epochs, "lr": cfg.distill.finetune_lr}


def compare_to(ranks: dict[str, Any], baseline: str) -> pd.DataFrame:
    """Text-to-image R@1 of each model's ``ranks`` (one array per model, the same queries in the
    same order) and its paired difference from ``baseline``'s (``difference``, in R@1 points), with
    the 95% interval (``low``, ``high``) and verdict."""
    rows = []
    for name, model_ranks in ranks.items():
        row = {"model": name, "R@1": rank_summary(model_ranks)["R@1"]}
        if name != baseline:
            difference = paired_difference(model_ranks, ranks[baseline], 1)
            row |= {"difference": difference.mean, "low": difference.lo, "high": difference.hi,
                    "verdict": difference.verdict}
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def candidates_summary(candidates: dict[str, torch.Tensor], config: DistillConfig) -> pd.DataFrame:
    """What the teacher says about one epoch's candidates (:meth:`fastslow.stages.TeacherCandidates.epoch`): how
    often it ranks the caption's own image first among all of them and among TFS's, and the spread
    of DCD's per-caption weights (times the batch size, so 1 is a batch's mean)."""
    scores = candidates["scores"]

    def own_image_first(columns: int) -> float:
        return 100.0 * (scores[..., :columns].argmax(-1) == 0).float().mean().item()

    weights = torch.cat([
        len(batch) * dcd_sample_weights(batch.gather(1, dcd_kept_columns(batch, config.dcd_kept)))
        for batch in scores
    ])
    return pd.DataFrame([{
        "captions": scores.shape[0] * scores.shape[1],
        "candidates": scores.shape[2],
        "teacher ranks own image first (%)": own_image_first(scores.shape[2]),
        f"... among TFS's first {config.tfs_candidates} (%)": own_image_first(config.tfs_candidates),
        "DCD weight min": weights.min().item(),
        "DCD weight median": weights.median().item(),
        "DCD weight max": weights.max().item(),
    }]).round(2)
