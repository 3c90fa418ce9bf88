"""Fast top-K re-ranked by a Slow scorer: the edge cases that define it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fastslow import metrics
from fastslow.rerank import Reranker, choose_rerank_k, k_values, order_to_scores


def _scores(seed: int, queries: int = 12, items: int = 30):
    generator = torch.Generator().manual_seed(seed)
    fast = torch.randn(queries, items, generator=generator)
    slow = torch.randn(queries, items, generator=generator)
    return fast, slow


def _scorer(slow: torch.Tensor, calls: list):
    def slow_scores(rows: np.ndarray, candidates: np.ndarray) -> torch.Tensor:
        calls.append(candidates.size)
        return slow[torch.as_tensor(rows)[:, None], torch.as_tensor(candidates)]

    return slow_scores


def test_k_equal_to_the_gallery_gives_the_slow_ranking():
    fast, slow = _scores(0)
    reranker = Reranker(fast, _scorer(slow, []), max_k=fast.shape[1])
    assert torch.equal(reranker.order(fast.shape[1]), slow.argsort(dim=1, descending=True))


def test_k_of_one_gives_the_fast_ranking():
    fast, slow = _scores(1)
    reranker = Reranker(fast, _scorer(slow, []), max_k=10)
    assert torch.equal(reranker.order(1), fast.argsort(dim=1, descending=True))


def test_alpha_zero_orders_the_top_k_by_slow_and_keeps_the_rest_in_fast_order():
    fast, slow = _scores(2)
    k = 7
    order = Reranker(fast, _scorer(slow, []), max_k=10).order(k, alpha=0.0)
    fast_order = fast.argsort(dim=1, descending=True)
    for q in range(len(fast)):
        top = fast_order[q, :k]
        assert set(order[q, :k].tolist()) == set(top.tolist())
        slow_of_reranked = slow[q, order[q, :k]]
        assert torch.all(slow_of_reranked[:-1] >= slow_of_reranked[1:])
        assert torch.equal(order[q, k:], fast_order[q, k:])


def test_a_large_alpha_returns_to_the_fast_order():
    fast, slow = _scores(3)
    order = Reranker(fast, _scorer(slow, []), max_k=10).order(10, alpha=1e6)
    assert torch.equal(order, fast.argsort(dim=1, descending=True))


def test_slow_scores_are_computed_once_for_the_whole_sweep():
    fast, slow = _scores(4)
    calls: list[int] = []
    reranker = Reranker(fast, _scorer(slow, calls), max_k=20)
    for k in (1, 5, 20):
        reranker.order(k)
    assert calls == [fast.shape[0] * 20]


def test_order_scores_reproduce_the_ranking_for_the_metrics():
    fast, _ = _scores(5)
    order = fast.argsort(dim=1, descending=True)
    caption_image = np.arange(len(fast)) % fast.shape[1]
    direct = metrics.retrieval_metrics(fast, caption_image)["t2i"]
    via_order = metrics.retrieval_metrics(order_to_scores(order), caption_image)["t2i"]
    assert direct == via_order


def test_k_values_end_at_the_gallery_size():
    assert k_values(30) == [1, 2, 5, 10, 20, 30]
    assert k_values(1000)[-1] == 1000


def test_the_search_box_stays_idle_in_batch_runs(monkeypatch):
    from fastslow import plots

    class NoSearch:
        def search(self, *args, **kwargs):
            raise AssertionError("a batch run must not search inside a widget")

    monkeypatch.setenv("FASTSLOW_BATCH", "1")
    box = plots.search_widget(NoSearch(), gallery=None, query="a red circle")
    assert box.value == "a red circle"


def test_query_latency_includes_encoding_the_typed_caption(monkeypatch):
    from fastslow import bench
    from fastslow.index import VectorIndex

    encoded = []

    def encode(captions: list[str]) -> torch.Tensor:
        encoded.extend(captions)
        return torch.ones(len(captions), 4)

    class Fast:
        def encode_texts(self, texts):
            return torch.nn.functional.normalize(texts, dim=-1)

    scored = []
    monkeypatch.setattr(bench, "pair_scores", lambda model, gallery, tokens, ids, **_: scored.append(ids.shape))
    index = VectorIndex.build(torch.nn.functional.normalize(torch.randn(50, 4), dim=-1))
    captions = ["a red circle", "a blue square"]
    bench.fast_query_ms(Fast(), index, captions, encode=encode, repeats=2)
    assert encoded == captions * 3  # one warm-up pass and two timed ones, every query encoded each time
    encoded.clear()
    bench.fast_slow_query_ms(Fast(), index, None, torch.zeros(50, 1, 1), captions, encode_fast=encode,
                             encode_slow=lambda c: encode(c).long(), k=5, repeats=1)
    assert encoded == [c for c in captions for _ in range(2)] * 2  # both models' encoders, per query
    assert set(scored) == {(1, 5)}  # the Slow model scores the Fast top 5 of each query
    encoded.clear()
    bench.fast_slow_query_ms(Fast(), index, None, torch.zeros(50, 1, 1), captions, encode_fast=encode,
                             encode_slow=encode, k=5, repeats=1)
    assert encoded == captions * 2  # models that read the same input: each query encoded once


def test_latency_breakdown_times_each_stage_where_it_is_paid(monkeypatch):
    """On a clock that moves only when a stage does its (fake) work, every stage's time and every
    ratio is exact: the bookkeeping is tested, not the host's timer."""
    from types import SimpleNamespace

    from fastslow import bench
    from fastslow.index import VectorIndex

    clock = SimpleNamespace(ms=0.0)
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock.ms / 1000.0))

    def spend(ms, value=None):
        clock.ms += ms
        return value

    class Fast:
        def encode_texts(self, texts):
            return spend(0.1, torch.nn.functional.normalize(texts, dim=-1))

    # Costs in ms: tokenising for Fast 0.3, its text tower 0.1, tokenising for Slow 0.2, 0.2 a pair.
    monkeypatch.setattr(bench, "pair_scores", lambda model, gallery, tokens, ids, **_: spend(0.2 * ids.shape[1]))
    index = VectorIndex.build(torch.nn.functional.normalize(torch.randn(50, 4), dim=-1))
    path = bench.QueryPath(Fast(), index, None, torch.zeros(50, 1, 1),
                           encode_fast=lambda c: spend(0.3, torch.ones(len(c), 4)),
                           encode_slow=lambda c: spend(0.2, torch.ones(len(c), 3).long()))
    breakdown = bench.query_latency_breakdown(path, ["a red circle", "a blue square"], ks=[1, 10], repeats=1)
    ms = breakdown.set_index(["method", "K", "stage"])["ms_per_query"]
    expected = {("fast", 1): {"encode for Fast": 0.3, "Fast text tower": 0.1},
                ("fast_slow", 10): {"encode for Fast": 0.3, "Fast text tower": 0.1, "encode for Slow": 0.2,
                                    "Slow scoring": 2.0},
                ("slow_only", 50): {"encode for Slow": 0.2, "Slow scoring": 10.0}}
    for (method, k), stages in expected.items():
        for stage in (*bench.QUERY_STAGES, "other"):
            assert ms[method, k, stage] == pytest.approx(stages.get(stage, 0.0), abs=1e-9), (method, k, stage)
    speed_up = bench.speed_up_by_k(breakdown).set_index("K")
    assert list(speed_up.index) == [1, 10] and (speed_up["limit"] == [50, 5]).all()
    # Slow-only costs 10.2 ms (0.2 a pair); Fast+Slow 0.6 ms besides scoring its K pairs.
    assert speed_up["measured"].tolist() == pytest.approx([10.2 / 0.8, 10.2 / 2.6])
    assert speed_up["ideal"].tolist() == pytest.approx([10.0 / 0.8, 10.0 / 2.6])
    assert (speed_up["ideal"] <= speed_up["limit"]).all()


