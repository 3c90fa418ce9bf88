"""Fast + Slow: retrieve the top-K with the dual encoder, re-rank those K with the cross-attention model.

Re-ranked items keep their place above the rest; items outside the top-K keep the Fast order below
them. The re-ranking score is the Slow score alone (``alpha = 0``) or a combination in the manner of
BLIP adding ITM and ITC scores: both scores standardised within each query's top-K (mean 0, std 1),
then ``slow + alpha * fast``. ``alpha`` is chosen on validation (:func:`choose_alpha`), never on test.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from fastslow import metrics
from fastslow.batches import headline_queries
from fastslow.bench import QueryPath, latency_by_k
from fastslow.config import LargerGallery, StudyConfig, config_hash
from fastslow.data import CaptionedImages, make_shapes
from fastslow.evaluation import cached_slow_scores
from fastslow.index import VectorIndex, write_embedding_shards
from fastslow.inputs import FeatureImages
from fastslow.models.cross_attention import pair_scores, visual_tokens
from fastslow.models.dual_encoder import embed_images, embed_texts
from fastslow.scoring import dual_encoder_scores
from fastslow.stages import Study, Trained

# slow_scores(rows, candidates): the Slow score of row-query rows[r] with candidate candidates[r, k]
SlowScorer = Callable[[np.ndarray, np.ndarray], torch.Tensor]


def _standardise(scores: torch.Tensor) -> torch.Tensor:
    mean = scores.mean(dim=1, keepdim=True)
    std = scores.std(dim=1, keepdim=True, unbiased=False).clamp_min(1e-6)
    return (scores - mean) / std


def combine(slow: torch.Tensor, fast: torch.Tensor, alpha: float) -> torch.Tensor:
    """The re-ranking score of each of a query's top-K candidates (higher first).

    The combined score is rounded to 5 decimals (standardised scores are of order 1), so that
    candidates the two models rank in opposite order tie exactly and keep the Fast order: at
    K = 2 with alpha = 1 each standardised score is ±1 up to float rounding, which decided
    such ties (and changed R@1 when the same model was retrained)."""
    if alpha == 0:
        return slow
    return (_standardise(slow) + alpha * _standardise(fast)).round(decimals=5)


def rerank_order(fast_scores: torch.Tensor, slow_topk: torch.Tensor, k: int, alpha: float = 0.0) -> torch.Tensor:
    """Full ranking ``(queries, items)`` (item ids, best first) after re-ranking the Fast top-``k``.

    ``slow_topk[q, j]`` is the Slow score of the Fast model's ``j``-th best item for query ``q``.
    """
    fast_order = fast_scores.argsort(dim=1, descending=True, stable=True)
    top = fast_order[:, :k]
    top_fast = fast_scores.gather(1, top)
    reordered = combine(slow_topk, top_fast, alpha).argsort(dim=1, descending=True, stable=True)
    return torch.cat([top.gather(1, reordered), fast_order[:, k:]], dim=1)


def order_to_scores(order: torch.Tensor) -> torch.Tensor:
    """Scores that reproduce a ranking, so the metrics of :mod:`fastslow.metrics` apply to it."""
    n_items = order.shape[1]
    scores = torch.empty(order.shape, dtype=torch.float32)
    scores.scatter_(1, order, torch.arange(n_items, 0, -1, dtype=torch.float32).expand_as(order).contiguous())
    return scores


class Reranker:
    """Re-ranks one direction (text-to-image or image-to-text) of a Fast score matrix at any K.

    Slow scores of a (query, item) pair are computed once and reused across K and alpha: a sweep
    over K then costs the largest K's Slow scores only.
    """

    def __init__(self, fast_scores: torch.Tensor, slow_scores: SlowScorer, max_k: int):
        self.fast_scores = fast_scores.float()
        self.max_k = min(max_k, fast_scores.shape[1])
        fast_order = self.fast_scores.argsort(dim=1, descending=True, stable=True)
        self.top_candidates = fast_order[:, : self.max_k]
        rows = np.arange(len(fast_scores))
        self.slow_top = slow_scores(rows, self.top_candidates.numpy()).float()

    def order(self, k: int, alpha: float = 0.0) -> torch.Tensor:
        if not 1 <= k <= self.max_k:
            raise ValueError(f"K must be between 1 and {self.max_k}, got {k}")
        return rerank_order(self.fast_scores, self.slow_top[:, :k], k, alpha)

    def scores(self, k: int, alpha: float = 0.0) -> torch.Tensor:
        return order_to_scores(self.order(k, alpha))


def choose_alpha(reranker: Reranker, evaluate: Callable[[torch.Tensor], float], k: int, alphas: Sequence[float]) -> tuple[float, dict[float, float]]:
    """The alpha whose re-ranked scores ``evaluate`` rates best (use a validation split)."""
    ratings = {alpha: evaluate(reranker.scores(k, alpha)) for alpha in alphas}
    return max(ratings, key=ratings.get), ratings


def k_values(gallery_size: int, ks: Sequence[int] = (1, 2, 5, 10, 20, 50, 100, 200, 500)) -> list[int]:
    """The K sweep: the standard values below the gallery size, then the gallery size itself."""
    return [k for k in ks if k < gallery_size] + [gallery_size]


class Searcher:
    """Text search over a study's test gallery: Fast top-K from a FAISS index, then the Slow model's order."""

    def __init__(
        self, fast_model, slow_model, data, device: str = "cpu", alpha: float = 0.0, index: VectorIndex | None = None
    ):
        """``data``: a :class:`fastslow.stages.Study` (its test split is the gallery). ``index``:
        the Fast model's embeddings of that gallery, id i for image i, in any :class:`VectorIndex`
        (a sharded one too); by default an exact one built here."""
        self.fast_model, self.slow_model, self.data = fast_model, slow_model, data
        self.gallery, self.device, self.alpha = data.test, device, alpha
        if index is None:
            index = VectorIndex.build(embed_images(fast_model, data.visual["test"], device))
        if len(index) != len(self.gallery):
            raise ValueError(f"the index holds {len(index)} items, the test gallery {len(self.gallery)} images")
        self.index = index
        self.visual_tokens = visual_tokens(slow_model, data.visual["test"], device)

    @torch.no_grad()
    def search(self, query: str, k: int = 5, rerank_k: int = 20):
        """The top ``k`` images before (Fast) and after (Fast+Slow) re-ranking the Fast top ``rerank_k``."""
        if not query.strip():
            raise ValueError("the query is empty: type a caption to search for")
        tokens = self.data.slow_encoder(self.slow_model.reads)([query]).to(self.device)
        texts = self.data.fast_texts([query]).to(self.device)
        fast_top, ids = self.index.search(self.fast_model.encode_texts(texts).cpu(), rerank_k)
        slow_top = pair_scores(self.slow_model, self.visual_tokens, tokens, torch.as_tensor(ids))
        order = combine(slow_top, torch.as_tensor(fast_top), self.alpha).argsort(dim=1, descending=True, stable=True)[0]
        rows = []
        for rank in range(min(k, ids.shape[1])):
            after = int(order[rank])
            rows.append(
                {
                    "rank": rank + 1,
                    "fast_image": int(ids[0, rank]),
                    "fast_score": float(fast_top[0, rank]),
                    "fast_slow_image": int(ids[0, after]),
                    "slow_score": float(slow_top[0, after]),
                }
            )
        return pd.DataFrame(rows)

def lookup_scorer(matrix: torch.Tensor) -> SlowScorer:
    """A Slow scorer reading a precomputed ``(queries, items)`` score matrix."""
    return lambda rows, candidates: matrix[torch.as_tensor(rows)[:, None], torch.as_tensor(candidates)]


def fast_slow_sweep(
    fast_scores: torch.Tensor,
    slow_scores: torch.Tensor,
    split: CaptionedImages,
    queries: np.ndarray,
    ks: list[int],
    alpha: float,
    text_to_image_scores: torch.Tensor | None = None,
) -> dict[int, dict[str, Any]]:
    """Metrics of Fast+Slow at each K, both directions (text-to-image re-ranks the Fast top-K
    images of each caption; image-to-text the top-K query captions of each image).
    ``text_to_image_scores``: what text-to-image search ranks by where it is not ``fast_scores``
    (an approximate index's scores, :func:`index_scores`)."""
    t2i_scores = fast_scores if text_to_image_scores is None else text_to_image_scores
    text_to_image = Reranker(t2i_scores, lookup_scorer(slow_scores), max(ks))
    image_to_text = Reranker(fast_scores.T, lookup_scorer(slow_scores.T), max(ks))
    sweep = {}
    for k in ks:
        t2i = metrics.evaluate(text_to_image.scores(min(k, text_to_image.max_k), alpha), split, queries)
        i2t = metrics.evaluate(image_to_text.scores(min(k, image_to_text.max_k), alpha).T, split, queries)
        sweep[k] = {"t2i": t2i["t2i"], "i2t": i2t["i2t"], "ranks": {"t2i": t2i["ranks"]["t2i"], "i2t": i2t["ranks"]["i2t"]},
                    "gallery": t2i["gallery"]}
    return sweep


@dataclass(frozen=True)
class RerankValidation:
    """What the re-ranking settings are chosen on, never the test split: validation captions
    (``queries``, chosen as the headline queries are on test) against the validation gallery,
    with every Slow score and a Reranker over the Fast scores."""

    split: CaptionedImages
    queries: np.ndarray
    slow_scores: torch.Tensor
    reranker: Reranker

    def t2i(self, scores: torch.Tensor) -> dict[str, float]:
        return metrics.evaluate(scores, self.split, self.queries)["t2i"]


def validation_reranker(cfg: StudyConfig, data: Study, fast: Trained, slow: Trained) -> RerankValidation:
    """:class:`RerankValidation` for at most ``cfg.rerank.validation_queries`` validation captions,
    taken as the test's headline queries are (``cfg.headline_captions_per_image`` per image, in
    rounds); the Slow scores are cached, so a rerun costs the Fast scores only.

    On Flickr8k the first caption of 300 validation images chose K and alpha from R@1 values whose
    95% intervals spanned some +-5 points; every caption of its 500 images (2,500) narrows them to
    about +-1.6 at a cost of ~30 s for the Slow scores."""
    val = data.splits["val"]
    queries = headline_queries(val, cfg.headline_captions_per_image)[: cfg.rerank.validation_queries]
    fast_scores = dual_encoder_scores(fast.model, data.visual["val"], data.texts["val"], cfg.device)[queries]
    name = f"val-{config_hash(cfg.data)}"
    texts = data.slow_texts("val", slow.model.reads)
    slow_scores = cached_slow_scores(slow, data.visual["val"], texts, queries, cfg.device, name)
    return RerankValidation(val, queries, slow_scores, Reranker(fast_scores, lookup_scorer(slow_scores), len(val)))


def choose_rerank_alpha(cfg: StudyConfig, validation: RerankValidation) -> tuple[float, dict[float, float]]:
    """The weight of the Fast score in the re-ranking combination, chosen on validation
    (text-to-image R@1 + R@5 + R@10 at K = ``cfg.rerank.alpha_k``)."""

    def rating(scores: torch.Tensor) -> float:
        t2i = validation.t2i(scores)
        return t2i["R@1"] + t2i["R@5"] + t2i["R@10"]

    k = min(cfg.rerank.alpha_k, validation.reranker.max_k)
    return choose_alpha(validation.reranker, rating, k, cfg.rerank.alphas)


def choose_rerank_k(validation: RerankValidation, alpha: float, tolerance: float = 1.0) -> tuple[int, pd.DataFrame]:
    """The re-ranking depth K, chosen on validation: the smallest K below the gallery size whose
    text-to-image R@1 is within ``tolerance`` points of the best validation R@1 of any K or of the
    Slow model alone (the cheapest depth that gets as far as re-ranking gets), else the K with the
    best R@1. Returns K and the validation R@1 by K (K = gallery size is Slow-only).

    Where the Slow model beats the Fast one, the best is usually Slow-only and K the depth that
    comes close to it; where it does not, re-ranking can still help, and the best is some K."""
    gallery = len(validation.split)
    slow_r1 = validation.t2i(validation.slow_scores)["R@1"]
    ks = [k for k in k_values(gallery) if k < gallery]
    r1 = {k: validation.t2i(validation.reranker.scores(k, alpha))["R@1"] for k in ks}
    best = max(slow_r1, *r1.values())
    close = [k for k in ks if r1[k] >= best - tolerance]
    chosen = close[0] if close else max(ks, key=lambda k: r1[k])
    return chosen, pd.DataFrame({"K": [*ks, gallery], "validation t2i R@1": [*r1.values(), slow_r1]})


def large_gallery(cfg: StudyConfig, data: Study, spec: LargerGallery) -> tuple[CaptionedImages, torch.Tensor, np.ndarray] | None:
    """A larger test gallery of ``spec.size`` shapes images (its own seed, never trained on), its
    tokenised captions and its query set; None for datasets without one (and for the pretrained
    backbone, whose features exist only for the study's splits)."""
    if cfg.data.dataset != "shapes" or cfg.dual.encoder.backbone != "tiny":
        return None
    gallery = make_shapes(
        1, 1, spec.size, image_size=cfg.data.image_size,
        captions_per_image=cfg.data.captions_per_image, seed=cfg.data.seed + 1000,
    )["test"]
    tokens = data.tokenizer.encode(gallery.captions, max_len=cfg.dual.encoder.max_caption_tokens)
    queries = headline_queries(gallery, 1)[: spec.queries]
    return gallery, tokens, queries


def fast_index(
    fast: Trained, visual: np.ndarray | FeatureImages, device: str, factory: str = "Flat", shards: int = 1
) -> VectorIndex:
    """A FAISS index of a dual encoder's embeddings of ``visual`` (a split's images as it reads
    them). ``shards`` above 1: the embeddings are written in that many shard files (a temporary
    directory, removed once they are indexed) and indexed shard by shard
    (:meth:`VectorIndex.build_sharded`), each shard with ``factory``."""
    embeddings = embed_images(fast.model, visual, device)
    if shards == 1:
        return VectorIndex.build(embeddings, factory)
    with tempfile.TemporaryDirectory(prefix="fastslow-shards-") as directory:
        return VectorIndex.build_sharded(write_embedding_shards(embeddings, directory, shards), factory)


def large_gallery_sweep(cfg: StudyConfig, data: Study, fast: Trained, slow: Trained, alpha: float) -> list[dict[str, Any]]:
    """The K sweep and the speed-up on each of ``cfg.rerank.larger_galleries``
    (:func:`large_gallery`): per K, Fast+Slow's metrics and latency (``method`` fast_slow), and
    the Slow model alone over the whole gallery (``method`` cross_attention, K None), ready for
    :meth:`fastslow.notebook.Session.record_metrics`, with the gallery's size and text-to-image
    :func:`first_choice_agreement`; nothing where there is no larger gallery.
    Its K values are the test sweep's, so the K chosen on validation is among them. Each gallery's
    index is its ``index``; text-to-image accuracy is computed on what that index returns."""
    measured = []
    for spec in tqdm(cfg.rerank.larger_galleries, desc="larger galleries"):
        if (larger := large_gallery(cfg, data, spec)) is None:
            return []
        measured += _gallery_sweep(cfg, data, fast, slow, alpha, spec, *larger)
    return measured


def first_choice_agreement(fast_scores: torch.Tensor, slow_scores: torch.Tensor, ks: list[int], alpha: float) -> dict[int, float]:
    """Per K, the share of queries (rows) whose first item after re-ranking the Fast top-K is the
    Slow model's own first item over the whole gallery: whether Fast+Slow answers as the Slow
    model alone would, which R@1 cannot tell where the Slow model alone rarely finds the one
    image a caption was written for."""
    reranker = Reranker(fast_scores, lookup_scorer(slow_scores), max(ks))
    slow_first = slow_scores.argmax(dim=1)
    return {k: float((reranker.order(min(k, reranker.max_k), alpha)[:, 0] == slow_first).float().mean()) for k in ks}


def index_scores(index: VectorIndex, queries: torch.Tensor, k: int) -> torch.Tensor:
    """``(Q, N)`` scores as a search of the top ``k`` sees them: the items the index returned for
    a query score what it returned, every other item −inf (ranked after them, by id). An
    approximate index may return fewer than ``k`` (FAISS pads with id −1)."""
    found_scores, found_ids = (torch.as_tensor(a) for a in index.search(queries, k))
    found = found_ids >= 0
    scores = torch.full((len(queries), len(index) + 1), float("-inf"))
    # Padding goes to a spare last column, dropped after.
    scores.scatter_(1, torch.where(found, found_ids.long(), len(index)), torch.where(found, found_scores.float(), float("-inf")))
    return scores[:, :-1]


def _gallery_sweep(cfg, data, fast, slow, alpha, spec, gallery, tokens, queries) -> list[dict[str, Any]]:
    # Each image and query caption embedded once, for the scores and the index alike; the queries'
    # rows only: every caption of 100,000 images against them would take 200 GB.
    image_embeddings = embed_images(fast.model, gallery.images, cfg.device)
    query_embeddings = embed_texts(fast.model, tokens[torch.as_tensor(queries)], cfg.device)
    fast_scores = query_embeddings @ image_embeddings.T
    slow_scores = cached_slow_scores(slow, gallery.images, tokens, queries, cfg.device, name=f"large-{cfg.data.seed + 1000}")
    ks = k_values(len(gallery))
    index = VectorIndex.build(image_embeddings, spec.index)
    # An approximate index ranks text-to-image search by what it returns (image-to-text has no
    # index here and keeps the exact scores).
    searched = None if spec.index == "Flat" else index_scores(index, query_embeddings, max(ks[:-1]))
    path = QueryPath(fast.model, index, slow.model, visual_tokens(slow.model, gallery.images, cfg.device),
                     data.fast_texts, data.slow_encoder(slow.model.reads), cfg.device, cfg.rerank.compiled_queries)
    captions = [gallery.captions[q] for q in queries[: cfg.rerank.latency_queries]]
    latency = latency_by_k(path, captions, ks=ks[:-1], slow_only_captions=spec.slow_only_latency_queries)
    measured = [{"method": "cross_attention", "K": None, "metrics": metrics.evaluate(slow_scores, gallery, queries),
                 "ms_per_query": latency[None], "gallery": len(gallery), "agrees_with_slow_only": 1.0}]
    agreement = first_choice_agreement(fast_scores if searched is None else searched, slow_scores, ks[:-1], alpha)
    for k, result in fast_slow_sweep(fast_scores, slow_scores, gallery, queries, ks[:-1], alpha, searched).items():
        measured.append({"method": "fast_slow", "K": k, "metrics": result, "ms_per_query": latency[k], "gallery": len(gallery),
                         "agrees_with_slow_only": agreement[k]})
    return measured


def speed_up_at_parity(t2i_rows: pd.DataFrame, points: float = 1.0) -> pd.DataFrame:
    """Per gallery of a K sweep (text-to-image rows with columns gallery, method, K, R@1 and
    ms_per_query; ``cross_attention`` rows are the Slow model alone): the smallest K whose
    Fast+Slow R@1 is within ``points`` of Slow-only's, its speed-up over Slow-only per query, and
    that as a share of the limit N / K (what the speed-up would be if a query paid for Slow
    scoring alone). A gallery where no K gets that close has no row, nor one where the Slow
    model alone has no accuracy to reach (its R@1 interval touches 0: every K is "within a point")."""
    rows = []
    for gallery, group in t2i_rows.groupby("gallery"):
        slow_only = group[group["method"] == "cross_attention"]
        fast_slow = group[(group["method"] == "fast_slow") & (group["K"] < gallery)].sort_values("K")
        if slow_only.empty or fast_slow.empty:
            continue
        slow_r1, slow_ms = slow_only["R@1"].iloc[0], slow_only["ms_per_query"].iloc[0]
        if not slow_only["R@1_lo"].iloc[0] > 0:
            continue
        close = fast_slow[fast_slow["R@1"] >= slow_r1 - points]
        if close.empty:
            continue
        at = close.iloc[0]
        speed_up = slow_ms / at["ms_per_query"]
        rows.append({"gallery": int(gallery), "Slow-only R@1": slow_r1, "K": int(at["K"]), "Fast+Slow R@1": at["R@1"],
                     "Slow-only ms": slow_ms, "Fast+Slow ms": at["ms_per_query"], "speed-up": speed_up,
                     "limit N/K": gallery / at["K"], "share of limit": speed_up * at["K"] / gallery})
    return pd.DataFrame(rows)
