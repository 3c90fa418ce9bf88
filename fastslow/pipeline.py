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
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from fastslow import distill, metrics
from fastslow.cache import artifact_path, config_hash, load_or_build
from fastslow.config import TOWER_INITS, StudyConfig
from fastslow.data import CaptionedImages, WordTokenizer, load_dataset, make_shapes
from fastslow.data.batches import PairBatches, headline_queries
from fastslow.features import MAX_CAPTION_TOKENS, extract_features
from fastslow.models.encoders import FeatureImages
from fastslow.models.pretrained import text_backbone
from fastslow.losses import captioning_nll, itm_bce, symmetric_info_nce
from fastslow.models.dual_encoder import DualEncoder, embed_images, embed_texts
from fastslow.models.cross_attention import (
    CrossAttentionModel,
    cross_attention_maps,
    itm_negatives,
    keep_twins_together,
    pair_scores,
    teacher_forcing,
    visual_tokens,
)
from fastslow.bench import fast_slow_query_ms, slow_only_query_ms
from fastslow.bench import index_scaling as bench_index_scaling
from fastslow.index import VectorIndex
from fastslow.rerank import Reranker, Searcher, SlowScorer, choose_alpha, k_values
from fastslow.train import fit

log = logging.getLogger(__name__)


@dataclass
class Study:
    """The data a stage works on: splits, the tokenizer fitted on the training captions, and per
    split what the models read.

    ``tokens``: word ids of every caption (what the Slow model's caption decoders read).
    ``visual``: what the image towers read, indexed like the split's images: the uint8 images
    themselves (``tiny`` backbone) or their frozen EfficientNet-Lite0 features (``pretrained``).
    ``texts``: what the dual encoder's text side reads per caption: the word ids (``tiny``) or the
    frozen MiniLM sentence embeddings (``pretrained``).
    """

    config: StudyConfig
    splits: dict[str, CaptionedImages]
    tokenizer: WordTokenizer
    tokens: dict[str, torch.Tensor]
    visual: dict[str, np.ndarray | FeatureImages]
    texts: dict[str, torch.Tensor]

    @property
    def test(self) -> CaptionedImages:
        return self.splits["test"]

    def headline_queries(self) -> np.ndarray:
        """The test captions every method's ``headline`` row is scored on."""
        queries = headline_queries(self.test, self.config.headline_captions_per_image)
        return queries[: self.config.headline_max_queries]


    def fast_texts(self, captions: list[str]) -> torch.Tensor:
        """New captions (a search box's query) as the dual encoder's text side reads them."""
        if self.config.dual.encoder.backbone == "pretrained":
            return text_backbone()(captions, MAX_CAPTION_TOKENS).pooled
        return self.tokenizer.encode(captions, max_len=self.config.dual.encoder.max_caption_tokens)


def study(cfg: StudyConfig) -> Study:
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
    else:
        visual = {name: split.images for name, split in splits.items()}
        texts = tokens
    return Study(cfg, splits, tokenizer, tokens, visual, texts)


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


def dual_encoder_scores(model: DualEncoder, visual: np.ndarray | FeatureImages, texts: torch.Tensor, device: str) -> torch.Tensor:
    """``(captions, images)`` cosine similarities of the Fast model over a whole split
    (``data.visual[name]``, ``data.texts[name]``)."""
    return embed_texts(model, texts, device) @ embed_images(model, visual, device).T


def dual_encoder_key(cfg: StudyConfig) -> dict[str, Any]:
    return {"data": cfg.data, "model": cfg.dual, "train": cfg.train_dual, "seed": cfg.seed}


def dual_encoder(cfg: StudyConfig, data: Study | None = None) -> Trained:
    """The Fast model trained with symmetric InfoNCE, early-stopped on validation RSUM."""
    data = data or study(cfg)
    train, val = data.splits["train"], data.splits["val"]

    def contrastive(model: DualEncoder, batch: dict[str, torch.Tensor], progress: float) -> torch.Tensor:
        return symmetric_info_nce(model(batch["images"], batch["texts"]))

    return train_or_load(
        "dual_encoder",
        dual_encoder_key(cfg),
        lambda: DualEncoder(data.tokenizer.vocab_size, cfg.dual, cfg.data.image_size, train.frames),
        contrastive,
        lambda epoch: PairBatches(train, data.tokens["train"], cfg.train_dual.batch_size, cfg.seed, epoch, data.visual["train"], data.texts["train"]),
        dual_encoder_validation(data, cfg.device),
        cfg.train_dual,
        seed=cfg.seed,
        device=cfg.device,
    )