def test_stages_alone_replay_each_stage_of_the_queries_back_to_back(monkeypatch):
    """Each stage's recorded calls run again on their own, with the inputs the whole queries
    handed them; on a clock that moves only when a stage works, its time per query is exact."""
    from types import SimpleNamespace

    from fastslow import bench
    from fastslow.index import VectorIndex

    clock = SimpleNamespace(ms=0.0)
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock.ms / 1000.0))
    towers, scored = [], []

    def spend(ms, value=None):
        clock.ms += ms
        return value

    class Fast:
        def encode_texts(self, texts):
            towers.append(texts[0, 0].item())
            return spend(0.1, torch.nn.functional.normalize(texts, dim=-1))

    def score(model, gallery, tokens, ids, **_):
        scored.append((tokens[0, 0].item(), ids.shape))
        return spend(0.2 * ids.shape[1])

    monkeypatch.setattr(bench, "pair_scores", score)
    index = VectorIndex.build(torch.nn.functional.normalize(torch.randn(50, 4), dim=-1))
    path = bench.QueryPath(Fast(), index, None, torch.zeros(50, 1, 1),
                           encode_fast=lambda c: spend(0.3, torch.full((len(c), 4), float(len(c[0])))),
                           encode_slow=lambda c: spend(0.2, torch.full((len(c), 3), len(c[0]))))
    captions = ["a red circle", "a blue square above"]
    alone = bench.stage_ms_alone(path, captions, k=10, repeats=2)
    # Text preprocessing is not replayed (on real captions both encoders share one MiniLM pass).
    assert alone == pytest.approx({"Fast text tower": 0.1, "index search": 0.0, "Slow scoring": 2.0}, abs=1e-9)
    lengths = [float(len(c)) for c in captions]
    # One pass of whole queries, then each stage's warm-up and two timed passes over both captions.
    assert towers == lengths * 4
    assert scored == [(len(c), (1, 10)) for c in captions] * 4


