"""FAISS indexes over L2-normalised embeddings (inner product = cosine similarity).

``factory`` is a FAISS index-factory string: ``"Flat"`` is exact search; ``"HNSW32"`` or
``"IVF1024,PQ32"`` are approximate. Indexes that need training are trained on the vectors they
index (or on ``train_vectors`` when given).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np

from fastslow.files import atomic_write, atomic_write_text


def _float32(vectors) -> np.ndarray:
    if hasattr(vectors, "detach"):
        vectors = vectors.detach().float().cpu().numpy()
    return np.ascontiguousarray(vectors, dtype=np.float32)


class VectorIndex:
    def __init__(self, index: faiss.Index, factory: str):
        self.index = index
        self.factory = factory

    @classmethod
    def build(
        cls,
        vectors,
        factory: str = "Flat",
        train_vectors=None,
        hnsw_ef_search: int = 64,
        ivf_nprobe: int = 16,
    ) -> VectorIndex:
        vectors = _float32(vectors)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"need a non-empty (n, dim) array of vectors, got shape {vectors.shape}")
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(_float32(train_vectors) if train_vectors is not None else vectors)
        index.add(vectors)
        built = cls(index, factory)
        built.set_search_effort(hnsw_ef_search=hnsw_ef_search, ivf_nprobe=ivf_nprobe)
        return built

    def set_search_effort(self, hnsw_ef_search: int = 64, ivf_nprobe: int = 16) -> None:
        """Search-time knobs of approximate indexes (ignored by exact ones)."""
        params = faiss.ParameterSpace()
        if "HNSW" in self.factory:
            params.set_index_parameter(self.index, "efSearch", hnsw_ef_search)
        if "IVF" in self.factory:
            params.set_index_parameter(self.index, "nprobe", ivf_nprobe)

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, ids) per query, best first. HNSW explores at least ``k`` candidates
        (its ``efSearch`` raised to ``k`` for this search): with fewer it can return fewer than
        ``k`` items, padded with id −1."""
        k = min(k, len(self))
        hnsw = getattr(self.index, "hnsw", None)
        if hnsw is not None and k > hnsw.efSearch:
            return self.index.search(_float32(queries), k, params=faiss.SearchParametersHNSW(efSearch=k))
        return self.index.search(_float32(queries), k)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        atomic_write(path, lambda tmp: faiss.write_index(self.index, tmp))
        atomic_write_text(path.with_name(path.name + ".factory"), self.factory)

    @classmethod
    def load(cls, path: str | Path) -> VectorIndex:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no FAISS index at {path}")
        factory = path.with_name(path.name + ".factory").read_text()
        return cls(faiss.read_index(str(path)), factory)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """FAISS on one thread: one query at a time has nothing to split, and OpenMP's spinning
    threads slow it down many times over when the other core is busy."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def recall_against_exact(approximate_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Fraction of the exact top-k that the approximate search also returned (recall@k)."""
    hits = [len(set(a) & set(e)) for a, e in zip(approximate_ids, exact_ids)]
    return float(np.sum(hits) / exact_ids.size)
