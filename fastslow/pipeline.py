"""One function per stage of the study, each a single line in a notebook.

Each stage loads the cached artifact for its exact config or trains and saves it
(:func:`fastslow.cache.load_or_build`): a notebook run on its own trains what it needs, and one run
after its predecessors reuses their artifacts.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fastslow import distill, metrics
from fastslow.cache import artifact_path, config_hash, load_or_build
from fastslow.config import StudyConfig
from fastslow.data import CaptionedImages, WordTokenizer, load_dataset
from fastslow.data.batches import PairBatches, headline_queries
from fastslow.losses import captioning_nll, itm_bce, symmetric_info_nce
from fastslow.models.dual_encoder import DualEncoder, embed_images, embed_texts
from fastslow.models.cross_attention import (
    CrossAttentionModel,
    hard_negative_partners,
    keep_twins_together,
    pair_scores,
    teacher_forcing,
    visual_tokens,
)
from fastslow.train import fit

log = logging.getLogger(__name__)


@dataclass
class Study:
    """The data a stage works on: splits, the tokenizer fitted on the training captions, and the
    tokenised captions of each split."""

    config: StudyConfig
    splits: dict[str, CaptionedImages]
    tokenizer: WordTokenizer
    tokens: dict[str, torch.Tensor]

    @property
    def test(self) -> CaptionedImages:
        return self.splits["test"]

    def headline_queries(self) -> np.ndarray:
        """The test captions every method's ``headline`` row is scored on."""
        return headline_queries(self.test, self.config.headline_captions_per_image)


def study(cfg: StudyConfig) -> Study:
    splits = load_dataset(cfg.data)
    tokenizer = WordTokenizer.fit(splits["train"].captions)
    max_tokens = cfg.dual.encoder.max_caption_tokens
    tokens = {name: tokenizer.encode(split.captions, max_len=max_tokens) for name, split in splits.items()}
    return Study(cfg, splits, tokenizer, tokens)


@dataclass
class Trained:
    """A trained model with what produced it."""

    model: nn.Module
    history: dict[str, list[dict[str, float]]]
    config_hash: str
    train_seconds: float


def train_or_load(
    stage: str,
    key: Any,
    make_model,
    loss_fn,
    epoch_batches,
    validate,
    train_config,
    *,
    seed: int,
    device: str,
) -> Trained:
    """Load ``stage``'s cached weights for ``key``, or train them with :func:`fastslow.train.fit`."""

    def build() -> dict[str, Any]:
        model = make_model()
        started = time.perf_counter()
        history = fit(
            model,
            loss_fn,
            epoch_batches,
            validate,
            train_config,
            seed=seed,
            device=device,
            checkpoint=artifact_path(stage, key, ".ckpt"),
            desc=stage,
        )
        seconds = time.perf_counter() - started
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        return {"state": state, "history": history, "train_seconds": seconds}

    artifact = load_or_build(stage, key, build)
    artifact_path(stage, key, ".ckpt").unlink(missing_ok=True)
    model = make_model()
    model.load_state_dict(artifact["state"])
    model.to(device).eval()
    return Trained(model, artifact["history"], config_hash(key), artifact["train_seconds"])


def dual_encoder_scores(model: DualEncoder, split: CaptionedImages, tokens: torch.Tensor, device: str) -> torch.Tensor:
    """``(captions, images)`` cosine similarities of the Fast model over a whole split."""
    return embed_texts(model, tokens, device) @ embed_images(model, split.images, device).T


def dual_encoder_key(cfg: StudyConfig) -> dict[str, Any]:
    return {"data": cfg.data, "model": cfg.dual, "train": cfg.train_dual, "seed": cfg.seed}


def dual_encoder(cfg: StudyConfig, data: Study | None = None) -> Trained:
    """The Fast model trained with symmetric InfoNCE, early-stopped on validation RSUM."""
    data = data or study(cfg)
    train, val = data.splits["train"], data.splits["val"]

    def contrastive(model: DualEncoder, batch: dict[str, torch.Tensor], progress: float) -> torch.Tensor:
        return symmetric_info_nce(model(batch["images"], batch["tokens"]))

    return train_or_load(
        "dual_encoder",
        dual_encoder_key(cfg),
        lambda: DualEncoder(data.tokenizer.vocab_size, cfg.dual, cfg.data.image_size),
        contrastive,
        lambda epoch: PairBatches(train, data.tokens["train"], cfg.train_dual.batch_size, cfg.seed, epoch),
        dual_encoder_validation(data, cfg.device),
        cfg.train_dual,
        seed=cfg.seed,
        device=cfg.device,
    )


def dual_encoder_validation(data: Study, device: str):
    """Validation RSUM of a dual encoder: what early stopping and model choice watch."""
    val = data.splits["val"]

    def validation_rsum(model: DualEncoder) -> float:
        scores = dual_encoder_scores(model, val, data.tokens["val"], device)
        return metrics.rsum(metrics.retrieval_metrics(scores, val.caption_image))

    return validation_rsum


