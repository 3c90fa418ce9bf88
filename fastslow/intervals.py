"""Bootstrap intervals for retrieval results and the verdict on a claim.

Inputs are per-query ranks (1 = the right item first), as produced by :mod:`fastslow.metrics`;
R@k is ``100 * mean(ranks <= k)``. ``ranks`` may be one array (one seed) or several per-seed arrays
over the same queries, shape ``(seeds, queries)``.

Method: a percentile bootstrap. Each replicate draws the queries with replacement (the test set is
a sample of the captions one could have asked) and, where several seeds ran, the seeds with
replacement (a training run is a sample of the runs one could have made); the statistic is averaged
over the drawn seeds, so the interval combines query sampling and seed spread. A comparison of two
methods is *paired*: each replicate uses the same query indices for both, so the many queries that
are easy (or hard) for both cancel and only the per-query difference is left, which is what a
claim "A beats B" is about; two unpaired intervals would overlap long after the difference is
clear. Seeds of A and of B are drawn independently (the runs are separate trainings).

Only numpy is imported, so a reporting layer without torch can use this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"

# Elements of one (replicates, queries) block of resampled ranks; index array and gathered ranks
# are int64, so a block costs about 2 * 8 * 4 Mi = 64 MiB, well under 200 MB in all.
_CHUNK_ELEMENTS = 1 << 22

Statistic = Callable[[np.ndarray], np.ndarray]
"""Maps ranks of shape ``(m, queries)`` to one value per row, shape ``(m,)`` (reduces the last axis)."""


def recall_statistic(k: int | Sequence[int]) -> Statistic:
    """R@k in percent as a :data:`Statistic`; a tuple of ks gives the sum of recalls, e.g.
    ``(1, 5, 10)`` gives R@1+R@5+R@10."""
    ks = (k,) if np.isscalar(k) else tuple(k)
    if not ks or any(int(c) != c or c < 1 for c in ks):
        raise ValueError(f"k must be a positive integer or a non-empty tuple of them, got {k!r}")
    ks = tuple(int(c) for c in ks)

    def statistic(ranks: np.ndarray) -> np.ndarray:
        return sum(100.0 * (ranks <= c).mean(axis=-1) for c in ks)

    return statistic


@dataclass(frozen=True)
class Difference:
    """Paired difference ``metric(a) - metric(b)`` (points for R@k) with its bootstrap interval."""

    mean: float
    lo: float
    hi: float
    queries: int
    seeds_a: int
    seeds_b: int

    @property
    def verdict(self) -> str:
        return verdict(self.lo, self.hi)


def verdict(lo: float, hi: float) -> str:
    """The project rule: an effect whose interval lies above zero is reproduced, below zero not
    reproduced, and one whose interval touches or straddles zero inconclusive."""
    if lo > 0:
        return REPRODUCED
    if hi < 0:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def recall_interval(
    ranks,
    k: int | Sequence[int] | None = None,
    *,
    statistic: Statistic | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of R@k (percent) over queries, and over seeds where several ran.

    Each replicate resamples the queries (the same indices for every seed) and the seeds, both
    with replacement, and averages R@k over the drawn seeds. ``k`` may be a tuple (sum of recalls);
    instead of ``k`` a ``statistic`` callable (see :data:`Statistic`) may be given, e.g.
    ``lambda r: np.median(r, axis=-1)`` for the median rank.
    """
    ranks = _as_seeds(ranks, "ranks")
    statistic = _resolve(k, statistic)
    query_rng, seed_rng = _generators(seed, 2)
    replicates = _replicates([ranks], statistic, resamples, query_rng, [seed_rng])[0]
    return _percentiles(replicates, level)


