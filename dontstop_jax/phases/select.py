"""The `select` phase: pick domain documents for TAPT (kNN-TAPT, RAND-TAPT, DSIR, Curated-TAPT).

Writes, in cfg.workdir: `selected.jsonl` ({"text", "index", "source", "score"} per document, corpus order),
the corpus a TAPT phase adds to the task's own text; `selection_stats.json`; `DONE.json`. The domain
corpus is streamed in chunks of `chunk_size` documents and the running ranking is saved every
`checkpoint_every` chunks, so an interrupted run resumes where it stopped and, because chunk boundaries
and the per-chunk random draws depend only on the config and seed, selects exactly what an uninterrupted
run would. Candidates that duplicate a task example or (nearly) equal a dev/test example are dropped.
With several processes, process 0 selects on its own devices while the others wait (like corpus preparation).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from dontstop_jax import files
from dontstop_jax.data import iter_documents, load_task, parse_source
from dontstop_jax.distributed import decide
from dontstop_jax.engine import make_mesh
from dontstop_jax.engine.sharding import MESH_AXES
from dontstop_jax.errors import Interrupted, UserError
from dontstop_jax.fields import SELECT_METHODS as METHODS
from dontstop_jax.files import publishing, write_json
from dontstop_jax.selection import dsir, embed
from dontstop_jax.selection.knn import StreamingTopK, empty_topk, merge_topk
from dontstop_jax.selection.leakage import LeakageFilter, text_key
from dontstop_jax.train.loop import StopSignal
from dontstop_jax.train.workdir import Workdir, finished

SELECTED, STATS, PROGRESS, EMBEDDER = "selected.jsonl", "selection_stats.json", "progress.npz", "embedder.npz"


def selected_corpus(workdir: str | os.PathLike) -> str:
    """The corpus file a finished selection wrote (a jsonl source with field "text")."""
    return str(files.path(workdir) / SELECTED)


def select(cfg: ConfigDict) -> dict:
    """Run (or resume, or return the finished) selection in cfg.workdir; returns its statistics. Raises
    `Interrupted` after saving the ranking when asked to stop."""
    with StopSignal():
        return decide("select", lambda: _select(cfg))  # every host gets the statistics process 0 wrote


def _mesh(cfg: ConfigDict) -> Mesh:
    """The configured mesh, or with several processes (only process 0 selects) one over its own devices."""
    if jax.process_count() == 1:
        return make_mesh(cfg.mesh.shape)
    return Mesh(np.asarray(jax.local_devices()).reshape(-1, 1, 1), MESH_AXES)


def _select(cfg: ConfigDict) -> dict:
    with Workdir(cfg) as done:  # refuses a changed config and a workdir another run holds
        return done if done is not None else _run(cfg)


def _run(cfg: ConfigDict) -> dict:
    workdir = files.path(cfg.workdir)
    if cfg.method not in METHODS:
        raise UserError(f"unknown selection method {cfg.method!r}; choose one of {METHODS}")
    if min(cfg.chunk_size, cfg.checkpoint_every, cfg.fit_docs) < 1:
        raise UserError(
            f"select.chunk_size, checkpoint_every and fit_docs must be positive, got {cfg.chunk_size}, "
            f"{cfg.checkpoint_every}, {cfg.fit_docs}"
        )
    task = load_task(
        cfg.task.path or None, cfg.task.text_field, cfg.task.label_field, hf_dataset=cfg.task.hf_dataset or None
    )
    examples = task.splits["train"][0]
    held_out = [t for split in cfg.leakage.splits if split in task.splits for t in task.splits[split][0]]
    if cfg.method == "curated":
        if not cfg.curated_sources:
            raise UserError("method=curated needs select.curated_sources: your in-distribution unlabeled text files")
        sources, scores, ids = list(cfg.curated_sources), None, None
    else:
        if not cfg.sources:
            raise UserError(f"method={cfg.method} needs select.sources: the domain corpus files to select from")
        sources = list(cfg.sources)
        scores, ids = _rank(cfg, workdir, examples, sources)
    stats = _write(
        cfg, workdir, sources, scores, ids, examples, LeakageFilter(held_out, cfg.leakage.ngram, cfg.leakage.threshold)
    )
    write_json(workdir / STATS, stats)
    (workdir / PROGRESS).unlink(missing_ok=True)
    return Workdir(cfg).complete(stats)


def _documents(sources: Sequence) -> Iterator[tuple[int, str]]:
    """(source number, document) over all sources, in order."""
    for s, source in enumerate(sources):
        for doc in iter_documents(source):
            yield s, doc


def _chunks(sources: Sequence, size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for _, doc in _documents(sources):
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Sample:
    """RAND / DSIR: a running top-n of Gumbel keys over the corpus (one row, in the shape kNN results have)."""

    def __init__(self, n: int, seed: int, log_ratio: np.ndarray | None, ngrams: Sequence[int]):
        self.n, self.seed, self.log_ratio, self.ngrams = n, seed, log_ratio, ngrams
        self.scores, self.ids = empty_topk(1, n)

    def update(self, texts: list[str], offset: int, chunk_index: int) -> None:
        weights = (
            np.zeros(len(texts)) if self.log_ratio is None else dsir.log_importance(texts, self.log_ratio, self.ngrams)
        )
        keys = dsir.gumbel_keys(weights, self.seed, chunk_index).astype(np.float32)
        ids = np.arange(offset, offset + len(texts), dtype=np.int64)
        self.scores, self.ids = merge_topk(self.scores, self.ids, keys[None], ids[None], self.n)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self.scores.copy(), self.ids.copy()

    def set_result(self, scores: np.ndarray, ids: np.ndarray) -> None:
        self.scores, self.ids = scores, ids


class _Knn:
    def __init__(self, cfg: ConfigDict, embed_fn: embed.Embed, examples: Sequence[str]):
        mesh = _mesh(cfg) if cfg.knn.backend == "jax" else None
        self.embed, self.pad_to = embed_fn, cfg.chunk_size
        self.search = StreamingTopK(
            embed_fn(list(examples)), cfg.k, mesh, backend=cfg.knn.backend, approximate=cfg.knn.approximate
        )
        self.result, self.set_result = self.search.result, self.search.set_result

    def update(self, texts: list[str], offset: int, chunk_index: int) -> None:
        self.search.update(self.embed(texts), offset, pad_to=self.pad_to)


def _fit_sample(cfg: ConfigDict, sources: Sequence) -> list[str]:
    """The first `fit_docs` domain documents: what the embedder and DSIR's raw distribution are fitted on."""
    sample: list[str] = []
    for _, doc in _documents(sources):
        if len(sample) == cfg.fit_docs:
            break
        sample.append(doc)
    return sample


