"""Every loss of the study, in one place: the Fast model's contrastive loss, the Slow model's
training objectives and the distillation losses (TFS, DCD) of a student."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fastslow.config import DistillConfig
from fastslow.inputs import PAD_ID
from fastslow.models.cross_attention import CrossAttentionModel, itm_negatives, teacher_forcing


def symmetric_info_nce(logits: torch.Tensor) -> torch.Tensor:
    """CLIP's contrastive loss for a ``(texts, images)`` logit matrix whose diagonal holds the pairs."""
    targets = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(softmax(teacher / tau_t) || softmax(student / tau_s)) per row, averaged (optionally weighted).

    Rows are queries, columns their candidates; ``-inf`` teacher logits mark candidates that are
    not part of a row's set (they get zero probability in both distributions). ``weights`` (one
    per row) are used as given: the caller normalises them.
    """
    excluded = torch.isinf(teacher_logits)
    teacher_log_probs = F.log_softmax(teacher_logits / teacher_temperature, dim=-1)
    student_log_probs = F.log_softmax(student_logits.masked_fill(excluded, float("-inf")) / student_temperature, dim=-1)
    teacher_probs = teacher_log_probs.exp()
    terms = teacher_probs * (teacher_log_probs - student_log_probs)
    per_row = terms.masked_fill(excluded, 0.0).sum(-1)
    if weights is not None:
        per_row = per_row * weights
    return per_row.mean()


def keep_hardest_negatives(teacher_scores: torch.Tensor, positives: torch.Tensor, k: int) -> torch.Tensor:
    """DCD's teacher-picked candidate set: a boolean mask keeping each row's positive and the ``k``
    negatives the teacher scores highest (the hardest ones)."""
    rows = torch.arange(len(teacher_scores), device=teacher_scores.device)
    negatives_only = teacher_scores.clone()
    negatives_only[rows, positives] = float("-inf")
    k = min(k, teacher_scores.shape[1] - 1)
    keep = torch.zeros_like(teacher_scores, dtype=torch.bool)
    keep.scatter_(1, negatives_only.topk(k, dim=1).indices, True)
    keep[rows, positives] = True
    return keep


def dynamic_sample_weights(teacher_probs: torch.Tensor, progress: float, sharpness: float = 2.0) -> torch.Tensor:
    """DCD-style dynamic weights, one per row, normalised to mean 1 over the batch.

    With ``h_i`` the teacher's entropy over row i's kept candidates divided by its maximum
    (``log`` of the number kept), and ``gamma(t) = sharpness * (1 - 2t)`` for training progress
    ``t`` in [0, 1]:  ``w_i = B * softmax_i(gamma(t) * (1 - h_i))``. Early on (gamma > 0) the rows the
    teacher is sure about weigh most: reliable knowledge first; late (gamma < 0) the rows it finds
    ambiguous (hard near-duplicates among the kept negatives) weigh most. At t = 0.5 all weights are 1.
    """
    present = teacher_probs > 0
    entropy = -(teacher_probs.clamp_min(1e-12).log() * teacher_probs).masked_fill(~present, 0.0).sum(-1)
    normalised = entropy / present.sum(-1).clamp_min(2).float().log()
    gamma = sharpness * (1.0 - 2.0 * progress)
    return len(teacher_probs) * torch.softmax(gamma * (1.0 - normalised), dim=0)


def captioning_nll(logits: torch.Tensor, targets: torch.Tensor, pad_id: int = PAD_ID) -> torch.Tensor:
    """Teacher-forced captioning loss: next-token cross-entropy averaged over the real (non-padding)
    target tokens of the batch. ``logits`` is ``(..., vocab)``, ``targets`` the matching ``(...)``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=pad_id)


def itm_bce(logits: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
    """Image-text matching: binary cross-entropy of one logit per pair against match (1) / not (0)."""
    return F.binary_cross_entropy_with_logits(logits, matches.float())


def cross_attention_loss(twin: np.ndarray):
    """The training loss of a Slow model, by its objective: captioning likelihood of the matched
    pairs (token-averaged, summed over the decoders' directions), or ITM's binary cross-entropy
    over each matched pair, its hard negative and a random one
    (:func:`~fastslow.models.cross_attention.itm_negatives`; ``twin`` of the training split).
    """

    def loss_fn(model: CrossAttentionModel, batch: dict[str, torch.Tensor], progress: float):
        tokens = batch["tokens"]
        keys_values = model.visual_keys_values(model.encode_images(batch["images"]))
        if model.objective == "itm":
            pairs = torch.arange(len(tokens), device=tokens.device)
            negatives = itm_negatives(batch["image_index"].cpu(), twin).to(tokens.device)
            logits = model.score_pairs(tokens, keys_values, pairs, torch.cat([pairs[:, None], negatives], 1))
            matches = torch.zeros_like(logits)
            matches[:, 0] = 1.0
            return itm_bce(logits, matches)
        losses = {}
        for direction in model.directions:
            inputs, targets = teacher_forcing(tokens, direction)
            states, _ = model.decoder_states(direction, inputs, keys_values[direction])
            losses[direction] = captioning_nll(model.decoders[direction].head(states), targets[:, None])
        return sum(losses.values()), {f"nll_{d}": v.item() for d, v in losses.items()}

    return loss_fn


def distillation_loss(
    method: str, config: DistillConfig, logits: torch.Tensor, teacher: torch.Tensor, progress: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """A student's loss on one batch (formulas in :mod:`fastslow.distill`): its own contrastive
    loss alone (``control``), plus the TFS KL term, or plus DCD's weighted KL over the
    teacher-picked hard candidates. ``teacher``: the teacher's scores of the batch's pairs."""
    contrastive = symmetric_info_nce(logits)
    if method == "control":
        return contrastive, {}
    teacher_logits = teacher / config.teacher_temperature
    if method == "tfs":
        kl = 0.5 * (distillation_kl(logits, teacher_logits) + distillation_kl(logits.T, teacher_logits.T))
        return config.tfs_alpha * contrastive + (1 - config.tfs_alpha) * kl, {"kl": kl.item()}
    diagonal = torch.arange(len(logits), device=logits.device)
    directions = []
    extras: dict[str, float] = {}
    for name, student, scores in (("t2i", logits, teacher_logits), ("i2t", logits.T, teacher_logits.T)):
        keep = keep_hardest_negatives(scores, diagonal, config.dcd_hard_negatives)
        kept_scores = scores.masked_fill(~keep, float("-inf"))
        weights = dynamic_sample_weights(torch.softmax(kept_scores, dim=-1), progress, config.dcd_sharpness)
        directions.append(distillation_kl(student, kept_scores, weights=weights))
        extras[f"weight_min_{name}"] = weights.min().item()
        extras[f"weight_max_{name}"] = weights.max().item()
    kl = 0.5 * (directions[0] + directions[1])
    extras["kl"] = kl.item()
    return config.dcd_alpha * contrastive + (1 - config.dcd_alpha) * kl, extras
