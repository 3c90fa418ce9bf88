"""Bootstrap intervals and verdicts (fastslow.intervals): coverage of the point estimate,
narrowing with more queries, determinism, pairing, seed spread, and input validation."""

from __future__ import annotations

import numpy as np
import pytest

from fastslow import intervals as iv
from fastslow.intervals import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    paired_difference,
    recall_interval,
    recall_statistic,
    verdict,
)


def ranks_like(n: int, p: float = 0.3, seed: int = 0) -> np.ndarray:
    """Ranks of ``n`` queries: geometric, so R@1 is about 100 * p."""
    return np.random.default_rng(seed).geometric(p, n)


def hits(n: int, n_hit: int, seed: int = 0) -> np.ndarray:
    """Ranks with exactly ``n_hit`` of ``n`` queries at rank 1 (the rest at rank 2..20), shuffled."""
    rng = np.random.default_rng(seed)
    ranks = np.concatenate([np.ones(n_hit, int), rng.integers(2, 21, n - n_hit)])
    return rng.permutation(ranks)


def r_at(ranks, k: int) -> float:
    return 100.0 * float(np.mean(np.asarray(ranks) <= k))


def test_constants():
    assert iv.RESAMPLES == 1000 and iv.LEVEL == 0.95
    assert (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE) == ("reproduced", "not reproduced", "inconclusive")


@pytest.mark.parametrize("k", [1, 5, 10])
def test_interval_contains_point_estimate(k):
    ranks = ranks_like(500)
    lo, hi = recall_interval(ranks, k)
    assert lo < r_at(ranks, k) < hi
    assert hi - lo > 1, "500 queries leave a few points of uncertainty"


def test_sum_of_recalls():
    ranks = ranks_like(500)
    rsum = sum(r_at(ranks, k) for k in (1, 5, 10))
    assert recall_statistic((1, 5, 10))(ranks[None])[0] == pytest.approx(rsum)
    lo, hi = recall_interval(ranks, (1, 5, 10))
    assert lo < rsum < hi
    lo1, hi1 = recall_interval(ranks, 1)
    assert hi - lo > hi1 - lo1, "the sum varies more than one of its terms"


def test_narrows_with_more_queries():
    small = recall_interval(ranks_like(100, seed=1), 1)
    large = recall_interval(ranks_like(10_000, seed=2), 1)
    width_small, width_large = small[1] - small[0], large[1] - large[0]
    # The width goes as 1/sqrt(queries): about 10x here.
    assert width_small > 5 * width_large
    assert width_large > 0


def test_deterministic_for_a_seed():
    a, b = ranks_like(300, seed=3), ranks_like(300, seed=4)
    assert recall_interval(a, 1, seed=7) == recall_interval(a, 1, seed=7)
    assert paired_difference(a, b, 5, seed=7) == paired_difference(a, b, 5, seed=7)
    # Another seed, other resamples (R@1 on 300 queries is coarse: two seeds may still tie).
    assert len({recall_interval(a, 1, seed=s) for s in range(5)}) > 1


def test_chunking_does_not_change_the_result(monkeypatch):
    a, b = ranks_like(300, seed=3), ranks_like(300, seed=4)
    whole = paired_difference(a, b, 1, resamples=200)
    monkeypatch.setattr(iv, "_CHUNK_ELEMENTS", 300 * 7)  # blocks of 7 replicates
    assert paired_difference(a, b, 1, resamples=200) == whole


def test_identical_inputs_give_exactly_zero():
    ranks = ranks_like(400)
    diff = paired_difference(ranks, ranks.copy(), 1)
    assert (diff.mean, diff.lo, diff.hi) == (0.0, 0.0, 0.0)
    assert diff.verdict == INCONCLUSIVE