def paired_difference(
    ranks_a,
    ranks_b,
    k: int | Sequence[int] | None = None,
    *,
    statistic: Statistic | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Difference:
    """Paired percentile-bootstrap interval of R@k(a) - R@k(b), in points.

    ``ranks_a`` and ``ranks_b`` are ranks of the same queries in the same order, each one array or
    several seeds. Each replicate draws one set of query indices used for both a and b (the
    pairing: per-query agreement cancels), draws seeds independently for a and for b, and takes the
    difference of the seed-averaged statistics. ``mean`` is the difference on the full data (mean
    over seeds). ``k`` / ``statistic`` as in :func:`recall_interval`.
    """
    a = _as_seeds(ranks_a, "ranks_a")
    b = _as_seeds(ranks_b, "ranks_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"ranks_a has {a.shape[1]} queries and ranks_b has {b.shape[1]}: a paired comparison "
            "needs the ranks of the same queries, in the same order"
        )
    statistic = _resolve(k, statistic)
    query_rng, seed_rng_a, seed_rng_b = _generators(seed, 3)
    rep_a, rep_b = _replicates([a, b], statistic, resamples, query_rng, [seed_rng_a, seed_rng_b])
    lo, hi = _percentiles(rep_a - rep_b, level)
    mean = float(_evaluate(statistic, a).mean() - _evaluate(statistic, b).mean())
    return Difference(mean=mean, lo=lo, hi=hi, queries=a.shape[1], seeds_a=a.shape[0], seeds_b=b.shape[0])


# --- internals ------------------------------------------------------------------------------------


def _as_seeds(ranks, name: str) -> np.ndarray:
    """Ranks as a ``(seeds, queries)`` array."""
    if isinstance(ranks, np.ndarray):
        arr = ranks
    else:
        rows = [np.asarray(r) for r in ranks] if isinstance(ranks, (list, tuple)) else None
        if rows and all(r.ndim == 1 for r in rows):
            lengths = {len(r) for r in rows}
            if len(lengths) > 1:
                raise ValueError(f"{name}: the per-seed rank arrays must cover the same queries, got lengths {sorted(lengths)}")
            arr = np.stack(rows)
        else:
            arr = np.asarray(ranks)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected ranks of shape (queries,) or (seeds, queries), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name}: no ranks (shape {arr.shape})")
    return arr


def _resolve(k, statistic: Statistic | None) -> Statistic:
    if (k is None) == (statistic is None):
        raise ValueError("give exactly one of k and statistic")
    return recall_statistic(k) if statistic is None else statistic


def _generators(seed: int, n: int) -> list[np.random.Generator]:
    """Independent streams for the query draws and each method's seed draws, so the query indices
    do not depend on how many seeds ran (and a paired comparison reuses those of a single one)."""
    return [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(n)]


def _evaluate(statistic: Statistic, ranks: np.ndarray) -> np.ndarray:
    values = np.asarray(statistic(ranks), dtype=np.float64)
    if values.shape != ranks.shape[:1]:
        raise ValueError(f"statistic must reduce the last axis: ranks {ranks.shape} gave shape {values.shape}")
    return values


def _replicates(
    methods: list[np.ndarray],
    statistic: Statistic,
    resamples: int,
    query_rng: np.random.Generator,
    seed_rngs: list[np.random.Generator],
) -> list[np.ndarray]:
    """Bootstrap replicates (shape ``(resamples,)``) of the seed-averaged statistic of each method,
    all methods resampled with the same query indices."""
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}")
    queries = methods[0].shape[1]
    # per_seed[m][s, r]: statistic of seed s of method m on the queries of replicate r.
    per_seed = [np.empty((m.shape[0], resamples)) for m in methods]
    rows = max(1, _CHUNK_ELEMENTS // queries)
    for start in range(0, resamples, rows):
        stop = min(start + rows, resamples)
        idx = query_rng.integers(0, queries, size=(stop - start, queries))
        for m, out in zip(methods, per_seed):
            for s in range(m.shape[0]):
                out[s, start:stop] = _evaluate(statistic, m[s][idx])
    result = []
    for out, rng in zip(per_seed, seed_rngs):
        seeds = out.shape[0]
        if seeds == 1:
            result.append(out[0])
            continue
        drawn = rng.integers(0, seeds, size=(resamples, seeds))
        result.append(out[drawn, np.arange(resamples)[:, None]].mean(axis=1))
    return result


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    tail = (1 - level) / 2
    lo, hi = np.quantile(values, [tail, 1 - tail])
    return float(lo), float(hi)
