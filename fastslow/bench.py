"""Timing, in one place: medians of repeats, because the host sometimes slows down for minutes."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from fastslow.models.encoders import text_input, trim_padding


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def ms_per_item(fn: Callable[[], object], items: int, repeats: int = 5, warmup: int = 1) -> float:
    """Milliseconds per item of a call that processes ``items`` items (median of repeats)."""
    return 1000.0 * median_seconds(fn, repeats=repeats, warmup=warmup) / items


def fast_query_ms(model, index, texts: torch.Tensor, device: str = "cpu", k: int = 10, repeats: int = 5) -> float:
    """Per-query latency of the Fast model: encode one caption, search the index for its top ``k``.

    ``texts``: the captions as the model's text side reads them (``data.texts``: token ids, or
    frozen sentence features, whose encoder then is not part of the time). Queries run one at a
    time, as a user's would; the median over ``repeats`` passes is reported.
    """
    from fastslow.index import single_threaded

    queries = [text_input(texts[i : i + 1]).to(device) for i in range(len(texts))]

    @torch.no_grad()
    def run_all() -> None:
        for query in queries:
            index.search(model.encode_texts(query).cpu(), k)

    with single_threaded():
        return ms_per_item(run_all, items=len(queries), repeats=repeats)


def filler_vectors(real: torch.Tensor, count: int, seed: int) -> np.ndarray:
    """Unit vectors drawn from a Gaussian fitted to ``real`` embeddings (mean and covariance).

    They stand in for gallery items beyond the real ones when measuring how search time grows
    with the gallery: what matters there is the index's work, not what the items depict.
    """
    rng = np.random.default_rng(seed)
    real = real.double().numpy()  # fewer items than dimensions make the covariance singular: eigh copes
    mean, covariance = real.mean(0), np.cov(real, rowvar=False)
    chunks = []
    for start in range(0, count, 100_000):
        draw = rng.multivariate_normal(mean, covariance, size=min(100_000, count - start), method="eigh")
        chunks.append((draw / np.linalg.norm(draw, axis=1, keepdims=True)).astype(np.float32))
    return np.concatenate(chunks) if chunks else np.zeros((0, real.shape[1]), dtype=np.float32)


def index_scaling(
    gallery: torch.Tensor,
    queries: torch.Tensor,
    sizes: Sequence[int],
    factories: dict[str, str],
    k: int = 10,
    seed: int = 0,
    repeats: int = 3,
) -> pd.DataFrame:
    """Per-query search time and recall@k against exact search, for each index and gallery size.

    The real ``gallery`` embeddings come first; :func:`filler_vectors` extend it to each size.
    Queries are searched one at a time (as a user's would), median over ``repeats`` passes.
    """
    from fastslow.index import VectorIndex, recall_against_exact, single_threaded

    largest = max(sizes)
    filler = filler_vectors(gallery, max(0, largest - len(gallery)), seed)
    everything = np.concatenate([gallery.float().numpy(), filler])[:largest]
    query_rows = [q[None] for q in queries.float().numpy()]
    rows = []
    for size in tqdm(sizes, desc="gallery sizes"):
        vectors = everything[:size]
        exact_ids = None
        for name, factory in factories.items():
            # sqrt(N) inverted lists: k-means over 1M vectors then trains in ~10 s on 2 cores
            # (4 sqrt(N), the usual advice, took ~130 s), and with fewer, longer lists the same
            # nprobe scans more candidates (better recall, a slower search).
            factory = factory.format(nlist=max(1, int(np.sqrt(size))))
            started = time.perf_counter()
            index = VectorIndex.build(vectors, factory)
            build_seconds = time.perf_counter() - started
            with single_threaded():
                ms = ms_per_item(lambda: [index.search(q, k) for q in query_rows], len(query_rows), repeats=repeats)
            _, ids = index.search(queries, k)
            exact_ids = ids if exact_ids is None else exact_ids
            rows.append(
                {
                    "gallery_size": size,
                    "index": name,
                    "factory": factory,
                    "build_s": build_seconds,
                    "ms_per_query": ms,
                    f"recall@{k}_vs_exact": recall_against_exact(ids, exact_ids),
                }
            )
    return pd.DataFrame(rows)


def fast_slow_query_ms(
    fast_model, index, slow_model, gallery_tokens: torch.Tensor, texts: torch.Tensor, tokens: torch.Tensor, k: int, device: str = "cpu", repeats: int = 3
) -> float:
    """Per-query latency of Fast+Slow: encode the caption (``texts``, as in :func:`fast_query_ms`),
    search the top ``k``, score those ``k`` with the Slow model (``tokens``: the same captions' word
    ids) against the gallery's cached visual tokens. One query at a time."""
    from fastslow.index import single_threaded
    from fastslow.models.cross_attention import pair_scores

    queries = [(text_input(texts[i : i + 1]).to(device), trim_padding(tokens[i : i + 1]).to(device)) for i in range(len(tokens))]

    @torch.no_grad()
    def run_all() -> None:
        for text, query in queries:
            _, ids = index.search(fast_model.encode_texts(text).cpu(), k)
            pair_scores(slow_model, gallery_tokens, query, torch.as_tensor(ids))

    with single_threaded():
        return ms_per_item(run_all, items=len(queries), repeats=repeats)


def slow_only_query_ms(slow_model, gallery_tokens: torch.Tensor, tokens: torch.Tensor, device: str = "cpu", repeats: int = 3) -> float:
    """Per-query latency of the Slow model alone: every gallery image scored for one caption."""
    from fastslow.models.cross_attention import pair_scores

    everyone = torch.arange(len(gallery_tokens))[None]
    queries = [trim_padding(tokens[i : i + 1]).to(device) for i in range(len(tokens))]

    def run_all() -> None:
        for query in queries:
            pair_scores(slow_model, gallery_tokens, query, everyone)

    return ms_per_item(run_all, items=len(queries), repeats=repeats)