def _ranker(cfg: ConfigDict, workdir: files.Path, examples: Sequence[str], sources: Sequence) -> _Knn | _Sample:
    if cfg.method == "knn":
        path = workdir / EMBEDDER
        if not path.exists():
            arrays = embed.fit(cfg.embedding, _fit_sample(cfg, sources) if cfg.embedding.kind != "lm" else [], cfg.seed)
            with publishing(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub: a ** dict might name allow_pickle
        with path.open("rb") as raw, np.load(raw) as saved:
            arrays = dict(saved)
        return _Knn(cfg, embed.embedder(cfg.embedding, arrays), examples)
    n = _sample_size(cfg)
    log_ratio = None
    if cfg.method == "dsir":
        d = cfg.dsir
        log_ratio = dsir.feature_distribution(examples, d.dim, d.ngrams) - dsir.feature_distribution(
            _fit_sample(cfg, sources), d.dim, d.ngrams
        )
    return _Sample(n, cfg.seed, log_ratio, cfg.dsir.ngrams)


def _sample_size(cfg: ConfigDict) -> int:
    if cfg.n > 0:
        return cfg.n
    if cfg.n_from and (done := finished(cfg.n_from)) is not None:
        return done["size"]
    raise UserError(
        f"method={cfg.method} needs select.n > 0 or select.n_from = a finished selection's workdir "
        f"(got n={cfg.n}, n_from={cfg.n_from!r})"
    )


def _rank(cfg: ConfigDict, workdir: files.Path, examples: Sequence[str], sources: Sequence) -> tuple[np.ndarray, ...]:
    ranker = _ranker(cfg, workdir, examples, sources)
    progress, start = workdir / PROGRESS, 0
    if progress.exists():
        with progress.open("rb") as raw, np.load(raw) as saved:
            ranker.set_result(saved["scores"], saved["ids"])
            start = int(saved["chunks"])
    chunk_index = -1
    for chunk_index, texts in enumerate(_chunks(sources, cfg.chunk_size)):
        if chunk_index >= start:
            ranker.update(texts, chunk_index * cfg.chunk_size, chunk_index)
            stopping = StopSignal.requested()
            if (chunk_index + 1) % cfg.checkpoint_every == 0 or stopping:
                save_progress(progress, *ranker.result(), chunk_index + 1)
            if stopping:
                raise Interrupted(cfg.name, chunk_index + 1)
    return ranker.result()


def save_progress(path: files.Path, scores: np.ndarray, ids: np.ndarray, chunks: int) -> None:
    """Atomically record the ranking after `chunks` chunks."""
    with publishing(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, scores=scores, ids=ids, chunks=chunks)


def _write(
    cfg: ConfigDict,
    workdir: files.Path,
    sources: Sequence,
    scores: np.ndarray | None,
    ids: np.ndarray | None,
    examples: Sequence[str],
    leakage: LeakageFilter,
) -> dict:
    """Second pass: keep the ranked documents that are neither duplicates nor leaks, write them, count."""
    best: dict[int, float] = {}
    if ids is not None:
        assert scores is not None  # the ranking is both or neither
        for i, s in zip(ids[ids >= 0].tolist(), scores[ids >= 0].tolist()):
            best[i] = max(best.get(i, -np.inf), s)
    seen = {text_key(t) for t in examples}
    names = [parse_source(s).path for s in sources]
    kept, per_source, removed = [], [0] * len(sources), {"duplicate": 0, "leakage": 0}
    with publishing(workdir / SELECTED) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for index, (s, doc) in enumerate(_documents(sources)):
            if ids is not None and index not in best:
                continue
            key = text_key(doc)
            if key in seen:
                removed["duplicate"] += 1
                continue
            if leakage.match(doc):
                removed["leakage"] += 1
                continue
            seen.add(key)
            kept.append(index)
            per_source[s] += 1
            out.write(json.dumps({"text": doc, "index": index, "source": names[s], "score": best.get(index)}) + "\n")
        if not kept:  # nothing is published
            raise UserError(
                f"selection {cfg.name} kept no documents (removed: {removed}); check select.sources, "
                "k/n and the leakage threshold"
            )
    stats = {
        "method": cfg.method,
        "size": len(kept),
        "candidates": len(best) if ids is not None else None,
        "removed": removed,
        "per_source": dict(zip(names, per_source)),
        "seed": cfg.seed,
        "corpus": selected_corpus(workdir),
    }
    if cfg.method == "knn":
        assert ids is not None  # a ranking method
        kept_ids = np.asarray(kept)
        stats.update(
            k=cfg.k,
            embedding=cfg.embedding.kind,
            mean_similarity=float(np.mean([best[i] for i in kept])),
            task_coverage=float(np.isin(ids, kept_ids).any(1).mean()),
        )
    elif cfg.method in ("rand", "dsir"):
        assert ids is not None
        stats["n"] = int(ids.shape[1])
    return stats
