"""The study's stages, each one line in a notebook: load the data, train or load each model.

Each ``train_or_load_*`` loads the cached artifact for its exact config or trains and saves it
(:func:`fastslow.cache.load_or_build`): a notebook run on its own trains what it needs, and one run
after its predecessors reuses their artifacts. Every stage trains through
:func:`fastslow.train.fit`; what varies is the model, its loss and its batches.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fastslow import distill, distributed, metrics
from fastslow.batches import PairBatches, TwinNegativeBatches, headline_queries
from fastslow.cache import artifact_checksum, artifact_path, cache_root, load_or_build, record_path
from fastslow.config import OBJECTIVES, TOWER_INITS, StudyConfig, config_hash, make_config, typed_parameter
from fastslow.data import CaptionedImages, WordTokenizer, data_key, load_dataset
from fastslow.data.text import SpecialPieces, WordPieceVocabulary
from fastslow.features import extract_features, extraction_cost
from fastslow.inputs import MAX_CAPTION_TOKENS, FeatureImages
from fastslow.losses import (
    cross_attention_loss,
    distillation_loss,
    matching_loss,
    symmetric_info_nce,
)
from fastslow.models.cross_attention import CrossAttentionModel, keep_twins_together, pair_scores, visual_tokens
from fastslow.models.dual_encoder import DualEncoder, embed_images, embed_texts
from fastslow.models.encoders import frozen_tower_maps
from fastslow.models.matching import MatchingModel, SlowEnsemble
from fastslow.models.pretrained import minilm_word_table, text_backbone
from fastslow.negatives import LookAlikeBatches, NegativeBatches, NegativePools, mine_pools
from fastslow.scoring import cross_attention_scores, dual_encoder_scores
from fastslow.train import StepCost, fit, measuring_first_step


@dataclass
class Study:
    """The data a stage works on: splits, the tokenizer fitted on the training captions, and per
    split what the models read.

    ``tokens``: word ids of every caption (what the Slow model's caption decoders read).
    ``visual``: what the image towers read, indexed like the split's images: the uint8 images
    themselves (``tiny`` backbone) or their frozen EfficientNet-Lite0 features (``pretrained``).
    ``texts``: what the dual encoder's text side reads per caption: the word ids (``tiny``) or the
    frozen MiniLM sentence embeddings (``pretrained``).
    With ``pretrained``, also what its Slow models read (:meth:`slow_texts`): ``token_states``,
    MiniLM's ``(N, L, 384)`` token states, zero at padding (the matching model), and
    ``word_pieces``, MiniLM's word pieces as compact ids of ``vocabulary`` (the caption decoders).
    """

    config: StudyConfig
    splits: dict[str, CaptionedImages]
    tokenizer: WordTokenizer
    tokens: dict[str, torch.Tensor]
    visual: dict[str, np.ndarray | FeatureImages]
    texts: dict[str, torch.Tensor]
    token_states: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    word_pieces: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    vocabulary: WordPieceVocabulary | None = None
    # MiniLM's pass over the last new captions, and the captions (see _minilm).
    _last_minilm: tuple[tuple[str, ...], Any] | None = dataclasses.field(default=None, repr=False)

    @property
    def test(self) -> CaptionedImages:
        return self.splits["test"]

    def headline_queries(self) -> np.ndarray:
        """The test captions every method's ``headline`` row is scored on."""
        return headline_queries(self.test, self.config.headline_captions_per_image)

    def fast_texts(self, captions: list[str]) -> torch.Tensor:
        """New captions (a search box's query) as the dual encoder's text side reads them."""
        if self.config.dual.encoder.backbone == "pretrained":
            return self._minilm(captions).pooled
        return self.tokenizer.encode(captions, max_len=self.config.dual.encoder.max_caption_tokens)

    def slow_texts(self, split: str, reads: str) -> torch.Tensor:
        """Every caption of ``split`` as a Slow model reads it (its ``reads``): ``words`` (word
        ids), ``word_pieces`` (MiniLM's, compact ids) or ``token_states`` (MiniLM's)."""
        by_kind = {"words": self.tokens, "word_pieces": self.word_pieces, "token_states": self.token_states}
        return by_kind[reads][split]

    def slow_encoder(self, reads: str) -> Callable[[list[str]], torch.Tensor]:
        """What turns new captions (a search box's query) into what a Slow model reads."""
        if reads == "words":
            max_len = self.config.cross.encoder.max_caption_tokens
            if self.config.dual.encoder.backbone == "tiny" and max_len == self.config.dual.encoder.max_caption_tokens:
                return self.fast_texts  # the same ids: a query path tokenises once (bench.QueryPath)
            return lambda captions: self.tokenizer.encode(captions, max_len=max_len)

        def encode(captions: list[str]) -> torch.Tensor:
            features = self._minilm(captions)
            if reads == "word_pieces":
                return self.vocabulary.encode(features.ids)
            return zero_padding(features.states.float(), features.mask)

        return encode

    def _minilm(self, captions: list[str]):
        """MiniLM's pass over new captions, kept for the last ones: a query typed into Fast+Slow
        then runs MiniLM once, and both models read it (the Fast model its sentence embedding, the
        Slow model its token states or word pieces), as a service would. Two passes were 27 of the
        33 ms a Flickr8k query cost at K = 20."""
        key = tuple(captions)
        if self._last_minilm is None or self._last_minilm[0] != key:
            self._last_minilm = (key, text_backbone()(captions, MAX_CAPTION_TOKENS))
        return self._last_minilm[1]

    def captions(self, split: str, queries: np.ndarray) -> list[str]:
        """The text of captions ``queries`` of ``split``: what a timed query types."""
        return [self.splits[split].captions[q] for q in queries]


def load_study(cfg: StudyConfig) -> Study:
    """The splits of ``cfg.data``, tokenised; with the ``pretrained`` backbone also their frozen
    features (extracted once, cached: :func:`fastslow.features.extract_features`)."""
    splits = load_dataset(cfg.data)
    encoder = cfg.dual.encoder
    tokenizer = WordTokenizer.fit(splits["train"].captions, min_count=encoder.min_word_count)
    tokens = {name: tokenizer.encode(split.captions, max_len=encoder.max_caption_tokens) for name, split in splits.items()}
    if encoder.backbone == "pretrained":
        features = {name: extract_features(cfg, name, split) for name, split in splits.items()}
        # float32 in memory (the cache holds float16): converting every batch again costs more
        # than the heads' own work.
        visual = {name: FeatureImages(f.maps, f.pooled).to("cpu") for name, f in features.items()}
        texts = {name: f.caption_pooled for name, f in features.items()}
        states = {name: zero_padding(f.caption_states.float(), f.caption_mask) for name, f in features.items()}
        special = SpecialPieces.of(text_backbone().tokenizer)
        # Pieces as rare as the rare words the word tokenizer drops cost softmax width for little:
        # at 5 uses on Flickr8k, 2,076 of 5,479 pieces cover 97% of the training tokens.
        vocabulary = WordPieceVocabulary.fit(features["train"].caption_ids, special, encoder.min_word_count)
        pieces = {name: vocabulary.encode(f.caption_ids) for name, f in features.items()}
        return Study(cfg, splits, tokenizer, tokens, visual, texts, states, pieces, vocabulary)
    visual = {name: split.images for name, split in splits.items()}
    return Study(cfg, splits, tokenizer, tokens, visual, tokens)


def zero_padding(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token states with the padding positions zeroed: how the Slow models tell padding apart
    (:func:`fastslow.inputs.real_tokens`), and what makes a score independent of it."""
    return states * mask[..., None].to(states.dtype)


@dataclass
class Trained:
    """A trained model with what produced it. ``config_hash`` hashes its config and its weights'
    checksum: what the caches of scores computed with it key on, so weights trained again under
    the same config (another form of the model) never meet the scores of the old ones."""

    model: nn.Module
    history: dict[str, list[dict[str, float]]]
    config_hash: str
    train_seconds: float


def build_seeded(make_model: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``make_model()`` with torch's generator seeded by ``seed``, leaving the caller's random state
    as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_model()


def train_or_load(
    stage: str,
    key: Any,
    make_model: Callable[[], nn.Module],
    *,
    loss_fn,
    epoch_batches,
    validate,
    train_config,
    seed: int,
    device: str,
    start_from: nn.Module | None = None,
    **fit_options,
) -> Trained:
    """Load ``stage``'s cached weights for ``key``, or train them with :func:`fastslow.train.fit`.

    The model is built under ``seed`` (:func:`build_seeded`), so its initial weights depend on its
    config alone, never on what ran before in the process; ``start_from``: a trained model whose
    weights it starts from instead (``key`` must name them). Cached weights that do not fit the
    model as the code builds it now (another form of it, under the same config) are trained again.
    ``fit_options`` go to :func:`fastslow.train.fit`."""
    checkpoint = artifact_path(stage, key, ".ckpt")
    model = build_seeded(make_model, seed)
    if start_from is not None:
        model.load_state_dict(start_from.state_dict())
    shapes = {name: tuple(value.shape) for name, value in model.state_dict().items()}

    def build() -> dict[str, Any]:
        started = time.perf_counter()
        history = fit(
            model,
            loss_fn,
            epoch_batches,
            validate,
            train_config,
            seed=seed,
            device=device,
            checkpoint=checkpoint,
            desc=stage,
            **fit_options,
        )
        seconds = time.perf_counter() - started
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        return {"state": state, "history": history, "train_seconds": seconds}

    def unusable(stored: dict[str, Any]) -> str | None:
        stored_shapes = {name: tuple(value.shape) for name, value in stored["state"].items()}
        return None if stored_shapes == shapes else "holds the weights of another form of the model"

    artifact = load_or_build(stage, key, build, unusable=unusable)
    for leftover in (checkpoint, record_path(checkpoint)):
        leftover.unlink(missing_ok=True)
    model.load_state_dict(artifact["state"])
    model.to(device).eval()
    identity = config_hash({"config": key, "weights": artifact_checksum(stage, key)})
    return Trained(model, artifact["history"], identity, artifact["train_seconds"])


# --- Fast: the dual encoder ---------------------------------------------------------------------


def dual_encoder_key(cfg: StudyConfig) -> dict[str, Any]:
    """What a dual encoder depends on: the data (with its files' fingerprint,
    :func:`fastslow.data.data_key`), its model, its training and its seed."""
    return {**data_key(cfg.data), "model": cfg.dual, "train": cfg.train_dual, "seed": cfg.seed}


def dual_encoder_validation(data: Study, device: str) -> Callable[[DualEncoder], float]:
    """Validation RSUM of a dual encoder: what early stopping and model choice watch."""
    val = data.splits["val"]

    def validation_rsum(model: DualEncoder) -> float:
        scores = dual_encoder_scores(model, data.visual["val"], data.texts["val"], device)
        return metrics.rsum(metrics.retrieval_metrics(scores, val.caption_image))

    return validation_rsum


def train_or_load_dual_encoder(cfg: StudyConfig, data: Study | None = None) -> Trained:
    """The Fast model trained with symmetric InfoNCE, early-stopped on validation RSUM."""
    data = data or load_study(cfg)
    train = data.splits["train"]

    def contrastive(model: DualEncoder, batch: dict[str, torch.Tensor], progress: float) -> torch.Tensor:
        return symmetric_info_nce(model(batch["images"], batch["texts"]))

    def epoch_batches(epoch: int) -> PairBatches:
        return dual_encoder_batches(cfg, data, cfg.seed, epoch)

    return train_or_load(
        "dual_encoder",
        dual_encoder_key(cfg),
        lambda: DualEncoder(data.tokenizer.vocab_size, cfg.dual, cfg.data.image_size, train.frames),
        loss_fn=contrastive,
        epoch_batches=epoch_batches,
        validate=dual_encoder_validation(data, cfg.device),
        train_config=cfg.train_dual,
        seed=cfg.seed,
        device=cfg.device,
    )


# --- Slow: the cross-attention model ------------------------------------------------------------


def cross_attention_key(cfg: StudyConfig, **variant) -> dict[str, Any]:
    """What a Slow model depends on; ``variant`` overrides fields of ``cfg.cross``
    (``upsample_steps``, ``objective``), so each ablation variant has its own cache entry. A model
    that starts from the dual encoder, or learns from negatives it mined (``pretrained``), adds
    the dual encoder's own key."""
    model = dataclasses.replace(cfg.cross, **variant)
    key = {**data_key(cfg.data), "model": model, "train": cfg.train_cross, "seed": cfg.seed}
    if model.tower_init == "dual_encoder" or model.encoder.backbone == "pretrained":
        key["tower"] = dual_encoder_key(cfg)
    return key


def cross_attention_validation(data: Study, device: str, n_images: int) -> Callable[[nn.Module], float]:
    """Validation RSUM of a Slow model on the first caption of the first ``n_images`` validation
    images against those images (the Slow model scores every pair, so the whole split would cost
    more than an epoch of training)."""
    val = data.splits["val"]
    n_images = min(n_images, len(val))
    queries = headline_queries(val, 1)[:n_images]
    gallery = data.visual["val"][:n_images]

    def validation_rsum(model: nn.Module) -> float:
        texts = data.slow_texts("val", model.reads)
        scores = cross_attention_scores(model, gallery, texts, device, queries)
        return metrics.rsum(metrics.retrieval_metrics(scores, val.caption_image[queries]))

    return validation_rsum


def build_slow_model(cfg: StudyConfig, data: Study, model_config, fast: Trained | None) -> nn.Module:
    """A Slow model for ``model_config``: on the ``pretrained`` backbone the matching model
    (``itm``) or caption decoders on MiniLM's word pieces; on ``tiny`` caption decoders on the
    study's words. With ``tower_init="dual_encoder"`` a ``tiny`` model starts from the Fast model
    ``fast``'s image tower; the matching model always trains from scratch (started from the Fast
    heads it got worse: :mod:`fastslow.models.matching`)."""
    from_fast = model_config.tower_init == "dual_encoder"
    if model_config.encoder.backbone == "pretrained" and model_config.objective == "itm":
        if from_fast:
            raise ValueError("the matching model trains from scratch: use tower_init='scratch'")
        width = data.token_states["train"].shape[-1]
        return MatchingModel(model_config, cfg.dual, cfg.data.image_size, width)
    frames = data.splits["train"].frames
    if model_config.encoder.backbone == "pretrained":
        table = minilm_word_table(data.vocabulary.minilm_ids)
        return CrossAttentionModel(len(table), model_config, cfg.data.image_size, frames, word_table=table)
    model = CrossAttentionModel(data.tokenizer.vocab_size, model_config, cfg.data.image_size, frames)
    if from_fast:
        model.image_tower.load_state_dict(fast.model.image_tower.state_dict())
    return model


def train_or_load_cross_attention(cfg: StudyConfig, data: Study | None = None, **variant) -> Trained:
    """The Slow model (``cfg.cross`` with ``variant`` overrides: ``upsample_steps``, ``objective``,
    ``tower_init``; built by :func:`build_slow_model`), trained by ``cfg.train_cross`` and
    early-stopped on validation RSUM.

    On ``pretrained`` it learns from negatives mined with the Fast model
    (:mod:`fastslow.negatives`): the matching model by the contrastive loss over batches of
    look-alikes (:func:`fastslow.losses.matching_loss`), caption decoders by their likelihood plus the look-alike term. The Fast model
    (:func:`train_or_load_dual_encoder`) is loaded from the cache, or trained first."""
    data = data or load_study(cfg)
    model_config = dataclasses.replace(cfg.cross, **variant)
    if model_config.tower_init not in TOWER_INITS:
        raise ValueError(f"unknown tower_init {model_config.tower_init!r}; choose one of {', '.join(TOWER_INITS)}")
    if model_config.tower_init == "dual_encoder" and model_config.encoder != cfg.dual.encoder:
        raise ValueError("tower_init='dual_encoder' needs the same encoder config for both models")
    pretrained = model_config.encoder.backbone == "pretrained"
    if model_config.tower_init == "scratch" and not model_config.train_tower and not pretrained:
        raise ValueError("a tower trained from scratch must have train_tower=True")
    fast = None
    if model_config.tower_init == "dual_encoder" or pretrained:
        fast = train_or_load_dual_encoder(cfg, data)
    train = data.splits["train"]
    make_model = functools.partial(build_slow_model, cfg, data, model_config, fast)
    matching = pretrained and model_config.objective == "itm"
    reads = MatchingModel.reads if matching else ("word_pieces" if pretrained else "words")

    @functools.cache
    def train_visual() -> np.ndarray | FeatureImages:
        """What the model reads of the training split: a frozen tiny tower's maps, computed once
        (:func:`frozen_tower_maps`), else what the data holds. Validation keeps the pixels: the
        mean image that corrects a captioning score's prior is not the mean of the maps."""
        maps = None if pretrained or model_config.train_tower else frozen_tower_maps(fast.model.image_tower, data.visual["train"])
        return data.visual["train"] if maps is None else maps

    @functools.cache
    def pools() -> NegativePools:
        scores = dual_encoder_scores(fast.model, data.visual["train"], data.texts["train"], cfg.device)
        return mine_pools(scores, train, model_config.negatives_pool)

    def epoch_batches(epoch: int) -> PairBatches | NegativeBatches | LookAlikeBatches:
        if pretrained:
            return (LookAlikeBatches if matching else NegativeBatches)(
                train, data.slow_texts("train", reads), data.visual["train"], pools(),
                hard=model_config.hard_negatives, batch_size=cfg.train_cross.batch_size,
                seed=cfg.seed, epoch=epoch,
            )
        if model_config.twin_negatives and model_config.objective != "itm":
            return TwinNegativeBatches(
                train, data.tokens["train"], cfg.train_cross.batch_size, cfg.seed, epoch, train_visual()
            )
        batches = PairBatches(train, data.tokens["train"], cfg.train_cross.batch_size, cfg.seed, epoch, train_visual())
        if model_config.objective == "itm":  # twins share batches, so each can be the other's negative
            batches.order = keep_twins_together(batches.order, train.twin)
        return batches

    return train_or_load(
        "cross_attention",
        cross_attention_key(cfg, **variant),
        make_model,
        loss_fn=(
            matching_loss
            if matching
            else cross_attention_loss(train.twin, model_config.negative_weight)
        ),
        epoch_batches=epoch_batches,
        validate=cross_attention_validation(data, cfg.device, model_config.validation_images),
        train_config=cfg.train_cross,
        seed=cfg.seed,
        device=cfg.device,
    )


def slow_candidates(cfg: StudyConfig) -> dict[str, dict[str, Any]]:
    """The kinds of Slow model the study chooses among on validation, by name: ``variant``
    overrides of ``cfg.cross`` (:func:`train_or_load_cross_attention`), one per training
    objective (on ``pretrained`` with the same mined negatives): notebook 03's objective ablation."""
    return {f"objective={objective}": {"objective": objective} for objective in OBJECTIVES}


def ablation_config(cfg: StudyConfig) -> StudyConfig:
    """``cfg`` with the Slow model's training budget cut to the ablations' (``cross_ablation.train``)."""
    return dataclasses.replace(cfg, train_cross=cfg.cross_ablation.train)


def trained_slow_candidates(cfg: StudyConfig, data: Study) -> dict[str, Trained]:
    """Every candidate of :func:`slow_candidates`, trained (or loaded) on the ablations' budget."""
    return {
        name: train_or_load_cross_attention(ablation_config(cfg), data, **variant)
        for name, variant in slow_candidates(cfg).items()
    }


def best_slow_model(
    cfg: StudyConfig, data: Study, candidates: dict[str, Trained] | None = None
) -> tuple[str, Trained]:
    """The Slow model the study uses downstream (re-ranking, teacher), and the name of its kind:
    the candidate with the best validation RSUM on the ablations' budget
    (:func:`trained_slow_candidates`), trained again on the full budget ``cfg.train_cross``, with
    ``cfg.slow_members`` seeds whose scores it averages when more than one.

    Choosing on the smaller budget lets every kind be tried at a fraction of the cost of the full
    one (on Flickr8k a captioning epoch costs several matching ones), and only the chosen kind pays
    for the full budget. ``candidates``: :func:`trained_slow_candidates`, when the caller has them."""
    candidates = candidates or trained_slow_candidates(cfg, data)
    best = max(candidates, key=lambda name: best_validation_score(candidates[name]))
    variant = slow_candidates(cfg)[best]
    members = [
        train_or_load_cross_attention(dataclasses.replace(cfg, seed=cfg.seed + i), data, **variant)
        for i in range(cfg.slow_members)
    ]
    if len(members) == 1:
        return best, members[0]
    # The first member's history stands for the ensemble's (early stopping, curves).
    return best, Trained(
        SlowEnsemble([member.model for member in members]), members[0].history,
        config_hash([member.config_hash for member in members]),
        sum(member.train_seconds for member in members),
    )


def best_validation_score(trained: Trained) -> float:
    """The best validation score of a training run (what early stopping kept)."""
    return max(epoch["val_score"] for epoch in trained.history["epochs"])


# --- students: the Fast model distilled from the Slow one ---------------------------------------


def dual_encoder_batches(cfg: StudyConfig, data: Study, seed: int, epoch: int) -> PairBatches:
    """The batches of notebook 02's dual encoder trained with ``seed``, which its students see too:
    every training image once per epoch with one of its captions, in an order drawn from
    ``(seed, epoch)``."""
    return PairBatches(
        data.splits["train"], data.tokens["train"], cfg.train_dual.batch_size, seed, epoch,
        data.visual["train"], data.texts["train"],
    )


class TeacherCandidates:
    """The teacher's scores of every training caption's in-batch candidates, per (seed, epoch).

    ``fast`` mines the candidates (:func:`fastslow.distill.mine_in_batch` on its embeddings of the
    training split) and ``slow`` scores them; both run only for an epoch not cached yet."""

    def __init__(self, cfg: StudyConfig, data: Study, fast: Trained, slow: Trained):
        self.cfg, self.data, self.fast, self.slow = cfg, data, fast, slow

    @functools.cached_property
    def _fast_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.cfg.device
        images = embed_images(self.fast.model, self.data.visual["train"], device).cpu()
        return embed_texts(self.fast.model, self.data.texts["train"], device).cpu(), images

    @functools.cached_property
    def _gallery(self) -> torch.Tensor:
        with torch.no_grad():
            return visual_tokens(self.slow.model, self.data.visual["train"], self.cfg.device)

    def epoch(self, seed: int, epoch: int) -> dict[str, torch.Tensor]:
        """``candidates``: ``(batches, B, C)`` positions in each batch (the positive first);
        ``scores``: the teacher's ``(batches, B, C)`` scores of those pairs."""
        key = {
            "fast": self.fast.config_hash, "teacher": self.slow.config_hash,
            "batch_size": self.cfg.train_dual.batch_size, "candidates": self.cfg.distill.candidates,
            "seed": seed, "epoch": epoch,
        }
        return load_or_build("teacher_candidates", key, lambda: self._build(seed, epoch))

    def _build(self, seed: int, epoch: int) -> dict[str, torch.Tensor]:
        batches = dual_encoder_batches(self.cfg, self.data, seed, epoch)
        texts, images = self._fast_embeddings
        slow_texts = self.data.slow_texts("train", self.slow.model.reads)
        size = batches.batch_size
        all_candidates, all_scores = [], []
        progress = tqdm(range(len(batches)), desc=f"teacher scores (seed {seed}, epoch {epoch + 1})", leave=False)
        for b in progress:
            members = torch.as_tensor(batches.order[b * size : (b + 1) * size])
            captions = torch.as_tensor(batches.caption_of[members.numpy()])
            candidates = distill.mine_in_batch(texts[captions], images[members], self.cfg.distill.candidates)
            with torch.no_grad():
                scores = pair_scores(self.slow.model, self._gallery, slow_texts[captions], members[candidates])
            all_candidates.append(candidates)
            all_scores.append(scores.float())
        return {"candidates": torch.stack(all_candidates), "scores": torch.stack(all_scores)}


def train_or_load_student(cfg: StudyConfig, data: Study, method: str, seed: int, *, fast: Trained, slow: Trained) -> Trained:
    """Notebook 02's dual encoder trained with ``seed`` and its recipe, plus ``method``'s
    distillation term from the Slow model ``slow`` over in-batch candidates ``fast`` mines
    (:mod:`fastslow.distill`); ``control`` (no term) is notebook 02's dual encoder of that seed."""
    if method not in distill.METHODS:
        raise ValueError(f"unknown distillation method {method!r}; choose one of {', '.join(distill.METHODS)}")
    student_cfg = dataclasses.replace(cfg, seed=seed)
    if method == "control":
        return train_or_load_dual_encoder(student_cfg, data)
    return train_or_load(
        f"distilled_{method}",
        distill.distillation_key(cfg, dual_encoder_key(student_cfg), fast.config_hash, slow.config_hash, method),
        lambda: DualEncoder(data.tokenizer.vocab_size, cfg.dual, cfg.data.image_size, data.splits["train"].frames),
        loss_fn=_distillation_loss_fn(cfg, method),
        epoch_batches=_distillation_batches(cfg, data, seed, TeacherCandidates(cfg, data, fast, slow)),
        validate=dual_encoder_validation(data, cfg.device),
        train_config=cfg.train_dual,
        seed=seed,
        device=cfg.device,
    )


def train_or_load_finetuned(cfg: StudyConfig, data: Study, method: str, *, fast: Trained, slow: Trained) -> Trained:
    """The ablation "fine-tune a converged dual encoder": the Fast model ``fast`` (notebook 02's dual
    encoder of the study's seed) trained on for ``cfg.distill.finetune_epochs`` epochs with
    ``method``'s term (``control``: InfoNCE alone, what the extra epochs give without a teacher), on
    the batches and teacher candidates of its own first epochs, restarting at
    ``cfg.distill.finetune_lr``. The study's first recipe, with its defects fixed: random batches
    (not nearest-neighbour ones full of false negatives), BatchNorm's statistics frozen, and the
    starting weights scored on validation (epoch 0), so they are kept if no epoch beats them."""
    if method not in distill.METHODS:
        raise ValueError(f"unknown distillation method {method!r}; choose one of {', '.join(distill.METHODS)}")
    finetune = dataclasses.replace(cfg.train_dual, epochs=cfg.distill.finetune_epochs, lr=cfg.distill.finetune_lr)
    return train_or_load(
        f"finetuned_{method}",
        distill.finetune_key(cfg, fast.config_hash, slow.config_hash, method),
        lambda: DualEncoder(data.tokenizer.vocab_size, cfg.dual, cfg.data.image_size, data.splits["train"].frames),
        loss_fn=_distillation_loss_fn(cfg, method),
        epoch_batches=_distillation_batches(cfg, data, cfg.seed, TeacherCandidates(cfg, data, fast, slow)),
        validate=dual_encoder_validation(data, cfg.device),
        train_config=finetune,
        seed=cfg.seed,
        device=cfg.device,
        start_from=fast.model,
        validate_start=True,
        freeze_batchnorm=True,
    )


def _distillation_loss_fn(cfg: StudyConfig, method: str):
    def loss_fn(model: DualEncoder, batch: dict[str, torch.Tensor], progress: float):
        # Under torchrun the logits are the global batch's (DualEncoder.forward), so each row's
        # candidates and teacher scores are gathered to match them: every rank then computes the
        # global batch's loss, as the dual encoder's InfoNCE does.
        logits = model(batch["images"], batch["texts"])
        candidates, teacher = distributed.gather_rows(batch["candidates"]), distributed.gather_rows(batch["teacher"])
        return distillation_loss(method, cfg.distill, logits, candidates, teacher)

    return loss_fn


def _distillation_batches(cfg: StudyConfig, data: Study, seed: int, teacher: TeacherCandidates):
    def epoch_batches(epoch: int) -> distill.DistillBatches:
        return distill.DistillBatches(dual_encoder_batches(cfg, data, seed, epoch), teacher.epoch(seed, epoch))

    return epoch_batches


def train_or_load_students(cfg: StudyConfig, data: Study, *, fast: Trained, slow: Trained) -> dict[tuple[str, int], Trained]:
    """Every (method, seed) of the distillation comparison: the control, TFS and DCD."""
    runs = {}
    for method in tqdm(distill.METHODS, desc="distillation methods"):
        for seed in cfg.distill.seeds:
            runs[method, seed] = train_or_load_student(cfg, data, method, seed, fast=fast, slow=slow)
    return runs


def best_student(cfg: StudyConfig, data: Study, *, fast: Trained, slow: Trained) -> tuple[str, Trained]:
    """The distilled student (TFS or DCD, first seed) with the better validation RSUM, and its
    method word."""
    seed = cfg.distill.seeds[0]
    students = {m: train_or_load_student(cfg, data, m, seed, fast=fast, slow=slow) for m in ("tfs", "dcd")}
    best = max(students, key=lambda m: best_validation_score(students[m]))
    return distill.METHOD_NAMES[best], students[best]


# --- the stages as a command: python -m fastslow.stages STAGE [-p KEY VALUE ...] ----------------


def _features(cfg: StudyConfig) -> str:
    data = load_study(cfg)
    if cfg.dual.encoder.backbone != "pretrained":
        return f"backbone {cfg.dual.encoder.backbone!r} reads pixels: no features to extract"
    return f"features of {', '.join(data.splits)} in {cache_root()}"


def _dual_encoder(cfg: StudyConfig) -> str:
    train_or_load_dual_encoder(cfg)
    return f"dual encoder: {artifact_path('dual_encoder', dual_encoder_key(cfg))}"


def _slow(cfg: StudyConfig) -> str:
    kind, _ = best_slow_model(cfg, load_study(cfg))
    return f"Slow model ({kind}, chosen on validation) and the other candidates in {cache_root()}"


def _students(cfg: StudyConfig) -> str:
    data = load_study(cfg)
    fast = train_or_load_dual_encoder(cfg, data)
    # Under torchrun the teacher must be in the cache already (it trains in one process): loaded
    # while measuring, a missing one stops here instead of training under DDP.
    try:
        with measuring_first_step() if distributed.active() else contextlib.nullcontext():
            _, slow = best_slow_model(cfg, data)
    except StepCost:
        raise SystemExit("the students' teacher is not trained: run 'python -m fastslow.stages slow' "
                         "with the same parameters first (the Slow model trains in one process)") from None
    students = train_or_load_students(cfg, data, fast=fast, slow=slow)
    return f"{len(students)} students in {cache_root()}"


# What each stage of the command runs: what notebooks 01-04 call, so a stage's artifacts land in the
# cache where a notebook of the same parameters finds them.
COMMAND_STAGES: dict[str, Callable[[StudyConfig], str]] = {
    "features": _features,
    "dual_encoder": _dual_encoder,
    "slow": _slow,
    "students": _students,
}
# The stages that run on several ranks (torchrun): each rank extracts its share of the features;
# the dual encoder and the students train with DDP on all-gathered negatives (the students' teacher
# scores gathered with them). The Slow models' losses read per-pair look-alikes and token-averaged
# captioning terms that are not split over ranks yet: they train in one process.
ON_SEVERAL_RANKS = ("features", "dual_encoder", "students")


def _estimate_features(cfg: StudyConfig) -> str:
    """What extracting every split's features costs: FLOPs per image and caption, times the splits'."""
    if cfg.dual.encoder.backbone != "pretrained":
        return f"backbone {cfg.dual.encoder.backbone!r} reads pixels: no features to extract"
    cost = extraction_cost(cfg)
    splits = load_dataset(cfg.data)
    images, captions = sum(len(s) for s in splits.values()), sum(s.num_captions for s in splits.values())
    total = images * cost["gflop_per_image"] + captions * cost["gflop_per_caption"]
    here = images * cost["seconds_per_image_here"] + captions * cost["seconds_per_caption_here"]
    return "\n".join([
        f"features of {images} images and {captions} captions ({', '.join(splits)})",
        f"  {cost['gflop_per_image']:.2f} GFLOP an image, {cost['gflop_per_caption']:.2f} GFLOP a caption: "
        f"{total / 1e3:.1f} TFLOP in all (forward only)",
        f"  here: {here / 60:.1f} min ({total / here:.0f} GFLOP/s sustained); N ranks share the chunks",
    ])


def _estimate(stage: Callable[[StudyConfig], str], cfg: StudyConfig) -> str:
    """What one step of the first model ``stage`` would train costs, and what a run on N GPUs
    then needs: per GPU, the trained weights with their gradients, AdamW's two moments (and the
    moving average, when the run keeps one) plus 1/N of the global batch's activations; per
    epoch, FLOPs that a GPU's sustained rate turns into time."""
    try:
        with measuring_first_step():
            stage(cfg)
    except StepCost as measured:
        cost = measured.cost
        copies = 5 if cost["weight_average"] else 4
        state = copies * cost["trained_parameter_mb"]
        epoch_tflop = cost["gflop_per_step"] * cost["steps_per_epoch"] / 1e3
        lines = [f"{measured.desc}: one step of a global batch of {cost['batch_size']}",
                 f"  {cost['gflop_per_step']:.1f} GFLOP a step (forward and backward), "
                 f"{cost['steps_per_epoch']} steps an epoch: {epoch_tflop:.2f} TFLOP an epoch",
                 f"  here: {cost['seconds_per_step_here']:.3f} s a step "
                 f"({cost['gflop_per_step'] / cost['seconds_per_step_here']:.0f} GFLOP/s sustained)",
                 f"  memory: {cost['trained_parameter_mb']:.1f} MB of trained weights, x{copies} with "
                 f"gradients and optimizer state; {cost['activation_mb']:.0f} MB of activations"]
        lines += [f"  on {n} GPU(s): about {state + cost['activation_mb'] / n:.0f} MB each (plus "
                  f"frozen backbones and the CUDA context)" for n in (1, 2, 4, 8)]
        return "\n".join(lines)
    return "nothing to train: every model of this stage is in the cache"


def command_config(pairs: list[tuple[str, str]]) -> StudyConfig:
    """The study config of ``-p KEY VALUE`` pairs: the notebooks' parameters (those of
    :func:`fastslow.config.make_config`), typed as ``run_all.sh`` types them
    (:func:`fastslow.config.typed_parameter`)."""
    accepted = inspect.signature(make_config).parameters
    unknown = [key for key, _ in pairs if key not in accepted]
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r} (choose among: {', '.join(accepted)})")
    return make_config(**{key: typed_parameter(key, text, accepted[key].default) for key, text in pairs})


def main(argv: list[str] | None = None) -> int:
    """``python -m fastslow.stages STAGE [-p KEY VALUE ...]``, or the same under
    ``torchrun --nproc_per_node N -m fastslow.stages ...``: train or load one stage's artifacts
    into the cache (``FASTSLOW_CACHE``) where a notebook run with the same parameters finds them."""
    parser = argparse.ArgumentParser(
        prog="python -m fastslow.stages",
        description="Train or load one stage of the study into the cache the notebooks read "
        "(FASTSLOW_CACHE). Under torchrun, the stages "
        f"{', '.join(ON_SEVERAL_RANKS)} run on every rank (gloo on CPU, NCCL on GPU).",
    )
    parser.add_argument("stage", choices=tuple(COMMAND_STAGES))
    parser.add_argument("--estimate", action="store_true",
                        help="measure one training step of what the stage would train next (FLOPs, "
                        "activation and parameter memory, seconds here) instead of training")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="a notebook parameter (profile, dataset, data_dir, backbone, seed, device)")
    args = parser.parse_args(argv)
    try:
        cfg = command_config(args.p)
    except ValueError as error:
        parser.error(str(error))
    if distributed.launched() and args.stage not in ON_SEVERAL_RANKS:
        parser.error(f"stage {args.stage!r} runs in one process; run it without torchrun "
                     f"(under torchrun: {', '.join(ON_SEVERAL_RANKS)})")
    logging.basicConfig(level=logging.INFO, format=f"[rank {distributed.rank_of_launch()}] %(levelname)s %(name)s: %(message)s")
    cfg = dataclasses.replace(cfg, device=distributed.join(cfg.device))
    try:
        if args.estimate and args.stage == "features":
            said = _estimate_features(cfg)
        elif args.estimate:
            said = _estimate(COMMAND_STAGES[args.stage], cfg)
        else:
            said = COMMAND_STAGES[args.stage](cfg)
    finally:
        distributed.leave()
    if distributed.rank_of_launch() == 0:
        print(said)
    return 0


if __name__ == "__main__":
    # Run the module's own copy (fastslow.stages), not this __main__ one, so the types the package
    # imports and the ones main() builds are the same.
    from fastslow.stages import main as stages_main

    sys.exit(stages_main())