def test_throughput_answers_a_batch_of_queries_in_one_call(monkeypatch):
    from fastslow import bench
    from fastslow.index import VectorIndex

    class Fast:
        def encode_texts(self, texts):
            return torch.nn.functional.normalize(texts, dim=-1)

    scored = []
    monkeypatch.setattr(bench, "pair_scores", lambda model, gallery, tokens, ids, **_: scored.append((len(tokens), *ids.shape)))
    index = VectorIndex.build(torch.nn.functional.normalize(torch.randn(50, 4), dim=-1))
    path = bench.QueryPath(Fast(), index, None, torch.zeros(50, 1, 1), encode_fast=lambda c: torch.randn(len(c), 4),
                           encode_slow=lambda c: torch.ones(len(c), 3).long())
    table = bench.throughput(path, [f"caption {i}" for i in range(5)], k=5, batch=2, repeats=1)
    # Batches of 2, 2 and 1 queries: each batch's tokens and top 5 (or whole gallery) in one call.
    assert {(2, 2, 5), (1, 1, 5), (2, 2, 50), (1, 1, 50)} <= set(scored)
    assert set(table["method"]) == {"fast", "fast_slow", "slow_only"} and set(table["batch"]) == {1, 2}
    assert (table["queries_per_second"] > 0).all()
    assert table.set_index(["method", "batch"])["K"].to_dict()[("slow_only", 2)] == 50


def test_latency_is_timed_on_one_thread_and_the_setting_restored():
    from fastslow import bench

    before = torch.get_num_threads()
    with bench.one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


class _ValidationByK:
    """A stand-in for :class:`fastslow.rerank.RerankValidation` whose R@1 is given per K."""

    def __init__(self, r1_by_k: dict[int, float], slow_r1: float, gallery: int):
        self.split, self.slow_scores, self.reranker = range(gallery), "slow", self
        self.r1 = {**r1_by_k, "slow": slow_r1}

    def scores(self, k: int, alpha: float):
        return k

    def t2i(self, scores) -> dict[str, float]:
        return {"R@1": self.r1[scores]}


def test_k_is_the_cheapest_depth_near_the_best_on_validation():
    ks = [k for k in k_values(30) if k < 30]
    rising = {k: 40.0 + k / 2 for k in ks}  # K=10 reaches 45.0, K=20 50.0
    chosen, table = choose_rerank_k(_ValidationByK(rising, slow_r1=50.5, gallery=30), alpha=0.0)
    assert chosen == 20 and table["K"].tolist() == [*ks, 30]
    # A Slow model below the Fast one: the best is a shallow re-ranking, not K = 1 (Fast alone).
    weak = {k: {1: 20.0, 2: 22.5, 5: 23.0}.get(k, 22.0) for k in ks}
    chosen, _ = choose_rerank_k(_ValidationByK(weak, slow_r1=5.0, gallery=30), alpha=0.0)
    assert chosen == 2


def test_speed_up_at_parity_takes_the_smallest_k_within_a_point_of_slow_only():
    from fastslow.rerank import speed_up_at_parity

    rows = pd.DataFrame(
        [{"gallery": 1000, "method": "cross_attention", "K": None, "R@1": 40.0, "R@1_lo": 37.0, "ms_per_query": 50.0}]
        + [{"gallery": 1000, "method": "fast_slow", "K": k, "R@1": r, "ms_per_query": ms}
           for k, r, ms in ((1, 20.0, 1.0), (10, 38.9, 0.5), (20, 39.0, 2.0), (1000, 40.0, 60.0))]
        + [{"gallery": 5000, "method": "cross_attention", "K": None, "R@1": 15.0, "R@1_lo": 10.0, "ms_per_query": 300.0},
           {"gallery": 5000, "method": "fast_slow", "K": 10, "R@1": 12.0, "ms_per_query": 3.0}]
        # Slow-only never ranks the right image first: K = 1 would be "within a point" for nothing.
        + [{"gallery": 10**5, "method": "cross_attention", "K": None, "R@1": 0.0, "R@1_lo": 0.0, "ms_per_query": 6e3},
           {"gallery": 10**5, "method": "fast_slow", "K": 1, "R@1": 0.0, "ms_per_query": 3.0}]
    )
    table = speed_up_at_parity(rows).set_index("gallery")
    assert list(table.index) == [1000]  # no K of the 5000 gallery gets within a point
    assert table.loc[1000, "K"] == 20 and table.loc[1000, "speed-up"] == 25.0
    assert table.loc[1000, "limit N/K"] == 50.0 and table.loc[1000, "share of limit"] == 0.5


