"""The sharded index: embeddings written in shards, indexed shard by shard, searched as one."""

from __future__ import annotations

import types

import faiss
import numpy as np
import pytest
import torch

from fastslow.index import VectorIndex, recall_against_exact, write_embedding_shards


def unit_vectors(n: int, dim: int, seed: int = 0, clusters: int | None = None) -> np.ndarray:
    """Random unit vectors; with ``clusters``, scattered around that many random centres (IVF's
    lists then have something to find, as real embeddings do)."""
    rng = np.random.default_rng(seed)
    if clusters is None:
        vectors = rng.standard_normal((n, dim))
    else:
        centres = rng.standard_normal((clusters, dim))
        vectors = centres[rng.integers(clusters, size=n)] + 0.3 * rng.standard_normal((n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_shards_are_written_in_order_and_read_back_whole(tmp_path):
    vectors = unit_vectors(103, 8)
    paths = write_embedding_shards(vectors, tmp_path, 4)
    assert [p.name for p in paths] == ["shard-000.npy", "shard-001.npy", "shard-002.npy", "shard-003.npy"]
    assert [len(np.load(p)) for p in paths] == [26, 26, 26, 25]
    np.testing.assert_array_equal(np.concatenate([np.load(p) for p in paths]), vectors)
    assert not list(tmp_path.glob("*.tmp")), "no temp file is left beside the shards"


def test_sharded_flat_answers_exactly_as_one_flat_index_with_global_ids(tmp_path):
    vectors = unit_vectors(1000, 16)
    queries = unit_vectors(25, 16, seed=1)
    one = VectorIndex.build(vectors, "Flat")
    sharded = VectorIndex.build_sharded(write_embedding_shards(vectors, tmp_path, 3), "Flat")
    assert len(sharded) == 1000 and [s.ntotal for s in sharded.shards] == [334, 333, 333]
    expected_scores, expected_ids = one.search(queries, 10)
    scores, ids = sharded.search(queries, 10)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)
    # A vector of the last shard finds itself under its row in the whole array, not its row there.
    _, own = sharded.search(vectors[[0, 500, 999]], 1)
    assert own[:, 0].tolist() == [0, 500, 999]


def test_sharded_ivf_recalls_what_exact_search_finds(tmp_path):
    vectors = unit_vectors(4000, 32, clusters=40)
    queries = unit_vectors(50, 32, seed=2, clusters=40)
    files = write_embedding_shards(vectors, tmp_path, 2)
    sharded = VectorIndex.build_sharded(files, "IVF{nlist},Flat", ivf_nprobe=16)
    # Each shard gets sqrt(its size) lists: sqrt(2000) = 44.
    assert [faiss.extract_index_ivf(s).nlist for s in sharded.shards] == [44, 44]
    _, exact_ids = VectorIndex.build(vectors, "Flat").search(queries, 10)
    assert recall_against_exact(sharded.search(queries, 10)[1], exact_ids) >= 0.95  # 0.99 here
    # One list a shard misses much of it (0.62 here): the lists searched matter, on every shard.
    sharded.set_search_effort(ivf_nprobe=1)
    assert recall_against_exact(sharded.search(queries, 10)[1], exact_ids) < 0.8


def test_search_effort_reaches_every_shard(tmp_path):
    files = write_embedding_shards(unit_vectors(3000, 16, clusters=20), tmp_path, 3)
    ivf = VectorIndex.build_sharded(files, "IVF{nlist},Flat", ivf_nprobe=7)
    assert [faiss.extract_index_ivf(s).nprobe for s in ivf.shards] == [7, 7, 7]
    ivf.set_search_effort(ivf_nprobe=3)
    assert [faiss.extract_index_ivf(s).nprobe for s in ivf.shards] == [3, 3, 3]

    hnsw = VectorIndex.build_sharded(files, "HNSW8", hnsw_ef_search=12)
    assert [s.hnsw.efSearch for s in hnsw.shards] == [12, 12, 12]
    # Asked for more than efSearch, every shard explores at least k candidates: no -1 padding.
    _, ids = hnsw.search(unit_vectors(5, 16, seed=3), 40)
    assert (ids >= 0).all() and all(len(set(row)) == 40 for row in ids)


def test_bad_shards_get_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no shard files"):
        VectorIndex.build_sharded([])
    np.save(tmp_path / "a.npy", unit_vectors(10, 8))
    np.save(tmp_path / "b.npy", unit_vectors(10, 4))
    with pytest.raises(ValueError, match="different dimensions.*a.npy \\(10, 8\\).*b.npy \\(10, 4\\)"):
        VectorIndex.build_sharded([tmp_path / "a.npy", tmp_path / "b.npy"])
    np.save(tmp_path / "empty.npy", np.zeros((0, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="empty.npy holds no vectors"):
        VectorIndex.build_sharded([tmp_path / "a.npy", tmp_path / "empty.npy"])
    with pytest.raises(ValueError, match="between 1 and 10 shards"):
        write_embedding_shards(unit_vectors(10, 8), tmp_path, 11)
    with pytest.raises(ValueError, match="non-empty"):
        write_embedding_shards(np.zeros((0, 8)), tmp_path, 1)
    sharded = VectorIndex.build_sharded([tmp_path / "a.npy"])
    with pytest.raises(ValueError, match="build_sharded"):
        sharded.save(tmp_path / "sharded.faiss")


def test_the_fast_slow_searcher_answers_the_same_on_a_sharded_index(tmp_path):
    from fastslow.config import CrossAttentionConfig, DualEncoderConfig, EncoderConfig
    from fastslow.data.shapes import make_shapes
    from fastslow.data.text import WordTokenizer
    from fastslow.models.cross_attention import CrossAttentionModel
    from fastslow.models.dual_encoder import DualEncoder
    from fastslow.rerank import Searcher, fast_index

    splits = make_shapes(8, 2, 30, image_size=32, captions_per_image=1, seed=4)
    tokenizer = WordTokenizer.fit(splits["train"].captions + splits["test"].captions)
    encoder = EncoderConfig(channels=(8, 8, 16, 16), text_width=16, text_layers=1, heads=2)
    torch.manual_seed(0)
    fast = DualEncoder(tokenizer.vocab_size, DualEncoderConfig(encoder=encoder, embed_dim=16), 32).eval()
    slow = CrossAttentionModel(tokenizer.vocab_size, CrossAttentionConfig(
        encoder=encoder, tower_init="scratch", width=16, layers=1, heads=2, ffn_ratio=2), 32).eval()
    # What Searcher reads of a Study: the test gallery, its images, and the two text encoders.
    data = types.SimpleNamespace(test=splits["test"], visual={"test": splits["test"].images},
                                 fast_texts=tokenizer.encode, slow_encoder=lambda reads: tokenizer.encode)
    plain = Searcher(fast, slow, data, alpha=0.3)
    index = fast_index(types.SimpleNamespace(model=fast), data.visual["test"], "cpu", shards=3)
    sharded = Searcher(fast, slow, data, alpha=0.3, index=index)
    assert [s.ntotal for s in sharded.index.shards] == [10, 10, 10] and not plain.index.shards
    query = splits["test"].captions[17]
    expected = plain.search(query, k=8, rerank_k=12)
    found = sharded.search(query, k=8, rerank_k=12)
    assert found["fast_image"].max() >= 20, "the Fast top 8 reaches into the last shard (ids 20-29)"
    assert found[["fast_image", "fast_slow_image"]].equals(expected[["fast_image", "fast_slow_image"]])
    np.testing.assert_allclose(found["slow_score"], expected["slow_score"], rtol=1e-5)
    with pytest.raises(ValueError, match="holds 10 items, the test gallery 30"):
        Searcher(fast, slow, data, index=VectorIndex.build(unit_vectors(10, 16)))


def test_the_sharded_benchmark_measures_every_shard_count_and_cleans_up(tmp_path, monkeypatch):
    from fastslow.bench import sharded_index_scaling

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    gallery = torch.from_numpy(unit_vectors(300, 16, clusters=10))
    queries = torch.from_numpy(unit_vectors(30, 16, seed=5, clusters=10))
    table = sharded_index_scaling(gallery, queries, 3000, (2, 3), {"exact": "Flat", "IVF": "IVF{nlist},Flat"},
                                  timed_queries=5, rounds=1)
    assert list(zip(table["shards"], table["index"])) == [
        (1, "exact, one index"), (2, "exact"), (2, "IVF"), (3, "exact"), (3, "IVF")]
    assert table["shard_factory"].tolist() == ["Flat", "Flat", "IVF38,Flat", "Flat", "IVF31,Flat"]
    exact = table[table["index"] != "IVF"]
    assert (exact["recall@10_vs_exact"] == 1.0).all() and (table["ms_per_query"] > 0).all()
    assert not list(tmp_path.iterdir()), "the shard files are removed after the benchmark"