def test_clearly_better_and_reversed():
    n = 200
    all_first, half_first = np.ones(n, int), hits(n, n // 2)
    better = paired_difference(all_first, half_first, 1)
    assert better.mean == pytest.approx(50.0)
    assert better.lo > 0 and better.lo <= better.mean <= better.hi
    assert verdict(better.lo, better.hi) == REPRODUCED == better.verdict
    worse = paired_difference(half_first, all_first, 1)
    assert worse.hi < 0 and worse.verdict == NOT_REPRODUCED
    assert (better.queries, better.seeds_a, better.seeds_b) == (n, 1, 1)


def test_tiny_difference_on_few_queries_is_inconclusive():
    b = hits(20, 10)
    a = b.copy()
    a[np.flatnonzero(b > 1)[:2]] = 1  # A finds two queries B misses ...
    a[np.flatnonzero(b == 1)[0]] = 2  # ... and misses one B finds: +5 points on 20 queries
    diff = paired_difference(a, b, 1)
    assert diff.mean == pytest.approx(5.0)
    assert diff.lo < 0 < diff.hi
    assert diff.verdict == INCONCLUSIVE


def test_pairing_matters():
    # Two methods that agree on almost every query; A also finds 30 queries B misses (+3 points).
    n = 1000
    b = hits(n, 500, seed=5)
    a = b.copy()
    a[np.flatnonzero(b > 1)[:30]] = 1
    lo_a, hi_a = recall_interval(a, 1)
    lo_b, hi_b = recall_interval(b, 1)
    assert lo_a < hi_b, "unpaired intervals overlap"
    diff = paired_difference(a, b, 1)
    assert diff.mean == pytest.approx(3.0)
    assert diff.lo > 0 and diff.verdict == REPRODUCED


def test_seed_spread_widens_the_interval():
    n = 1000
    equal = [hits(n, 500, seed=6), hits(n, 500, seed=7)]
    spread = [hits(n, 300, seed=6), hits(n, 700, seed=7)]  # same mean over seeds: R@1 = 50
    lo_e, hi_e = recall_interval(equal, 1)
    lo_s, hi_s = recall_interval(spread, 1)
    assert lo_e < 50 < hi_e and lo_s < 50 < hi_s
    assert hi_s - lo_s > 3 * (hi_e - lo_e)
    # The same in a paired comparison against one run of B.
    b = hits(n, 450, seed=8)
    tight, wide = paired_difference(equal, b, 1), paired_difference(spread, b, 1)
    assert tight.mean == pytest.approx(5.0) == wide.mean
    assert tight.verdict == REPRODUCED and wide.verdict == INCONCLUSIVE
    assert (wide.seeds_a, wide.seeds_b) == (2, 1)


def test_equal_seeds_match_one_seed():
    ranks = ranks_like(300)
    assert recall_interval(np.stack([ranks, ranks]), 1) == recall_interval(ranks, 1)


def test_statistic_callable():
    a, b = ranks_like(500, p=0.2, seed=9), ranks_like(500, p=0.4, seed=10)
    median = lambda r: np.median(r, axis=-1)  # noqa: E731
    diff = paired_difference(a, b, statistic=median)
    assert diff.mean == pytest.approx(np.median(a) - np.median(b))
    assert diff.lo > 0, "a ranks worse (higher median rank)"
    lo, hi = recall_interval(a, statistic=median)
    assert lo <= np.median(a) <= hi


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="same queries"):
        paired_difference(np.ones(100, int), np.ones(99, int), 1)
    with pytest.raises(ValueError, match="same queries"):
        recall_interval([np.ones(100, int), np.ones(99, int)], 1)
    with pytest.raises(ValueError, match="exactly one"):
        recall_interval(np.ones(10, int))
    with pytest.raises(ValueError):
        recall_interval(np.ones(10, int), 0)


def test_verdict_rule():
    assert verdict(0.1, 2.0) == REPRODUCED
    assert verdict(-2.0, -0.1) == NOT_REPRODUCED
    assert verdict(-1.0, 1.0) == INCONCLUSIVE
    assert verdict(0.0, 1.0) == INCONCLUSIVE, "touching zero is not above it"
