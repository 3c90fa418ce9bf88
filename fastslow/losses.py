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


def tfs_distillation(
    config: DistillConfig, logits: torch.Tensor, candidates: torch.Tensor, teacher: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """TFS's term on a batch: ``lambda * KL(softmax(T / tau) || softmax(S))`` over each caption's
    first ``config.tfs_candidates`` candidates. The student's logits ``S`` carry their own learned
    temperature (CLIP's logit scale), so only the teacher's scores are softened by ``tau``
    (Hinton et al. divide both and multiply by ``tau^2``; with a learned student scale that would
    scale its logits twice). ``logits``: the student's ``(B, B)`` caption-by-image logits;
    ``candidates``: ``(B, C)`` batch positions of each caption's candidates, ``teacher`` their
    ``(B, C)`` teacher scores."""
    kept = config.tfs_candidates
    student = logits.gather(1, candidates[:, :kept])
    kl = distillation_kl(student, teacher[:, :kept], teacher_temperature=config.tfs_temperature)
    return config.tfs_weight * kl, {"kl": kl.item()}


def dcd_sample_weights(teacher: torch.Tensor) -> torch.Tensor:
    """DCD's per-caption weights (its code's ``t_weight``): each row's teacher entropy over its kept
    candidates (softmax of the scores, temperature 1) as a share of the batch's total, so the rows
    the teacher is least sure about weigh most and the weights sum to 1."""
    probs = torch.softmax(teacher, dim=-1)
    negative_entropy = (probs * probs.clamp_min(1e-12).log()).sum(-1)
    return negative_entropy / negative_entropy.sum()


def dcd_kept_columns(teacher: torch.Tensor, kept: int) -> torch.Tensor:
    """DCD's teacher-picked candidates: per row, column 0 (the positive) and the ``kept`` columns of
    the others the teacher scores highest (its hardest negatives), as ``(B, 1 + kept)`` columns."""
    negatives = teacher[:, 1:].topk(min(kept, teacher.shape[1] - 1), dim=1).indices + 1
    return torch.cat([torch.zeros_like(negatives[:, :1]), negatives], dim=1)


def dcd_distillation(
    config: DistillConfig, logits: torch.Tensor, candidates: torch.Tensor, teacher: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """DCD's loss on a batch, as its official code computes it (``KD_loss.distillation_loss`` called
    by ``compute_irtr``, temperature 1): the teacher keeps each caption's positive (column 0 of
    ``candidates``) and its ``config.dcd_kept`` highest-scored negatives; over those,
    ``w * MSE(T, S) + (1 - w) * sum_i w_i BCE(S_i, [1, 0, ..., 0])`` with ``w`` =
    ``config.dcd_distillation_weight`` (0.2 there) and ``w_i`` :func:`dcd_sample_weights`.

    The code also weighs its MSE by a softmax over the rows, but multiplies an MSE already averaged
    to one number, so those weights sum out; we leave them out. Its scores are a matching head's
    logits for teacher and student alike; ours are a Slow model's scores and a dual encoder's
    scaled cosines, so the MSE compares them after subtracting each row's mean (what a softmax over
    the candidates ignores too)."""
    kept = dcd_kept_columns(teacher, config.dcd_kept)
    teacher_kept = teacher.gather(1, kept)
    student_kept = logits.gather(1, candidates.gather(1, kept))
    distillation = F.mse_loss(
        student_kept - student_kept.mean(-1, keepdim=True), teacher_kept - teacher_kept.mean(-1, keepdim=True)
    )
    labels = torch.zeros_like(student_kept)
    labels[:, 0] = 1.0
    per_row = F.binary_cross_entropy_with_logits(student_kept, labels, reduction="none").mean(-1)
    weights = dcd_sample_weights(teacher_kept)
    hard_labels = (weights * per_row).sum()
    w = config.dcd_distillation_weight
    extras = {"mse": distillation.item(), "hard_labels": hard_labels.item(),
              "weight_min": weights.min().item() * len(weights), "weight_max": weights.max().item() * len(weights)}
    return w * distillation + (1 - w) * hard_labels, extras


def distillation_loss(
    method: str, config: DistillConfig, logits: torch.Tensor, candidates: torch.Tensor, teacher: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """A student's loss on one batch: notebook 02's InfoNCE plus the method's distillation term
    (``control``: none). ``logits``: ``(B, B)`` caption-by-image; ``candidates`` and ``teacher``:
    :class:`fastslow.distill.DistillBatches`' fields."""
    contrastive = symmetric_info_nce(logits)
    if method == "control":
        return contrastive, {}
    term = {"tfs": tfs_distillation, "dcd": dcd_distillation}[method]
    distillation, extras = term(config, logits, candidates, teacher)
    return contrastive + distillation, {"contrastive": contrastive.item(), **extras}


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