def dual_encoder_validation(data: Study, device: str):
    """Validation RSUM of a dual encoder: what early stopping and model choice watch."""
    val = data.splits["val"]

    def validation_rsum(model: DualEncoder) -> float:
        scores = dual_encoder_scores(model, data.visual["val"], data.texts["val"], device)
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
        model = DualEncoder(data.tokenizer.vocab_size, cfg.dual, cfg.data.image_size, train.frames)
        model.load_state_dict(fast.model.state_dict())
        return model

    def loss_fn(model: DualEncoder, batch: dict[str, torch.Tensor], progress: float):
        logits = model(batch["images"], batch["texts"])
        return distill.student_loss(method, cfg.distill, logits, batch["teacher"], progress)

    def epoch_batches(epoch: int) -> distill.DistillBatches:
        return distill.DistillBatches(
            data.visual["train"], data.texts["train"], prepared["batches"], prepared["captions"], prepared["teacher_scores"], seed, epoch
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
    (``upsample_steps``, ``objective``), so each ablation variant has its own cache entry. A tower
    started from the dual encoder's adds the dual encoder's own key."""
    model = dataclasses.replace(cfg.cross, **variant)
    key = {"data": cfg.data, "model": model, "train": cfg.train_cross, "seed": cfg.seed}
    if model.tower_init == "dual_encoder":
        key["tower"] = dual_encoder_key(cfg)
    return key


def cross_attention_scores(
    model: CrossAttentionModel, visual: np.ndarray | FeatureImages, tokens: torch.Tensor, device: str, queries: np.ndarray | None = None
) -> torch.Tensor:
    """``(queries, images)`` Slow scores of captions ``queries`` (all when None) against every image
    of ``visual`` (a split's images as the model reads them): the gallery's visual tokens once,
    then every pair."""
    queries = np.arange(len(tokens)) if queries is None else np.asarray(queries)
    gallery = visual_tokens(model, visual, device)
    everyone = torch.arange(len(visual)).expand(len(queries), len(visual))
    return pair_scores(model, gallery, tokens[torch.as_tensor(queries)], everyone)


def cross_attention_validation(data: Study, device: str, n_images: int):
    """Validation RSUM of a Slow model on the first caption of the first ``n_images`` validation
    images against those images (the Slow model scores every pair, so the whole split would cost
    more than an epoch of training)."""
    val = data.splits["val"]
    n_images = min(n_images, len(val))
    queries = headline_queries(val, 1)[:n_images]
    gallery = data.visual["val"][:n_images]

    def validation_rsum(model: CrossAttentionModel) -> float:
        scores = cross_attention_scores(model, gallery, data.tokens["val"], device, queries)
        return metrics.rsum(metrics.retrieval_metrics(scores, val.caption_image[queries]))

    return validation_rsum


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


def cross_attention(cfg: StudyConfig, data: Study | None = None, **variant) -> Trained:
    """The Slow model (``cfg.cross`` with ``variant`` overrides: ``upsample_steps``, ``objective``,
    ``tower_init``), trained by ``cfg.train_cross`` and early-stopped on validation RSUM. With
    ``tower_init="dual_encoder"`` its image tower starts from :func:`dual_encoder`'s (loaded from
    the cache, or trained first)."""
    data = data or study(cfg)
    model_config = dataclasses.replace(cfg.cross, **variant)
    if model_config.tower_init not in TOWER_INITS:
        raise ValueError(f"unknown tower_init {model_config.tower_init!r}; choose one of {', '.join(TOWER_INITS)}")
    if model_config.tower_init == "dual_encoder" and model_config.encoder != cfg.dual.encoder:
        raise ValueError("tower_init='dual_encoder' needs the same encoder config for both models")
    if model_config.tower_init == "scratch" and not model_config.train_tower:
        raise ValueError("a tower trained from scratch must have train_tower=True")
    tower = dual_encoder(cfg, data).model.image_tower.state_dict() if model_config.tower_init == "dual_encoder" else None
    train = data.splits["train"]

    def make_model() -> CrossAttentionModel:
        model = CrossAttentionModel(data.tokenizer.vocab_size, model_config, cfg.data.image_size, train.frames)
        if tower is not None:
            model.image_tower.load_state_dict(tower)
        return model

    def epoch_batches(epoch: int) -> PairBatches:
        batches = PairBatches(train, data.tokens["train"], cfg.train_cross.batch_size, cfg.seed, epoch, data.visual["train"])
        if model_config.objective == "itm":  # twins share batches, so each can be the other's negative
            batches.order = keep_twins_together(batches.order, train.twin)
        return batches

    return train_or_load(
        "cross_attention",
        cross_attention_key(cfg, **variant),
        make_model,
        cross_attention_loss(train.twin),
        epoch_batches,
        cross_attention_validation(data, cfg.device, model_config.validation_images),
        cfg.train_cross,
        seed=cfg.seed,
        device=cfg.device,
    )


def cross_attention_variants(
    cfg: StudyConfig, data: Study, variants: dict[str, dict[str, Any]], queries: np.ndarray, latency_queries: int = 5
) -> dict[str, dict[str, Any]]:
    """Train (or load) each named Slow variant and score ``queries`` against the whole test gallery.

    Per variant: its metrics, its cost (ms per query one caption at a time, as
    :func:`fastslow.bench.slow_only_query_ms` measures it, that divided by the gallery size as the
    cost per pair, and the pairs per second of the batched evaluation), and its training record.
    """
    results = {}
    if len(queries) == 0:
        log.info("Slow-model ablations skipped: the profile gives them no queries for this backbone")
        return results
    for name, variant in variants.items():
        trained = cross_attention(cfg, data, **variant)
        gallery = visual_tokens(trained.model, data.visual["test"], cfg.device)
        tokens = data.tokens["test"][torch.as_tensor(queries)]
        started = time.perf_counter()
        scores = pair_scores(trained.model, gallery, tokens, torch.arange(len(data.test)).expand(len(queries), -1))
        seconds = time.perf_counter() - started
        ms = slow_only_query_ms(trained.model, gallery, tokens[:latency_queries], cfg.device)
        results[name] = {
            "variant": variant,
            "metrics": metrics.evaluate(scores, data.test, queries),
            "ms_per_query": ms,
            "us_per_pair": 1000.0 * ms / len(data.test),
            "pairs_per_second_batched": scores.numel() / seconds,
            "visual_tokens": int(gallery.shape[1]),
            "train_seconds": trained.train_seconds,
            "epochs_trained": len(trained.history["epochs"]),
            "best_validation_rsum": max(e["val_score"] for e in trained.history["epochs"]),
        }
    return results


def attention_example(model: CrossAttentionModel, data: Study, caption: int) -> dict[str, Any]:
    """What :func:`fastslow.plots.attention_maps` draws for test caption ``caption``: its image,
    the tokens the forward decoder predicts, and the last layer's cross-attention map for each."""
    tokens = data.tokens["test"][caption]
    image = int(data.test.caption_image[caption])
    maps = cross_attention_maps(model, data.visual["test"][image : image + 1], tokens)[-1]
    predicted = tokens[1 : int(tokens.ne(0).sum())]  # the words, then EOS
    words = [data.tokenizer.decode([t]) or "<eos>" for t in predicted.tolist()]
    return {"image": data.test.images[image], "caption": data.test.captions[caption], "words": words, "maps": maps.numpy()}


def headline_slow_scores(cfg: StudyConfig, data: Study, slow: Trained) -> torch.Tensor:
    """The Slow model's scores of the headline queries against the whole test gallery.

    Cached: the Slow-only evaluation (notebook 03) and the re-ranking sweep (notebook 05) share them.
    """
    name = f"test-{config_hash(cfg.data)}"
    return cached_slow_scores(slow, data.visual["test"], data.tokens["test"], data.headline_queries(), cfg.device, name)


def headline_fast_scores(model: DualEncoder, data: Study, device: str) -> torch.Tensor:
    """A dual encoder's scores of the headline queries against the whole test gallery."""
    queries = data.headline_queries()
    return dual_encoder_scores(model, data.visual["test"], data.texts["test"], device)[queries]


def distillation_runs(cfg: StudyConfig, data: Study, fast: Trained, slow: Trained) -> dict[tuple[str, int], Trained]:
    """Every (method, seed) of the distillation comparison: the control, TFS and DCD."""
    runs = {}
    for method in tqdm(distill.METHODS, desc="distillation methods"):
        for seed in cfg.distill.seeds:
            runs[method, seed] = distilled_dual_encoder(cfg, data, method, seed, fast, slow)
    return runs


def best_distilled(cfg: StudyConfig, data: Study, fast: Trained, slow: Trained) -> tuple[str, Trained]:
    """The distilled student (TFS or DCD, first seed) with the better validation RSUM."""
    students = {m: distilled_dual_encoder(cfg, data, m, cfg.distill.seeds[0], fast, slow) for m in ("tfs", "dcd")}
    best = max(students, key=lambda m: max(e["val_score"] for e in students[m].history["epochs"]))
    return distill.METHOD_NAMES[best], students[best]


def lookup_scorer(matrix: torch.Tensor) -> SlowScorer:
    """A Slow scorer reading a precomputed ``(queries, items)`` score matrix."""
    return lambda rows, candidates: matrix[torch.as_tensor(rows)[:, None], torch.as_tensor(candidates)]


def fast_slow_sweep(
    fast_scores: torch.Tensor, slow_scores: torch.Tensor, split: CaptionedImages, queries: np.ndarray, ks: list[int], alpha: float
) -> dict[int, dict[str, dict[str, float]]]:
    """Metrics of Fast+Slow at each K, both directions (text-to-image re-ranks the Fast top-K
    images of each caption; image-to-text the top-K query captions of each image)."""
    text_to_image = Reranker(fast_scores, lookup_scorer(slow_scores), max(ks))
    image_to_text = Reranker(fast_scores.T, lookup_scorer(slow_scores.T), max(ks))
    sweep = {}
    for k in ks:
        t2i = metrics.evaluate(text_to_image.scores(min(k, text_to_image.max_k), alpha), split, queries)["t2i"]
        i2t = metrics.evaluate(image_to_text.scores(min(k, image_to_text.max_k), alpha).T, split, queries)["i2t"]
        sweep[k] = {"t2i": t2i, "i2t": i2t}
    return sweep


def choose_rerank_alpha(cfg: StudyConfig, data: Study, first_stage: Trained, slow: Trained) -> tuple[float, dict[float, float]]:
    """The weight of the Fast score in the re-ranking combination, chosen on validation captions
    (text-to-image R@1 + R@5 + R@10 at K = ``cfg.rerank.alpha_k``)."""
    val = data.splits["val"]
    queries = headline_queries(val, 1)[: cfg.rerank.validation_queries]
    fast_scores = dual_encoder_scores(first_stage.model, data.visual["val"], data.texts["val"], cfg.device)[queries]
    gallery = visual_tokens(slow.model, data.visual["val"], cfg.device)
    query_tokens = data.tokens["val"][torch.as_tensor(queries)]

    def slow_scores(rows: np.ndarray, candidates: np.ndarray) -> torch.Tensor:
        return pair_scores(slow.model, gallery, query_tokens[torch.as_tensor(rows)], torch.as_tensor(candidates))

    def rating(scores: torch.Tensor) -> float:
        t2i = metrics.evaluate(scores, val, queries)["t2i"]
        return t2i["R@1"] + t2i["R@5"] + t2i["R@10"]

    reranker = Reranker(fast_scores, slow_scores, cfg.rerank.alpha_k)
    return choose_alpha(reranker, rating, cfg.rerank.alpha_k, cfg.rerank.alphas)


def large_gallery(cfg: StudyConfig, data: Study) -> tuple[CaptionedImages, torch.Tensor, np.ndarray] | None:
    """A second, larger test gallery of ``cfg.rerank.large_gallery`` shapes images (its own seed,
    never trained on), its tokenised captions and its query set; None for datasets without one
    (and for the pretrained backbone, whose features exist only for the study's splits)."""
    if cfg.data.dataset != "shapes" or cfg.dual.encoder.backbone != "tiny":
        return None
    gallery = make_shapes(
        1, 1, cfg.rerank.large_gallery, image_size=cfg.data.image_size,
        captions_per_image=cfg.data.captions_per_image, seed=cfg.data.seed + 1000,
    )["test"]
    tokens = data.tokenizer.encode(gallery.captions, max_len=cfg.dual.encoder.max_caption_tokens)
    queries = headline_queries(gallery, 1)[: cfg.rerank.large_gallery_queries]
    return gallery, tokens, queries


def cached_slow_scores(slow: Trained, visual: np.ndarray | FeatureImages, tokens: torch.Tensor, queries: np.ndarray, device: str, name: str) -> torch.Tensor:
    """Slow scores of ``queries`` against every image of ``visual``, cached under the model and the query set."""
    key = {"model": slow.config_hash, "gallery": name, "images": len(visual), "queries": queries.tolist()}
    return load_or_build("slow_scores", key, lambda: cross_attention_scores(slow.model, visual, tokens, device, queries))


def searcher(cfg: StudyConfig, data: Study, first_stage: Trained, slow: Trained, alpha: float = 0.0) -> Searcher:
    """Interactive search over the test gallery (Fast top-K, Slow re-ranking)."""
    return Searcher(first_stage.model, slow.model, data, cfg.device, alpha)


def fast_index(first_stage: Trained, visual: np.ndarray | FeatureImages, device: str, factory: str = "Flat") -> VectorIndex:
    """A FAISS index of a dual encoder's embeddings of ``visual`` (a split's images as it reads them)."""
    return VectorIndex.build(embed_images(first_stage.model, visual, device), factory)


def operating_points(sweep: pd.DataFrame, slow_ms: float, slow_r1: float, tolerance: float = 1.0) -> pd.DataFrame:
    """Per Fast+Slow method: the smallest K whose text-to-image R@1 is within ``tolerance`` points
    of Slow-only, its latency and the speed-up over Slow-only (or the best K if none is)."""
    rows = {}
    for method, group in sweep[sweep["direction"] == "t2i"].groupby("method"):
        group = group.sort_values("K").reset_index(drop=True)  # rows concatenated from several tables repeat labels
        close = group[group["R@1"] >= slow_r1 - tolerance]
        chosen = close.iloc[0] if len(close) else group.loc[group["R@1"].idxmax()]
        rows[method] = {
            "K": int(chosen["K"]),
            "R@1": chosen["R@1"],
            "Slow-only R@1": slow_r1,
            "within 1 point": bool(len(close)),
            "ms_per_query": chosen["ms_per_query"],
            "Slow-only ms_per_query": slow_ms,
            "speed-up": slow_ms / chosen["ms_per_query"],
        }
    return pd.DataFrame(rows).T


def large_gallery_sweep(cfg: StudyConfig, data: Study, first_stage: Trained, slow: Trained, alpha: float) -> pd.DataFrame:
    """The K sweep and the speed-up on :func:`large_gallery`: text-to-image R@1 and latency per K."""
    gallery, tokens, queries = large_gallery(cfg, data)
    fast_scores = dual_encoder_scores(first_stage.model, gallery.images, tokens, cfg.device)[queries]
    slow_scores = cached_slow_scores(slow, gallery.images, tokens, queries, cfg.device, name=f"large-{cfg.data.seed + 1000}")
    ks = k_values(len(gallery), (1, 2, 5, 10, 20, 50, 100))
    index = fast_index(first_stage, gallery.images, cfg.device)
    visual = visual_tokens(slow.model, gallery.images, cfg.device)
    latency_tokens = tokens[torch.as_tensor(queries[: cfg.rerank.latency_queries])]
    slow_ms = slow_only_query_ms(slow.model, visual, latency_tokens, cfg.device)
    rows = []
    for k, result in fast_slow_sweep(fast_scores, slow_scores, gallery, queries, ks, alpha).items():
        ms = slow_ms if k == len(gallery) else fast_slow_query_ms(first_stage.model, index, slow.model, visual, latency_tokens, latency_tokens, k, cfg.device)
        rows.append({"gallery_size": len(gallery), "queries": len(queries), "K": k, "R@1": result["t2i"]["R@1"],
                     "R@5": result["t2i"]["R@5"], "ms_per_query": ms, "speed-up": slow_ms / ms})
    return pd.DataFrame(rows)


def index_scaling(cfg: StudyConfig, data: Study, first_stage: Trained) -> pd.DataFrame:
    """:func:`fastslow.bench.index_scaling` on the dual encoder's test embeddings, cached."""
    key = {"model": first_stage.config_hash, "rerank": cfg.rerank, "data": cfg.data}

    def build() -> pd.DataFrame:
        gallery = embed_images(first_stage.model, data.visual["test"], cfg.device)
        queries = data.headline_queries()[: max(20, cfg.rerank.latency_queries)]
        query_embeddings = embed_texts(first_stage.model, data.texts["test"][torch.as_tensor(queries)], cfg.device)
        factories = {"exact": "Flat", **dict(cfg.rerank.approximate_indexes)}
        return bench_index_scaling(gallery, query_embeddings, cfg.rerank.scale_sizes, factories, seed=cfg.seed)

    return load_or_build("index_scaling", key, build)


def latency_by_gallery_size(scaling: pd.DataFrame, slow_ms_per_pair: float, k: int, fast_slow_ms: float) -> pd.DataFrame:
    """Per-query latency by gallery size: each index measured; Slow-only measured at the real
    gallery and extrapolated (cost per pair x size) beyond it; Fast+Slow from measured parts (HNSW
    search at that size + the measured encode-and-score-K cost at the real gallery)."""
    rows = [
        {"method": f"Fast ({r.index})", "gallery_size": r.gallery_size, "ms_per_query": r.ms_per_query, "measured": True}
        for r in scaling.itertuples()
    ]
    real_size = int(scaling["gallery_size"].min())
    exact_at_real = float(scaling[(scaling["index"] == "exact") & (scaling["gallery_size"] == real_size)]["ms_per_query"].iloc[0])
    encode_and_rerank = max(0.0, fast_slow_ms - exact_at_real)
    for r in scaling[scaling["index"] == "HNSW"].itertuples():
        rows.append({"method": f"Fast+Slow (HNSW, K={k})", "gallery_size": r.gallery_size,
                     "ms_per_query": r.ms_per_query + encode_and_rerank, "measured": r.gallery_size == real_size})
    for size in sorted(scaling["gallery_size"].unique()):
        rows.append({"method": "Slow only", "gallery_size": size, "ms_per_query": slow_ms_per_pair * size, "measured": size == real_size})
    return pd.DataFrame(rows)


def billion_scale_arithmetic(scaling: pd.DataFrame, slow_ms_per_pair: float, k: int, items: int = 10**9, shard_size: int = 10**8) -> pd.DataFrame:
    """What serving ``items`` would take, from the numbers measured at the largest size."""
    largest = int(scaling["gallery_size"].max())
    at_largest = scaling[scaling["gallery_size"] == largest].set_index("index")["ms_per_query"]
    pq_bytes = 16  # IVF-PQ16x4fs stores 16 bytes per item (plus an 8-byte id)
    shards = -(-items // shard_size)
    per_shard_ms = at_largest.get("IVF-PQ", float("nan")) * shard_size / largest
    return pd.DataFrame(
        {
            "quantity": [
                "items", "IVF-PQ memory, all shards (GB)", f"shards of {shard_size:.0e} items", "IVF-PQ search per shard, linear from measured (ms)",
                f"Slow re-rank of K={k} (ms)", "Slow over every item, one query (hours)",
            ],
            "value": [
                items, items * (pq_bytes + 8) / 1e9, shards, per_shard_ms, k * slow_ms_per_pair, items * slow_ms_per_pair / 3.6e6,
            ],
        }
    )
