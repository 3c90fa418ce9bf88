"""fastslow: a reproducible study of fast (dual encoder) and slow (cross-attention) retrieval."""

from __future__ import annotations

import functools

__version__ = "0.1.0"


@functools.lru_cache(maxsize=2)
def _searcher(profile: str | None):
    from fastslow import stages
    from fastslow.config import make_config
    from fastslow.rerank import Searcher

    cfg = make_config(profile)
    data = stages.load_study(cfg)
    fast = stages.train_or_load_dual_encoder(cfg, data)
    slow = stages.train_or_load_cross_attention(cfg, data)
    return Searcher(fast.model, slow.model, data, cfg.device)


def search(query: str, k: int = 5, rerank_k: int = 20, profile: str | None = None):
    """Search the default test gallery for ``query``: the top ``k`` images of the Fast model and,
    after the Slow model re-ranks the Fast top ``rerank_k``, of Fast+Slow. Loads the cached models
    of ``profile`` (default: ``FASTSLOW_PROFILE`` or quick), training them first if needed."""
    return _searcher(profile).search(query, k=k, rerank_k=rerank_k)
