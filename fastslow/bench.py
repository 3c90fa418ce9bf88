"""Timing, in one place: medians of repeats, because the host sometimes slows down for minutes.

Timed calls run under ``torch.inference_mode`` (no autograd bookkeeping at all): a Slow call on
one candidate took 2.13 ms against 2.33 under ``no_grad`` on shapes."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Hashable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from fastslow.cache import load_or_build
from fastslow.config import StudyConfig
from fastslow.index import (
    VectorIndex,
    inverted_lists,
    recall_against_exact,
    single_threaded,
    write_embedding_shards,
)
from fastslow.inputs import text_input, trim_padding
from fastslow.models.cross_attention import pair_scores
from fastslow.models.dual_encoder import embed_images, embed_texts
from fastslow.stages import Study, Trained

log = logging.getLogger(__name__)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Per-query latency is timed on one thread, torch and FAISS alike, for Fast, Fast+Slow and
    Slow-only: one query at a time has little to split, the other core is often busy, and a
    speed-up then compares like with like (FAISS's OpenMP setting also reaches torch on some builds,
    so leaving one of the two unset would time the methods on different thread counts)."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with single_threaded():
            yield
    finally:
        torch.set_num_threads(torch_threads)


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


# A query encoder: captions as typed -> what a model's text side reads (token ids or sentence features).
QueryEncoder = Callable[[list[str]], torch.Tensor]


# The stages a query pays for, in the order it pays them.
QUERY_STAGES = ("encode for Fast", "Fast text tower", "index search", "encode for Slow", "Slow scoring")


def _untimed(stage: str, fn: Callable[[], object]) -> object:
    return fn()


def compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` through ``torch.compile`` (sizes left dynamic, so captions of other lengths and other
    K reuse the compiled code), or ``fn`` itself from the first call that fails to compile (no C++
    compiler on the machine, an operation the compiler cannot take), with a warning.

    What it buys on shapes, 1 thread, eager against compiled in interleaved passes (median ms):
    a Slow call on K = 1 candidate 1.19 against 0.64, on K = 20 2.07 against 1.53, the whole
    1,000-image gallery 55 against 49; the text tower 0.63 against 0.45. Most of a small call is
    the dispatch of a hundred small operations, which the compiled code fuses. The first call of
    each new shape compiles (seconds), so timers warm up first."""
    current = torch.compile(fn, dynamic=True)

    def call(*args, **kwargs):
        nonlocal current
        try:
            return current(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any compiler failure: run as written instead
            if current is fn:
                raise
            log.warning("torch.compile failed (%s: %s); timing %s as written", type(error).__name__,
                        str(error).splitlines()[0] if str(error) else "", getattr(fn, "__qualname__", fn))
            current = fn
            return fn(*args, **kwargs)

    return call


@dataclasses.dataclass
class QueryPath:
    """Everything typed queries go through, in one place for every timer (built once and handed to
    :func:`latency_by_k`, :func:`query_latency_breakdown` and :func:`throughput`): turn the captions into
    the Fast text side's input (``encode_fast``: tokenising, and the frozen MiniLM with the
    pretrained backbone), embed them, search the index for each one's top K, turn the captions into
    what the Slow model reads (``encode_slow``; not again when it equals ``encode_fast``: the ids
    the Fast side read serve) and score the candidates against the gallery's
    cached visual tokens. Each stage runs through ``clock(stage, fn)`` (:data:`QUERY_STAGES`).

    ``compiled``: the Fast text tower and the Slow scorer run through :func:`compiled`, as a
    service would deploy them (the scores are the models' own, to float rounding: tested)."""

    fast_model: object = None
    index: object = None
    slow_model: object = None
    gallery_tokens: torch.Tensor | None = None
    encode_fast: QueryEncoder | None = None
    encode_slow: QueryEncoder | None = None
    device: str = "cpu"
    compiled: bool = False
    _embed_texts: Callable[[torch.Tensor], torch.Tensor] | None = dataclasses.field(init=False, repr=False)
    _score_block: Callable[..., torch.Tensor] | None = dataclasses.field(init=False, repr=False)
    _same_ids: bool = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        embed = self.fast_model.encode_texts if self.fast_model is not None else None
        score = self.slow_model.score_pairs if self.slow_model is not None else None
        self._embed_texts = compiled(embed) if self.compiled and embed else embed
        self._score_block = compiled(score) if self.compiled and score else score
        self._same_ids = self.encode_slow is not None and self.encode_slow == self.encode_fast

    def answer(self, captions: list[str], k: int | None, slow: bool, clock=_untimed) -> None:
        """Fast's top ``k`` of each caption (``k`` None: no Fast stage, every gallery item a
        candidate), then, if ``slow``, the Slow scores of the candidates."""
        if k is not None:
            text = clock("encode for Fast", lambda: text_input(self.encode_fast(captions)).to(self.device))
            embeddings = clock("Fast text tower", lambda: self._embed_texts(text).cpu())
            _, ids = clock("index search", lambda: self.index.search(embeddings, k))
            candidates = torch.as_tensor(ids)
        else:
            candidates = torch.arange(len(self.gallery_tokens)).expand(len(captions), -1)
        if slow:
            if k is not None and self._same_ids:
                tokens = text
            else:
                tokens = clock("encode for Slow", lambda: trim_padding(self.encode_slow(captions)).to(self.device))
            clock("Slow scoring", lambda: self.slow_scores(tokens, candidates))

    def slow_scores(self, tokens: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``(Q, K)`` Slow scores of caption rows ``tokens`` against gallery ``candidates``, as
        the timed path computes them (:func:`~fastslow.models.cross_attention.pair_scores`)."""
        return pair_scores(self.slow_model, self.gallery_tokens, tokens, candidates, score_block=self._score_block)

    def ms_per_query(self, captions: list[str], k: int | None, slow: bool, repeats: int) -> float:
        """Milliseconds per query, one query at a time on one thread (:func:`one_thread`), as a
        user's would run; the median over ``repeats`` passes."""

        @torch.inference_mode()
        def run_all() -> None:
            for caption in captions:
                self.answer([caption], k, slow)

        with one_thread():
            return ms_per_item(run_all, items=len(captions), repeats=repeats)

    def queries_per_second(self, captions: list[str], k: int | None, slow: bool, batch: int, repeats: int) -> float:
        """Queries answered per second, ``batch`` queries at a time on every core (torch's and
        FAISS's threads as they are): a service's throughput; the median over ``repeats`` passes."""

        @torch.inference_mode()
        def run_all() -> None:
            for start in range(0, len(captions), batch):
                self.answer(captions[start : start + batch], k, slow)

        return 1000.0 / ms_per_item(run_all, items=len(captions), repeats=repeats)


def fast_query_ms(
    model, index, captions: list[str], *, encode: QueryEncoder, device: str = "cpu", k: int = 10, repeats: int = 5,
    compiled: bool = False,
) -> float:
    """Per-query latency of the Fast model, everything a query pays for: encode the typed caption
    (``encode``), embed it, search the index for its top ``k`` (:class:`QueryPath`)."""
    path = QueryPath(fast_model=model, index=index, encode_fast=encode, device=device, compiled=compiled)
    return path.ms_per_query(captions, k, slow=False, repeats=repeats)


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
    largest = max(sizes)
    filler = filler_vectors(gallery, max(0, largest - len(gallery)), seed)
    everything = np.concatenate([gallery.float().numpy(), filler])[:largest]
    query_rows = [q[None] for q in queries.float().numpy()]
    rows = []
    for size in tqdm(sizes, desc="gallery sizes"):
        vectors = everything[:size]
        exact_ids = None
        for name, factory in factories.items():
            factory = factory.format(nlist=inverted_lists(size))
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


def sharded_index_scaling(
    gallery: torch.Tensor,
    queries: torch.Tensor,
    items: int,
    shard_counts: Sequence[int],
    factories: dict[str, str],
    *,
    ivf_nprobe: int = 16,
    timed_queries: int = 20,
    k: int = 10,
    seed: int = 0,
    rounds: int = 3,
) -> pd.DataFrame:
    """Build time, per-query search time and recall@k against exact search of an index sharded
    in each of ``shard_counts`` shards (:meth:`~fastslow.index.VectorIndex.build_sharded`), for
    each of ``factories`` (the index of one shard), over ``items`` vectors: the real ``gallery``
    embeddings first, :func:`filler_vectors` after them.

    Each shard count's embeddings are written to a temporary directory (``write_s``), indexed
    from there shard by shard (``build_s``) and removed. The first row is the reference, one
    exact index over every item (``shards`` 1), whose answers the recall is measured against, on
    every query. Search time: the first ``timed_queries`` queries one at a time on one thread
    (as :func:`index_scaling` times them; the shards are searched one after the other), every
    index in each of ``rounds`` interleaved rounds (:func:`interleaved_ms_per_item`), since the
    table compares the indexes with each other."""
    filler = filler_vectors(gallery, max(0, items - len(gallery)), seed)
    everything = np.concatenate([gallery.float().numpy(), filler])[:items]
    del filler
    started = time.perf_counter()
    reference = (1, "exact, one index")
    indexes = {reference: VectorIndex.build(everything, "Flat")}
    rows = {reference: {"shard_factory": "Flat", "write_s": 0.0, "build_s": time.perf_counter() - started}}
    for shards in tqdm(shard_counts, desc="shard counts", leave=False):
        with tempfile.TemporaryDirectory(prefix="fastslow-shards-") as directory:
            started = time.perf_counter()
            files = write_embedding_shards(everything, directory, shards)
            write_seconds = time.perf_counter() - started
            for name, factory in factories.items():
                started = time.perf_counter()
                index = VectorIndex.build_sharded(files, factory, ivf_nprobe=ivf_nprobe)
                build_seconds = time.perf_counter() - started
                shard_factories = sorted({factory.format(nlist=inverted_lists(s.ntotal)) for s in index.shards})
                indexes[shards, name] = index
                rows[shards, name] = {"shard_factory": " / ".join(shard_factories), "write_s": write_seconds,
                                      "build_s": build_seconds}
    del everything
    timed_rows = [q[None] for q in queries.float().numpy()[:timed_queries]]

    def search_each(index: VectorIndex) -> Callable[[], None]:
        return lambda: [index.search(q, k) for q in timed_rows]

    with single_threaded():
        ms = interleaved_ms_per_item({key: (search_each(i), len(timed_rows)) for key, i in indexes.items()}, rounds,
                                     desc="search rounds")
    exact_ids = indexes[reference].search(queries, k)[1]
    return pd.DataFrame(
        [{"shards": shards, "index": name, **rows[shards, name], "ms_per_query": ms[shards, name],
          f"recall@{k}_vs_exact": recall_against_exact(index.search(queries, k)[1], exact_ids)}
         for (shards, name), index in indexes.items()]
    )


def fast_slow_query_ms(
    fast_model,
    index,
    slow_model,
    gallery_tokens: torch.Tensor,
    captions: list[str],
    *,
    encode_fast: QueryEncoder,
    encode_slow: QueryEncoder,
    k: int,
    device: str = "cpu",
    repeats: int = 3,
    compiled: bool = False,
) -> float:
    """Per-query latency of Fast+Slow, everything a query pays for: encode the typed caption for
    both models, search the Fast top ``k``, score those ``k`` with the Slow model against the
    gallery's cached visual tokens (:class:`QueryPath`)."""
    path = QueryPath(fast_model, index, slow_model, gallery_tokens, encode_fast, encode_slow, device, compiled)
    return path.ms_per_query(captions, k, slow=True, repeats=repeats)


def slow_only_query_ms(
    slow_model, gallery_tokens: torch.Tensor, captions: list[str], *, encode_slow: QueryEncoder, device: str = "cpu",
    repeats: int = 3, compiled: bool = False,
) -> float:
    """Per-query latency of the Slow model alone: encode the typed caption and score every
    gallery image for it (:class:`QueryPath`)."""
    path = QueryPath(slow_model=slow_model, gallery_tokens=gallery_tokens, encode_slow=encode_slow, device=device,
                     compiled=compiled)
    return path.ms_per_query(captions, None, slow=True, repeats=repeats)


def interleaved_ms_per_item(
    passes: dict[Hashable, tuple[Callable[[], object], int]], rounds: int = 5, desc: str = "timing rounds"
) -> dict[Hashable, float]:
    """Milliseconds per item of each of ``passes`` ({key: (a call, the items it processes)}),
    timed in interleaved rounds, each round one call of every pass in turn after a warm-up round,
    and each pass's figure its median over the rounds: a slowdown of the host (here it slows to a
    third for minutes) then hits every pass alike, so their ratios hold, where passes timed one
    after the other could set a fast minute against a slow one. Each round starts one pass further
    on, so no pass always follows the same one (a pass over a large gallery leaves the caches
    cold for the next)."""
    keys = list(passes)
    times: dict[Hashable, list[float]] = {key: [] for key in keys}
    for round_index in tqdm(range(rounds + 1), desc=desc, leave=False):
        start = round_index % len(keys)
        for key in keys[start:] + keys[:start]:
            call, items = passes[key]
            started = time.perf_counter()
            call()
            if round_index:  # round 0 warms up
                times[key].append(1000.0 * (time.perf_counter() - started) / items)
    return {key: statistics.median(ms) for key, ms in times.items()}


def latency_by_k(
    path: QueryPath, captions: list[str], *, ks: Sequence[int], slow_only_captions: int | None = None, rounds: int = 5
) -> dict[int | None, float]:
    """Milliseconds per query of Fast+Slow at each K of ``ks`` and, under the key None, of the
    Slow model alone (on the first ``slow_only_captions`` captions, all by default; 0: not
    timed), one query at a time on one thread, everything included (:class:`QueryPath`), timed
    in interleaved rounds (:func:`interleaved_ms_per_item`)."""
    slow_only = captions[:slow_only_captions] if slow_only_captions is not None else captions
    plans = [(k, captions) for k in ks] + ([(None, slow_only)] if slow_only else [])

    def one_pass(k: int | None, texts: list[str]) -> Callable[[], None]:
        @torch.inference_mode()
        def answer_each() -> None:
            for caption in texts:
                path.answer([caption], k, slow=True)

        return answer_each

    with one_thread():
        return interleaved_ms_per_item({k: (one_pass(k, texts), len(texts)) for k, texts in plans}, rounds,
                                       desc="latency rounds")


def query_latency_breakdown(path: QueryPath, captions: list[str], *, ks: Sequence[int], repeats: int = 3) -> pd.DataFrame:
    """Where a query's time goes: milliseconds per query of each of :data:`QUERY_STAGES`, for Fast
    (K = 1, no Slow stages), Fast+Slow at each K of ``ks`` and Slow-only (every gallery item
    scored; no Fast stages). One query at a time on one thread (:func:`one_thread`), each stage
    timed around its own call; per stage the median over ``repeats`` passes. Columns: method, K,
    stage, ms_per_query; ``other`` is what the stages leave of the whole query's time."""

    def timed_pass(k: int | None, slow: bool) -> dict[str, float]:
        spent = dict.fromkeys(QUERY_STAGES, 0.0) | {"whole query": 0.0}

        def clock(stage: str, fn: Callable[[], object]):
            started = time.perf_counter()
            value = fn()
            spent[stage] += time.perf_counter() - started
            return value

        for caption in captions:
            started = time.perf_counter()
            path.answer([caption], k, slow, clock)
            spent["whole query"] += time.perf_counter() - started
        return spent

    plans = [("fast", 1, False), *[("fast_slow", k, True) for k in ks], ("slow_only", None, True)]
    rows = []
    with one_thread(), torch.inference_mode():
        for method, k, slow in plans:
            timed_pass(k, slow)  # warm-up
            passes = [timed_pass(k, slow) for _ in range(repeats)]
            medians = {stage: 1000.0 * statistics.median(p[stage] for p in passes) / len(captions) for stage in passes[0]}
            medians["other"] = max(0.0, medians.pop("whole query") - sum(medians[s] for s in QUERY_STAGES))
            rows += [{"method": method, "K": k if k is not None else len(path.gallery_tokens), "stage": stage, "ms_per_query": ms}
                     for stage, ms in medians.items()]
    return pd.DataFrame(rows)


# The stages that read nothing but their own inputs: text preprocessing is left out, as on real
# captions both encoders share one MiniLM pass (the Slow one reads what the Fast one just computed).
MODEL_STAGES = ("Fast text tower", "index search", "Slow scoring")


def stage_ms_alone(path: QueryPath, captions: list[str], *, k: int, repeats: int = 3) -> dict[str, float]:
    """Milliseconds per query of each of :data:`MODEL_STAGES` of Fast+Slow at ``k`` run on its own:
    every caption's call of that stage back to back, on the inputs one pass of whole queries handed
    it, one thread; per stage the median over ``repeats`` passes.

    Beside :func:`query_latency_breakdown`'s times of the same stages inside whole queries, the
    difference is what a query pays for switching between stages rather than for their work: in a
    query each stage starts on caches (and branch history) that the stage before it filled."""
    calls: dict[str, list[Callable[[], object]]] = {stage: [] for stage in MODEL_STAGES}

    def record(stage: str, fn: Callable[[], object]):
        if stage in calls:
            calls[stage].append(fn)
        return fn()

    def back_to_back(stage_calls: list[Callable[[], object]]) -> Callable[[], None]:
        def run() -> None:
            for call in stage_calls:
                call()

        return run

    with one_thread(), torch.inference_mode():
        for caption in captions:
            path.answer([caption], k, True, record)
        return {stage: ms_per_item(back_to_back(stage_calls), items=len(captions), repeats=repeats)
                for stage, stage_calls in calls.items()}


def throughput(path: QueryPath, captions: list[str], *, k: int, batch: int, repeats: int = 3) -> pd.DataFrame:
    """Queries per second of Fast, Fast+Slow at ``k`` and Slow-only, one query at a time on one
    thread (what :func:`fast_query_ms` and friends time) and ``batch`` queries at a time on every
    core (:meth:`QueryPath.queries_per_second`). Columns: method, K, batch, threads,
    queries_per_second."""
    plans = [("fast", k, False), ("fast_slow", k, True), ("slow_only", None, True)]
    rows = []
    for method, plan_k, slow in plans:
        one_at_a_time = 1000.0 / path.ms_per_query(captions, plan_k, slow, repeats)
        batched = path.queries_per_second(captions, plan_k, slow, batch, repeats)
        shown_k = plan_k if plan_k is not None else len(path.gallery_tokens)
        rows += [
            {"method": method, "K": shown_k, "batch": 1, "threads": 1, "queries_per_second": one_at_a_time},
            {"method": method, "K": shown_k, "batch": batch, "threads": torch.get_num_threads(),
             "queries_per_second": batched},
        ]
    return pd.DataFrame(rows)


def speed_up_by_k(breakdown: pd.DataFrame) -> pd.DataFrame:
    """Slow-only time ÷ Fast+Slow time per query at each K of a :func:`query_latency_breakdown`:
    ``measured``; ``ideal``, if scoring K candidates cost K times the Slow model's cost per pair
    ``c`` (measured over the whole gallery) and the rest of the query what it measured,
    ``N c / (rest + K c)``; and ``limit``, N / K, the ratio with nothing but Slow scoring."""
    totals = breakdown.groupby(["method", "K"])["ms_per_query"].sum()
    slow_only = breakdown[breakdown["method"] == "slow_only"]
    gallery = int(slow_only["K"].iloc[0])
    slow_only_ms = totals["slow_only"].iloc[0]
    per_pair = slow_only.set_index("stage").loc["Slow scoring", "ms_per_query"] / gallery
    fast_slow = breakdown[breakdown["method"] == "fast_slow"]
    scoring = fast_slow[fast_slow["stage"] == "Slow scoring"].set_index("K")["ms_per_query"]
    rows = []
    for k, total in totals["fast_slow"].items():
        rest = total - scoring[k]
        rows.append({"K": k, "measured": slow_only_ms / total, "ideal": gallery * per_pair / (rest + k * per_pair),
                     "limit": gallery / k, "fast_slow_ms": total, "slow_scoring_ms": scoring[k], "rest_ms": rest})
    return pd.DataFrame(rows)


def fast_index_scaling(cfg: StudyConfig, data: Study, fast: Trained) -> pd.DataFrame:
    """:func:`fastslow.bench.index_scaling` on the dual encoder's test embeddings, cached."""
    measured = ("latency_queries", "scale_sizes", "approximate_indexes")
    key = {"model": fast.config_hash, "data": cfg.data} | {f: getattr(cfg.rerank, f) for f in measured}

    def build() -> pd.DataFrame:
        gallery = embed_images(fast.model, data.visual["test"], cfg.device)
        queries = data.headline_queries()[: max(20, cfg.rerank.latency_queries)]
        query_embeddings = embed_texts(fast.model, data.texts["test"][torch.as_tensor(queries)], cfg.device)
        factories = {"exact": "Flat", **dict(cfg.rerank.approximate_indexes)}
        return index_scaling(gallery, query_embeddings, cfg.rerank.scale_sizes, factories, seed=cfg.seed)

    # Stored as columns of plain values: the cache loads with weights_only=True, which refuses DataFrames.
    return load_or_build(
        "index_scaling", key, build, to_stored=lambda table: table.to_dict("list"), from_stored=pd.DataFrame
    )


def fast_sharded_index_scaling(cfg: StudyConfig, data: Study, fast: Trained) -> pd.DataFrame:
    """:func:`sharded_index_scaling` on the dual encoder's test embeddings, cached: recall on
    the first 200 headline queries (each costs an exact search of every item, ~7 ms at 1M),
    search time on the first ``max(20, cfg.rerank.latency_queries)`` of them."""
    measured = ("latency_queries", "sharded_items", "index_shards", "sharded_indexes", "sharded_ivf_nprobe")
    key = {"model": fast.config_hash, "data": cfg.data} | {f: getattr(cfg.rerank, f) for f in measured}

    def build() -> pd.DataFrame:
        gallery = embed_images(fast.model, data.visual["test"], cfg.device)
        queries = data.headline_queries()[:200]
        query_embeddings = embed_texts(fast.model, data.texts["test"][torch.as_tensor(queries)], cfg.device)
        return sharded_index_scaling(
            gallery, query_embeddings, cfg.rerank.sharded_items, cfg.rerank.index_shards,
            dict(cfg.rerank.sharded_indexes), ivf_nprobe=cfg.rerank.sharded_ivf_nprobe,
            timed_queries=max(20, cfg.rerank.latency_queries), seed=cfg.seed,
        )

    return load_or_build(
        "sharded_index_scaling", key, build, to_stored=lambda table: table.to_dict("list"), from_stored=pd.DataFrame
    )


def latency_by_gallery_size(
    scaling: pd.DataFrame, slow_ms_per_pair: float, k: int, fast_slow_ms: float, slow_only_ms: dict[int, float]
) -> pd.DataFrame:
    """Per-query latency by gallery size: each index measured; Slow-only measured where
    ``slow_only_ms`` ({gallery size: ms per query}) has it and extrapolated (cost per pair x size)
    at the other sizes; Fast+Slow from measured parts (HNSW search at that size + the measured
    encode-and-score-K cost at the real gallery)."""
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
    for size in sorted(set(scaling["gallery_size"]) | set(slow_only_ms)):
        rows.append({"method": "Slow only", "gallery_size": size, "ms_per_query": slow_only_ms.get(size, slow_ms_per_pair * size),
                     "measured": size in slow_only_ms})
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
