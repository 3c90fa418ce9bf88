"""Timing, in one place: medians of repeats, because the host sometimes slows down for minutes."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from fastslow.models.encoders import trim_padding


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


def fast_query_ms(model, index, tokens: torch.Tensor, device: str = "cpu", k: int = 10, repeats: int = 5) -> float:
    """Per-query latency of the Fast model: encode one caption, search the index for its top ``k``.

    Queries run one at a time, as a user's would; the median over ``repeats`` passes is reported.
    """
    queries = [trim_padding(tokens[i : i + 1]).to(device) for i in range(len(tokens))]

    @torch.no_grad()
    def run_all() -> None:
        for query in queries:
            index.search(model.encode_texts(query).cpu(), k)

    return ms_per_item(run_all, items=len(queries), repeats=repeats)