def test_index_scores_keep_what_the_search_returned_and_rank_the_rest_last():
    from fastslow.index import VectorIndex
    from fastslow.rerank import index_scores

    gallery = torch.nn.functional.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    queries = gallery[:3] + 0.01
    scores = index_scores(VectorIndex.build(gallery, "Flat"), queries, k=4)
    exact = queries @ gallery.T
    top = exact.topk(4).indices
    assert torch.isfinite(scores).sum(1).tolist() == [4, 4, 4]
    torch.testing.assert_close(scores.gather(1, top), exact.gather(1, top))
    assert (scores.argsort(1, descending=True)[:, :4].sort(1).values == top.sort(1).values).all()


def test_an_hnsw_search_returns_as_many_items_as_asked():
    from fastslow.index import VectorIndex

    gallery = torch.nn.functional.normalize(torch.randn(2000, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    index = VectorIndex.build(gallery, "HNSW16", hnsw_ef_search=16)
    _, ids = index.search(gallery[:3], 300)  # more than efSearch: FAISS alone pads with -1
    assert ids.shape == (3, 300) and (ids >= 0).all() and all(len(set(row)) == 300 for row in ids.tolist())


def test_first_choice_agreement_asks_whether_fast_slow_answers_as_slow_alone():
    from fastslow.rerank import first_choice_agreement

    fast = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.1, 0.2, 0.9, 0.8]])
    slow = torch.tensor([[0.0, 0.1, 0.2, 0.9], [0.0, 0.0, 0.1, 0.5]])  # Slow's first: item 3 for both
    agreement = first_choice_agreement(fast, slow, [1, 2, 4], alpha=0.0)
    # K = 1: Fast's first (0 and 2), neither Slow's; K = 2: only the second query's top 2 holds item 3.
    assert agreement == {1: 0.0, 2: 0.5, 4: 1.0}


def test_latency_by_k_times_every_method_in_each_round(monkeypatch):
    from fastslow import bench
    from fastslow.index import VectorIndex

    class Fast:
        def encode_texts(self, texts):
            return torch.nn.functional.normalize(texts, dim=-1)

    scored = []
    monkeypatch.setattr(bench, "pair_scores", lambda model, gallery, tokens, ids, **_: scored.append(ids.shape[1]))
    index = VectorIndex.build(torch.nn.functional.normalize(torch.randn(50, 4), dim=-1))
    path = bench.QueryPath(Fast(), index, None, torch.zeros(50, 1, 1), encode_fast=lambda c: torch.randn(len(c), 4),
                           encode_slow=lambda c: torch.ones(len(c), 3).long())
    latency = bench.latency_by_k(path, ["a", "b", "c"], ks=[1, 5], slow_only_captions=1, rounds=2)
    assert set(latency) == {1, 5, None} and all(ms > 0 for ms in latency.values())
    # A warm-up round and two timed ones, each: K = 1 and K = 5 over 3 captions, Slow-only over 1,
    # each round starting one method further on.
    assert scored == [1] * 3 + [5] * 3 + [50] + [5] * 3 + [50] + [1] * 3 + [50] + [1] * 3 + [5] * 3


def test_candidates_the_two_models_order_oppositely_keep_the_fast_order():
    from fastslow.rerank import rerank_order

    # Slow prefers the Fast runner-up. At K = 2 each model's standardised scores are ±1, so
    # alpha = 1 ties the two candidates; in floats these sums came to -1.8e-7 and -1.2e-7, which
    # put the runner-up first. A tie keeps the Fast order.
    fast = torch.tensor([[0.7744860053062439, 0.4368913173675537, 0.1]])
    slow = torch.tensor([[0.5190907716751099, 0.6158523559570312]])
    assert rerank_order(fast, slow, k=2, alpha=1.0)[0, 0] == 0
    assert rerank_order(fast, slow, k=2, alpha=0.0)[0, 0] == 1  # the Slow model alone decides


def test_a_model_that_fails_to_compile_runs_as_written(monkeypatch, caplog):
    from fastslow import bench

    def failing_compile(fn, **options):
        def call(*args):
            raise RuntimeError("no C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", failing_compile)
    double = bench.compiled(lambda x: 2 * x)
    with caplog.at_level("WARNING", logger="fastslow.bench"):
        assert double(torch.ones(2)).tolist() == [2.0, 2.0]
        assert double(torch.ones(1)).tolist() == [2.0]
    assert sum("no C++ compiler" in r.getMessage() for r in caplog.records) == 1  # said once
    broken = bench.compiled(lambda x: x.no_such_method())
    with pytest.raises(AttributeError):  # an error of the function itself still surfaces
        broken(torch.ones(1))
