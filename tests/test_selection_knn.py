"""Streaming cosine top-k against a brute-force NumPy reference (chunk boundaries, ties, mesh, faiss)."""

import numpy as np
import pytest

from dontstop_jax.engine import make_mesh
from dontstop_jax.errors import UserError
from dontstop_jax.selection.knn import normalize, topk_cosine


def reference(queries, corpus, k):
    """Brute force: full similarity matrix, sorted by (score desc, index asc)."""
    sims = normalize(queries) @ normalize(corpus).T
    order = np.lexsort((np.broadcast_to(np.arange(len(corpus)), sims.shape), -sims), axis=1)[:, :k]
    return np.take_along_axis(sims, order, 1), order


def assert_same_neighbours(queries, corpus, scores, ids, k):
    """Equal to the reference, except that two documents whose similarities differ only by float32 rounding of
    the matmul (not exactly equal: exact ties must go to the lower index) may come in either order."""
    want_scores, want_ids = reference(queries, corpus, k)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    sims = normalize(queries) @ normalize(corpus).T
    rows, cols = np.nonzero(ids != want_ids)
    gaps = np.abs(sims[rows, ids[rows, cols]] - sims[rows, want_ids[rows, cols]])
    assert ((gaps > 0) & (gaps < 1e-6)).all(), (rows, cols, gaps)
    assert len(rows) <= 0.01 * ids.size


def chunks(x, size):
    return [x[i : i + size] for i in range(0, len(x), size)]


@pytest.mark.parametrize("chunk", [7, 64, 1000])
@pytest.mark.parametrize("k", [1, 10, 50])
def test_exact_topk_equals_numpy_on_the_mesh(chunk, k):
    rng = np.random.default_rng(chunk * 100 + k)
    queries, corpus = rng.normal(size=(13, 16)), rng.normal(size=(301, 16))  # 13 queries: padded to 8 devices
    scores, ids = topk_cosine(queries, chunks(corpus, chunk), k, make_mesh((-1, 1, 1)))
    assert_same_neighbours(queries, corpus, scores, ids, k)


def test_ties_go_to_the_lower_index_whatever_the_chunking():
    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(5, 8)).repeat(20, axis=0)[rng.permutation(100)]  # every vector 20 times
    queries = rng.normal(size=(4, 8))
    _, want = reference(queries, corpus, 30)
    for size in (3, 16, 100):
        _, ids = topk_cosine(queries, chunks(corpus, size), 30, make_mesh((2, 2, 2)))
        np.testing.assert_array_equal(ids, want)


def test_k_larger_than_the_corpus_pads_with_minus_one():
    rng = np.random.default_rng(1)
    scores, ids = topk_cosine(rng.normal(size=(3, 4)), chunks(rng.normal(size=(5, 4)), 2), 8)
    assert (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
    assert sorted(ids[0, :5]) == [0, 1, 2, 3, 4]


def test_approximate_search_returns_the_exact_neighbours_on_cpu():
    rng = np.random.default_rng(2)
    queries, corpus = rng.normal(size=(8, 16)), rng.normal(size=(200, 16))
    _, ids = topk_cosine(queries, chunks(corpus, 50), 5, make_mesh((-1, 1, 1)), approximate=True)
    _, want = reference(queries, corpus, 5)
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids, want)]) >= 0.95


def test_faiss_backend_agrees_with_numpy():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    queries, corpus = rng.normal(size=(9, 16)), rng.normal(size=(250, 16))
    scores, ids = topk_cosine(queries, chunks(corpus, 64), 12, backend="faiss")
    assert_same_neighbours(queries, corpus, scores, ids, 12)


def test_bad_k_or_backend_is_a_user_error():
    with pytest.raises(UserError, match="k must be"):
        topk_cosine(np.ones((2, 2)), [], 0)
    with pytest.raises(UserError, match="unknown kNN backend"):
        topk_cosine(np.ones((2, 2)), [], 3, backend="annoy")


@pytest.mark.parametrize("k", [20, 100])
def test_late_chunks_taken_shallower_stay_exact(k):
    """Many chunks: later ones beat the running threshold rarely and take the cheaper, shallower top-k path."""
    rng = np.random.default_rng(k)
    queries, corpus = rng.normal(size=(16, 8)), rng.normal(size=(4000, 8))
    scores, ids = topk_cosine(queries, chunks(corpus, 128), k, make_mesh((-1, 1, 1)))
    assert_same_neighbours(queries, corpus, scores, ids, k)
