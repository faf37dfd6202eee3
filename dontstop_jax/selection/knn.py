"""Exact cosine top-k of task examples over a domain corpus too large to hold: a stream of document chunks.

Each chunk is scored against all queries by one jitted matmul, its own top-k is taken (only as deep as the
running top-k's threshold requires) and merged with the running top-k, so memory is bounded by queries x (k + chunk)
whatever the corpus size. Queries (and the running top-k) are split over the mesh's batch axes and the chunk is
replicated: every device ranks its own queries against the whole chunk, so the top-k needs no cross-device
communication.

Ties resolve to the lower document index (`lax.top_k` keeps the earlier element, and the running top-k,
always from earlier chunks, is placed first), which makes the selection independent of the chunk size.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dontstop_jax.engine.sharding import BATCH_AXES, data_parallel_size
from dontstop_jax.errors import UserError

BACKENDS = ("jax", "faiss")
EPS = 1e-12


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero: similarity 0 to everything)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), EPS)


def merge_topk(
    scores: np.ndarray, ids: np.ndarray, new_scores: np.ndarray, new_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best of two candidate sets by (score descending, id ascending); empty slots are id -1."""
    s = np.concatenate([scores, new_scores], axis=1)
    i = np.concatenate([ids, new_ids], axis=1)
    order = np.lexsort((np.where(i < 0, np.iinfo(np.int64).max, i), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def empty_topk(rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((rows, k), -np.inf, np.float32), np.full((rows, k), -1, np.int64)


def _top(x: jax.Array, k: int, approximate: bool) -> tuple[jax.Array, jax.Array]:
    return jax.lax.approx_max_k(x, k) if approximate else jax.lax.top_k(x, k)


@functools.partial(jax.jit, static_argnames=("k", "approximate"), donate_argnums=(0, 1))
def _update(best_s, best_i, queries, chunk, offset, count, *, k: int, approximate: bool):
    docs = chunk / jnp.maximum(jnp.linalg.norm(chunk, axis=1, keepdims=True), EPS)
    sims = queries @ docs.T
    sims = jnp.where(jnp.arange(chunk.shape[0])[None, :] < count, sims, -jnp.inf)
    # CPU top-k costs grow with k, and once the running k-th best is high few documents of a new chunk beat
    # it: take only as many per row as the worst row needs (a later document never wins a tie, hence >).
    need = jnp.max(jnp.sum(sims > best_s[:, -1:], axis=1))
    sizes = sorted({min(size, k, chunk.shape[0]) for size in (8, 64, 256, k)})

    def merge(size):
        def run(sims, best_s, best_i):
            s, i = _top(sims, size, approximate)
            i = jnp.where(jnp.isfinite(s), i.astype(best_i.dtype) + offset, -1)
            s, pos = jax.lax.top_k(jnp.concatenate([best_s, s], 1), k)
            return s, jnp.take_along_axis(jnp.concatenate([best_i, i], 1), pos, 1)

        return run

    branch = jnp.searchsorted(jnp.asarray(sizes), need)
    return jax.lax.switch(jnp.minimum(branch, len(sizes) - 1), [merge(size) for size in sizes], sims, best_s, best_i)


class StreamingTopK:
    """Running cosine top-k of fixed `queries` [Q, d] over document chunks fed in corpus order.

    backend "jax": jitted matmul + `lax.top_k` (`approximate`: `lax.approx_max_k`) over `mesh`;
    backend "faiss": a flat inner-product index per chunk (optional dependency), merged on the host.
    """

    def __init__(
        self, queries: np.ndarray, k: int, mesh: Mesh | None = None, *, backend: str = "jax", approximate: bool = False
    ):
        if k < 1:
            raise UserError(f"k must be a positive number of neighbours per example, got {k}")
        if backend not in BACKENDS:
            raise UserError(f"unknown kNN backend {backend!r}; choose one of {BACKENDS}")
        self.k, self.backend, self.approximate, self.mesh = k, backend, approximate, mesh
        self.num_queries = len(queries)
        self.queries = normalize(queries)
        self.scores, self.ids = empty_topk(self.num_queries, k)
        if backend == "faiss":
            try:
                import faiss
            except ImportError:
                raise UserError(
                    "the faiss kNN backend needs faiss; pip install faiss-cpu (or use backend=jax)"
                ) from None
            self._faiss = faiss
            return
        rows = data_parallel_size(mesh) if mesh is not None else 1
        pad = -self.num_queries % rows
        q = np.concatenate([self.queries, np.zeros((pad, self.queries.shape[1]), np.float32)])
        s, i = empty_topk(len(q), k)
        self._shard = NamedSharding(mesh, P(BATCH_AXES)) if mesh is not None else None
        self._rep = NamedSharding(mesh, P()) if mesh is not None else None
        put = (lambda x: jax.device_put(x, self._shard)) if mesh is not None else jnp.asarray
        self._q, self._s, self._i = put(q), put(s), put(i.astype(np.int32))

    def update(self, chunk: np.ndarray, offset: int, pad_to: int | None = None) -> None:
        """Score documents offset..offset+len(chunk)-1; `pad_to` keeps one compiled shape for a short last chunk."""
        chunk = np.asarray(chunk, np.float32)
        if self.backend == "faiss":
            self._update_faiss(chunk, offset)
            return
        count = len(chunk)
        if pad_to is not None and pad_to > count:
            chunk = np.concatenate([chunk, np.zeros((pad_to - count, chunk.shape[1]), np.float32)])
        chunk = jax.device_put(chunk, self._rep) if self._rep is not None else jnp.asarray(chunk)
        self._s, self._i = _update(
            self._s, self._i, self._q, chunk, np.int32(offset), np.int32(count), k=self.k, approximate=self.approximate
        )

    def _update_faiss(self, chunk: np.ndarray, offset: int) -> None:
        index = self._faiss.IndexFlatIP(chunk.shape[1])
        index.add(normalize(chunk))
        s, i = index.search(self.queries, min(self.k, len(chunk)))
        i = np.where(i >= 0, i.astype(np.int64) + offset, -1)
        self.scores, self.ids = merge_topk(self.scores, self.ids, np.where(i >= 0, s, -np.inf), i, self.k)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k] descending, document ids [Q, k]; -1 where the corpus had fewer than k documents)."""
        if self.backend == "jax":
            s, i = jax.device_get((self._s, self._i))
            self.scores, self.ids = np.asarray(s[: self.num_queries]), np.asarray(i[: self.num_queries], np.int64)
        return self.scores.copy(), self.ids.copy()

    def set_result(self, scores: np.ndarray, ids: np.ndarray) -> None:
        """Restore a saved running top-k (resume)."""
        self.scores, self.ids = np.asarray(scores, np.float32), np.asarray(ids, np.int64)
        if self.backend == "jax":
            pad = len(self._q) - self.num_queries
            s = np.concatenate([self.scores, np.full((pad, self.k), -np.inf, np.float32)])
            i = np.concatenate([self.ids, np.full((pad, self.k), -1, np.int64)]).astype(np.int32)
            put = (lambda x: jax.device_put(x, self._shard)) if self._shard is not None else jnp.asarray
            self._s, self._i = put(s), put(i)


def topk_cosine(
    queries: np.ndarray, chunks: Iterable[np.ndarray], k: int, mesh: Mesh | None = None, **kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over consecutive document chunks (the first fixes the compiled chunk shape)."""
    search = StreamingTopK(queries, k, mesh, **kwargs)
    offset, size = 0, None
    for chunk in chunks:
        size = size or len(chunk)
        search.update(chunk, offset, pad_to=size)
        offset += len(chunk)
    return search.result()
