"""FAISS indexes over L2-normalised embeddings (inner product = cosine similarity).

``factory`` is a FAISS index-factory string: ``"Flat"`` is exact search; ``"HNSW32"`` or
``"IVF1024,PQ32"`` are approximate. Indexes that need training are trained on the vectors they
index (or on ``train_vectors`` when given).

Past one machine's memory the embeddings are written in shards (:func:`write_embedding_shards`)
and indexed shard by shard (:meth:`VectorIndex.build_sharded`): every shard is searched and their
top-k lists are merged, so callers search one index either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from fastslow.files import atomic_write, atomic_write_text


def _float32(vectors) -> np.ndarray:
    if hasattr(vectors, "detach"):
        vectors = vectors.detach().float().cpu().numpy()
    return np.ascontiguousarray(vectors, dtype=np.float32)


def inverted_lists(size: int) -> int:
    """The number of inverted lists an IVF index over ``size`` vectors gets (``{nlist}`` in a
    factory string): sqrt(size). k-means over 1M vectors then trains in ~10 s on 2 cores (4
    sqrt(N), the usual advice, took ~130 s), and with fewer, longer lists the same nprobe scans
    more candidates (better recall, a slower search)."""
    return max(1, int(np.sqrt(size)))


def write_embedding_shards(vectors, directory: str | Path, shards: int) -> list[Path]:
    """Save ``vectors`` as ``shards`` consecutive, nearly equal parts, ``shard-000.npy`` onwards
    in ``directory`` (each written atomically), and return their paths in order: the files
    :meth:`VectorIndex.build_sharded` indexes, row ``i`` of the concatenation keeping id ``i``."""
    vectors = _float32(vectors)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"need a non-empty (n, dim) array of vectors, got shape {vectors.shape}")
    if not 1 <= shards <= len(vectors):
        raise ValueError(f"need between 1 and {len(vectors)} shards (one vector each at least), got {shards}")
    paths = []
    for number, part in enumerate(np.array_split(vectors, shards)):
        path = Path(directory) / f"shard-{number:03d}.npy"
        _save_array(path, part)
        paths.append(path)
    return paths


def _save_array(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        # Through an open file: np.save given a name not ending in .npy would add the suffix.
        with open(tmp, "wb") as handle:
            np.save(handle, array)

    atomic_write(path, write)


class VectorIndex:
    def __init__(self, index: faiss.Index, factory: str, shards: Sequence[faiss.Index] = ()):
        """``shards``: the sub-indexes of a sharded ``index`` (:meth:`build_sharded`), else empty.
        They are held here too because the C++ ``IndexShards`` does not own them: a shard freed
        by Python while the combined index lives would crash its next search."""
        self.index = index
        self.factory = factory
        self.shards = tuple(shards)

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

    @classmethod
    def build_sharded(
        cls,
        shard_files: Sequence[str | Path],
        factory: str = "Flat",
        hnsw_ef_search: int = 64,
        ivf_nprobe: int = 16,
        threaded: bool = False,
        train_per_list: int = 64,
    ) -> VectorIndex:
        """One index over embeddings saved in shards (``.npy`` files of ``(n, dim)`` vectors, as
        :func:`write_embedding_shards` writes them), built shard by shard: each file is read
        memory-mapped and gets its own index of ``factory`` (``{nlist}`` becomes
        :func:`inverted_lists` of that shard's size), trained on its own vectors. The shards join
        a FAISS ``IndexShards``, which searches every shard for its top k and keeps the k best of
        their union; ids are global (shard s's rows follow shard s-1's), so an id is the row in
        the files' concatenation, as an unsharded index of the same rows would number it.

        ``threaded``: search the shards in parallel threads (what shards on separate machines
        would do) rather than one after the other. ``train_per_list``: a shard that needs training
        (IVF) trains on at most this many of its vectors per inverted list, evenly spaced through
        it (FAISS's own cap is 256): at 1M items in 2 shards of the shapes quick run's vectors, 64
        built in 10 s against 25 s at 256 on 2 busy cores, recall@10 at nprobe 16 0.993 against
        0.992 (below 39 a list FAISS warns that k-means has too few points)."""
        if not shard_files:
            raise ValueError("no shard files given: write the embeddings with write_embedding_shards first")
        # Every shard's shape is checked before any is indexed: training takes seconds a shard.
        arrays = [np.load(path, mmap_mode="r") for path in shard_files]
        for path, array in zip(shard_files, arrays):
            if array.ndim != 2 or len(array) == 0:
                raise ValueError(f"shard {path} holds no vectors: need a non-empty (n, dim) array, got {array.shape}")
        dims = {array.shape[1] for array in arrays}
        if len(dims) > 1:
            shapes = ", ".join(f"{Path(p).name} {a.shape}" for p, a in zip(shard_files, arrays))
            raise ValueError(f"shards of different dimensions cannot be searched as one: {shapes}")
        shards = []
        for array in tqdm(arrays, desc="index shards", leave=False):
            lists = inverted_lists(len(array))
            sample = array[:: max(1, len(array) // (train_per_list * lists))][: train_per_list * lists]
            shards.append(cls.build(array, factory.format(nlist=lists), train_vectors=sample).index)
        combined = faiss.IndexShards(dims.pop(), threaded, True)  # True: successive (global) ids
        for shard in shards:
            combined.add_shard(shard)
        built = cls(combined, factory, shards)
        built.set_search_effort(hnsw_ef_search=hnsw_ef_search, ivf_nprobe=ivf_nprobe)
        return built

    def set_search_effort(self, hnsw_ef_search: int = 64, ivf_nprobe: int = 16) -> None:
        """Search-time knobs of approximate indexes (ignored by exact ones), on every shard of a
        sharded index."""
        params = faiss.ParameterSpace()
        for index in self.shards or (self.index,):
            if "HNSW" in self.factory:
                params.set_index_parameter(index, "efSearch", hnsw_ef_search)
            if "IVF" in self.factory:
                params.set_index_parameter(index, "nprobe", ivf_nprobe)

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, ids) per query, best first. HNSW explores at least ``k`` candidates
        (its ``efSearch`` raised to ``k`` for this search): with fewer it can return fewer than
        ``k`` items, padded with id −1."""
        k = min(k, len(self))
        # A sharded index hands the search parameters on to its shards.
        hnsw = getattr((self.shards or (self.index,))[0], "hnsw", None)
        if hnsw is not None and k > hnsw.efSearch:
            return self.index.search(_float32(queries), k, params=faiss.SearchParametersHNSW(efSearch=k))
        return self.index.search(_float32(queries), k)

    def save(self, path: str | Path) -> None:
        if self.shards:
            raise ValueError(
                "FAISS cannot write a sharded index as one file: keep its shard files and build it "
                "again with VectorIndex.build_sharded"
            )
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