def distilled_dual_encoder(cfg: StudyConfig, data: Study, method: str, seed: int, fast: Trained, slow: Trained) -> Trained:
    """The dual encoder ``fast`` fine-tuned with ``method`` ("tfs", "dcd", or "none": no teacher)
    from the Slow model ``slow``, on fixed hard batches (:mod:`fastslow.distill`)."""
    if method not in distill.METHODS:
        raise ValueError(f"unknown distillation method {method!r}; choose one of {', '.join(distill.METHODS)}")
    train = data.splits["train"]
    prepared = distill.prepare(cfg, data, fast.model, slow.model, fast.config_hash, slow.config_hash)
    key = distill.distillation_key(cfg, fast.config_hash, slow.config_hash, method, seed)

    def make_model() -> DualEncoder:
        model = DualEncoder(data.tokenizer.vocab_size, cfg.dual, cfg.data.image_size)
        model.load_state_dict(fast.model.state_dict())
        return model

    def loss_fn(model: DualEncoder, batch: dict[str, torch.Tensor], progress: float):
        logits = model(batch["images"], batch["tokens"])
        return distill.student_loss(method, cfg.distill, logits, batch["teacher"], progress)

    def epoch_batches(epoch: int) -> distill.DistillBatches:
        return distill.DistillBatches(
            train, data.tokens["train"], prepared["batches"], prepared["captions"], prepared["teacher_scores"], seed, epoch
        )

    return train_or_load(
        f"distilled_{method}",
        key,
        make_model,
        loss_fn,
        epoch_batches,
        dual_encoder_validation(data, cfg.device),
        cfg.distill.train,
        seed=seed,
        device=cfg.device,
    )


def cross_attention_key(cfg: StudyConfig, **variant) -> dict[str, Any]:
    """What a Slow model depends on; ``variant`` overrides fields of ``cfg.cross``
    (``upsample_steps``, ``objective``), so each ablation variant has its own cache entry."""
    return {"data": cfg.data, "model": dataclasses.replace(cfg.cross, **variant), "train": cfg.train_cross, "seed": cfg.seed}


def cross_attention_scores(
    model: CrossAttentionModel, split: CaptionedImages, tokens: torch.Tensor, device: str, queries: np.ndarray | None = None
) -> torch.Tensor:
    """``(queries, images)`` Slow scores of captions ``queries`` (all when None) against every image
    of the split: the gallery's visual tokens once, then every pair."""
    queries = np.arange(split.num_captions) if queries is None else np.asarray(queries)
    gallery = visual_tokens(model, split.images, device)
    everyone = torch.arange(len(split)).expand(len(queries), len(split))
    return pair_scores(model, gallery, tokens[torch.as_tensor(queries)], everyone)


def cross_attention_validation(data: Study, device: str, n_images: int):
    """Validation RSUM of a Slow model on the first caption of the first ``n_images`` validation
    images against those images (the Slow model scores every pair, so the whole split would cost
    more than an epoch of training)."""
    val = data.splits["val"]
    n_images = min(n_images, len(val))
    queries = headline_queries(val, 1)[:n_images]
    gallery = val.subset(np.arange(n_images))

    def validation_rsum(model: CrossAttentionModel) -> float:
        scores = cross_attention_scores(model, gallery, data.tokens["val"], device, queries)
        return metrics.rsum(metrics.retrieval_metrics(scores, val.caption_image[queries]))

    return validation_rsum


def cross_attention_loss(twin: np.ndarray):
    """The training loss of a Slow model, by its objective: captioning likelihood of the matched
    pairs (summed over the decoders' directions), or ITM's binary cross-entropy over each matched
    pair and one hard negative (:func:`~fastslow.models.cross_attention.hard_negative_partners`)."""

    def loss_fn(model: CrossAttentionModel, batch: dict[str, torch.Tensor], progress: float):
        tokens = batch["tokens"]
        keys_values = model.visual_keys_values(model.encode_images(batch["images"]))
        if model.objective == "itm":
            pairs = torch.arange(len(tokens), device=tokens.device)
            negatives = hard_negative_partners(batch["image_index"].cpu(), twin).to(tokens.device)
            logits = model.score_pairs(tokens, keys_values, torch.cat([pairs, pairs]), torch.cat([pairs, negatives])[:, None]).squeeze(1)
            matches = torch.cat([torch.ones_like(pairs), torch.zeros_like(pairs)])
            return itm_bce(logits, matches)
        losses = {}
        for direction in model.directions:
            inputs, targets = teacher_forcing(tokens, direction)
            states, _ = model.decoder_states(direction, inputs, keys_values[direction])
            losses[direction] = captioning_nll(model.decoders[direction].head(states), targets)
        return sum(losses.values()), {f"nll_{d}": v.item() for d, v in losses.items()}

    return loss_fn


def cross_attention(cfg: StudyConfig, data: Study | None = None, **variant) -> Trained:
    """The Slow model (``cfg.cross`` with ``variant`` overrides: ``upsample_steps``, ``objective``),
    trained by ``cfg.train_cross`` and early-stopped on validation RSUM."""
    data = data or study(cfg)
    model_config = dataclasses.replace(cfg.cross, **variant)
    train = data.splits["train"]

    def epoch_batches(epoch: int) -> PairBatches:
        batches = PairBatches(train, data.tokens["train"], cfg.train_cross.batch_size, cfg.seed, epoch)
        if model_config.objective == "itm":  # twins share batches, so each can be the other's negative
            batches.order = keep_twins_together(batches.order, train.twin)
        return batches

    return train_or_load(
        "cross_attention",
        cross_attention_key(cfg, **variant),
        lambda: CrossAttentionModel(data.tokenizer.vocab_size, model_config, cfg.data.image_size),
        cross_attention_loss(train.twin),
        epoch_batches,
        cross_attention_validation(data, cfg.device, model_config.validation_images),
        cfg.train_cross,
        seed=cfg.seed,
        device=cfg.device,
    )
