"""Evaluating trained models on the test gallery: the headline query set every method is scored
on, the Slow model's ablation variants, and what its attention looks at."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from fastslow import metrics
from fastslow.bench import slow_only_query_ms
from fastslow.cache import load_or_build
from fastslow.config import StudyConfig, config_hash
from fastslow.inputs import FeatureImages
from fastslow.models.cross_attention import CrossAttentionModel, cross_attention_maps, pair_scores, visual_tokens
from fastslow.models.dual_encoder import DualEncoder
from fastslow.models.pretrained import text_backbone
from fastslow.scoring import cross_attention_scores, dual_encoder_scores
from fastslow.stages import Study, Trained, best_validation_score, train_or_load_cross_attention

log = logging.getLogger(__name__)


def headline_slow_scores(cfg: StudyConfig, data: Study, slow: Trained) -> torch.Tensor:
    """The Slow model's scores of the headline queries against the whole test gallery.

    Cached: the Slow-only evaluation (notebook 03) and the re-ranking sweep (notebook 05) share them.
    """
    name = f"test-{config_hash(cfg.data)}"
    texts = data.slow_texts("test", slow.model.reads)
    return cached_slow_scores(slow, data.visual["test"], texts, data.headline_queries(), cfg.device, name)


def headline_fast_scores(model: DualEncoder, data: Study, device: str) -> torch.Tensor:
    """A dual encoder's scores of the headline queries against the whole test gallery."""
    queries = data.headline_queries()
    return dual_encoder_scores(model, data.visual["test"], data.texts["test"], device)[queries]


def cached_slow_scores(slow: Trained, visual: np.ndarray | FeatureImages, tokens: torch.Tensor, queries: np.ndarray, device: str, name: str) -> torch.Tensor:
    """Slow scores of ``queries`` against every image of ``visual``, cached under the model (whose key
    holds the data's fingerprint, :func:`fastslow.data.data_key`) and the query set."""
    key = {"model": slow.config_hash, "gallery": name, "images": len(visual), "queries": queries.tolist()}
    return load_or_build("slow_scores", key, lambda: cross_attention_scores(slow.model, visual, tokens, device, queries))


def cross_attention_variants(
    cfg: StudyConfig, data: Study, variants: dict[str, dict[str, Any]], queries: np.ndarray, latency_queries: int = 5
) -> dict[str, dict[str, Any]]:
    """Train (or load) each named Slow variant and score ``queries`` against the whole test gallery.

    Per variant: its metrics, its cost (ms per query one caption at a time, as
    :func:`fastslow.bench.slow_only_query_ms` measures it, that divided by the gallery size as the
    cost per pair, and the pairs per second of the batched evaluation), and its training record.
    The variants run as written, not compiled (:func:`fastslow.bench.compiled`): their costs are
    compared with one another, and compiling each new architecture would cost ~20 s apiece.
    """
    results = {}
    if len(queries) == 0:
        log.info("Slow-model ablations skipped: the profile gives them no queries for this backbone")
        return results
    for name, variant in variants.items():
        trained = train_or_load_cross_attention(cfg, data, **variant)
        gallery = visual_tokens(trained.model, data.visual["test"], cfg.device)
        tokens = data.slow_texts("test", trained.model.reads)[torch.as_tensor(queries)]
        started = time.perf_counter()
        scores = pair_scores(trained.model, gallery, tokens, torch.arange(len(data.test)).expand(len(queries), -1))
        seconds = time.perf_counter() - started
        captions = data.captions("test", queries[:latency_queries])
        ms = slow_only_query_ms(trained.model, gallery, captions, encode_slow=data.slow_encoder(trained.model.reads), device=cfg.device)
        results[name] = {
            "variant": variant,
            "metrics": metrics.evaluate(scores, data.test, queries),
            "ms_per_query": ms,
            "us_per_pair": 1000.0 * ms / len(data.test),
            "pairs_per_second_batched": scores.numel() / seconds,
            "visual_tokens": int(gallery.shape[1]),
            "train_seconds": trained.train_seconds,
            "epochs_trained": len(trained.history["epochs"]),
            "best_validation_rsum": best_validation_score(trained),
        }
    return results


def attention_example(model: CrossAttentionModel, data: Study, caption: int) -> dict[str, Any]:
    """What :func:`fastslow.plots.attention_maps` draws for test caption ``caption``: its image,
    the tokens the forward decoder predicts (words, or MiniLM word pieces), and the last layer's
    cross-attention map for each."""
    tokens = data.slow_texts("test", model.reads)[caption]
    image = int(data.test.caption_image[caption])
    maps = cross_attention_maps(model, data.visual["test"][image : image + 1], tokens)[-1]
    predicted = tokens[1 : int(tokens.ne(0).sum())]  # the words, then EOS
    if model.reads == "word_pieces":
        tokenizer = text_backbone().tokenizer
        words = [data.vocabulary.decode([t], tokenizer) or "<eos>" for t in predicted.tolist()]
    else:
        words = [data.tokenizer.decode([t]) or "<eos>" for t in predicted.tolist()]
    return {"image": data.test.images[image], "caption": data.test.captions[caption], "words": words, "maps": maps.numpy()}
