"""Every loss of the study, in one place: the Fast model's contrastive loss, the Slow model's
training objectives and the distillation losses (TFS, DCD) of a student."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fastslow.config import CrossAttentionConfig, DistillConfig
from fastslow.inputs import PAD_ID, FeatureImages
from fastslow.models.cross_attention import (
    CrossAttentionModel,
    itm_negatives,
    mean_token_log_prob,
    teacher_forcing,
)


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


def look_alike_loss(
    model: CrossAttentionModel,
    tokens: torch.Tensor,
    own_scores: torch.Tensor,
    negative_images: torch.Tensor | FeatureImages,
) -> torch.Tensor:
    """Listwise cross-entropy of each caption's captioning score under its own image against its
    scores under M look-alike images: ``-log softmax([s(t, v), s(t, v_1), .., s(t, v_M)])[0]``.

    Likelihood alone rewards a caption wherever it is plausible; this term asks that it be more
    likely under its own image than under images a Fast model finds similar (ALBEF's and BLIP's
    hard negatives). ``own_scores``: ``(B,)`` :meth:`CrossAttentionModel.score_pairs` scores of the
    matched pairs; ``negative_images``: B x M images as the image tower reads them, row-major
    (caption b's look-alikes are rows b*M .. b*M+M-1), encoded and projected to keys and values
    once each.
    """
    pairs = len(tokens)
    if len(negative_images) % pairs:
        raise ValueError(f"{len(negative_images)} look-alikes for {pairs} captions: not M each")
    per_caption = len(negative_images) // pairs
    # On their own through the image tower: a trained tower's batch norm then normalises the
    # positives exactly as it would without look-alikes.
    keys_values = model.visual_keys_values(model.encode_images(negative_images))
    images = torch.arange(pairs * per_caption, device=tokens.device)
    captions = torch.arange(pairs, device=tokens.device).repeat_interleave(per_caption)
    negative_scores = model.score_pairs(tokens, keys_values, images, captions[:, None])
    scores = torch.cat([own_scores[:, None], negative_scores.view(pairs, per_caption)], dim=1)
    return F.cross_entropy(scores, torch.zeros(pairs, dtype=torch.long, device=tokens.device))


def cross_attention_loss(
    twin: np.ndarray, negative_weight: float = CrossAttentionConfig.negative_weight
):
    """The training loss of a Slow model, by its objective: captioning likelihood of the matched
    pairs (token-averaged, summed over the decoders' directions), or ITM's binary cross-entropy
    over each matched pair, its hard negative and a random one
    (:func:`~fastslow.models.cross_attention.itm_negatives`; ``twin`` of the training split).

    A captioning batch that carries ``negative_images`` (mined look-alikes) adds
    ``negative_weight`` (:attr:`CrossAttentionConfig.negative_weight`) x :func:`look_alike_loss`,
    logged as ``look_alike``; its pairs' own scores come from the likelihood's forward pass.
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
        negative_images = batch.get("negative_images")
        losses = {}
        own_scores = torch.zeros(len(tokens), device=tokens.device)
        for direction in model.directions:
            inputs, targets = teacher_forcing(tokens, direction)
            states, _ = model.decoder_states(direction, inputs, keys_values[direction])
            logits = model.decoders[direction].head(states)
            losses[direction] = captioning_nll(logits, targets[:, None])
            if negative_images is not None:  # the score_pairs score of each matched pair
                own_scores = own_scores + mean_token_log_prob(logits, targets[:, None])[:, 0]
        extras = {f"nll_{d}": v.item() for d, v in losses.items()}
        loss = sum(losses.values())
        if negative_images is not None:
            # Computed at weight 0 too: a control run then logs the same curve as a weighted one.
            look_alike = look_alike_loss(model, tokens, own_scores, negative_images)
            loss = loss + negative_weight * look_alike
            extras["look_alike"] = look_alike.item()
        return loss, extras

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


def matching_loss(model, batch: dict, progress: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The matching Slow model's loss (:class:`~fastslow.models.matching.MatchingModel`): CLIP's
    contrastive loss over every (caption, image) pair of the batch, scored by the Slow model.

    The batches (:class:`fastslow.negatives.LookAlikeBatches`) hold groups of Fast look-alikes, so
    each caption meets its image's hard negatives among the batch's random ones, and each image
    the look-alikes' captions; random negatives keep the easy cases learnt (mined ones alone left
    an earlier matching model's loss at its starting value for 250 steps)."""
    pairs = len(batch["tokens"])
    keys_values = model.visual_keys_values(model.encode_images(batch["images"]))
    everyone = torch.arange(pairs, device=batch["tokens"].device)
    logits = model.score_pairs(batch["tokens"], keys_values, everyone, everyone[None]).T
    targets = everyone
    t2i, i2t = F.cross_entropy(logits, targets), F.cross_entropy(logits.T, targets)
    return 0.5 * (t2i + i2t), {"t2i": t2i.item(), "i2t": i2t.item()}
