"""Fast + Slow: retrieve the top-K with the dual encoder, re-rank those K with the cross-attention model.

Re-ranked items keep their place above the rest; items outside the top-K keep the Fast order below
them. The re-ranking score is the Slow score alone (``alpha = 0``) or a combination in the manner of
BLIP adding ITM and ITC scores: both scores standardised within each query's top-K (mean 0, std 1),
then ``slow + alpha * fast``. ``alpha`` is chosen on validation (:func:`choose_alpha`), never on test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

# slow_scores(rows, candidates): the Slow score of row-query rows[r] with candidate candidates[r, k]
SlowScorer = Callable[[np.ndarray, np.ndarray], torch.Tensor]


def _standardise(scores: torch.Tensor) -> torch.Tensor:
    mean = scores.mean(dim=1, keepdim=True)
    std = scores.std(dim=1, keepdim=True, unbiased=False).clamp_min(1e-6)
    return (scores - mean) / std


def combine(slow: torch.Tensor, fast: torch.Tensor, alpha: float) -> torch.Tensor:
    """The re-ranking score of each of a query's top-K candidates (higher first)."""
    if alpha == 0:
        return slow
    return _standardise(slow) + alpha * _standardise(fast)


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

    def __init__(self, fast_model, slow_model, data, device: str = "cpu", alpha: float = 0.0):
        """``data``: a :class:`fastslow.pipeline.Study` (its test split is the gallery)."""
        from fastslow.index import VectorIndex
        from fastslow.models.cross_attention import visual_tokens
        from fastslow.models.dual_encoder import embed_images

        self.fast_model, self.slow_model, self.data = fast_model, slow_model, data
        self.gallery, self.device, self.alpha = data.test, device, alpha
        self.index = VectorIndex.build(embed_images(fast_model, data.visual["test"], device))
        self.visual_tokens = visual_tokens(slow_model, data.visual["test"], device)

    @torch.no_grad()
    def search(self, query: str, k: int = 5, rerank_k: int = 20):
        """The top ``k`` images before (Fast) and after (Fast+Slow) re-ranking the Fast top ``rerank_k``."""
        import pandas as pd

        from fastslow.models.cross_attention import pair_scores

        if not query.strip():
            raise ValueError("the query is empty: type a caption to search for")
        encoder = self.data.config.cross.encoder
        tokens = self.data.tokenizer.encode([query], max_len=encoder.max_caption_tokens).to(self.device)
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
