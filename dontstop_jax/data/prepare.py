"""Tokenize and pack a corpus once into fixed-length blocks on disk, cached by content fingerprint.

Packing follows RoBERTa's FULL-SENTENCES (as in the paper's `TextDataset`): documents are
concatenated into one token stream with `</s>` after each document, the stream is cut into
chunks of `max_seq_length - 2` tokens, and every block is `<s> chunk </s>`. Blocks may span
document boundaries. The final partial chunk is kept as `<s> rest </s>` padded with `<pad>`
(its pad count is recorded in the manifest) so no text is lost.

Layout of `out_root/<fingerprint>/`: `shard-00000.npy`, ... (each [n, max_seq_length], uint16
when the vocabulary fits, else int32) and `manifest.json`. Shards are written under a `.tmp`
name and renamed; the manifest is written last, so its presence means the directory is complete.
Memory stays bounded by one document batch plus one shard, whatever the corpus size.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerFast

from dontstop_jax.data import piece_cache
from dontstop_jax.data.corpus import (CorpusSource, SourceSpec, corpus_fingerprint, iter_documents, parse_source,
                                      resolve_files)
from dontstop_jax.data.encode_pool import EncodePool
from dontstop_jax.data.piece_cache import PieceCache
from dontstop_jax.data.tokenizer import encode_plain, load_tokenizer, special_ids, tokenizer_fingerprint
from dontstop_jax.errors import UserError
from dontstop_jax.files import publishing

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Documents per encode call (byte-level BPE tokenizers go through `piece_cache`, others through the Rust
# backend's batch encoder). Memory stays bounded by one batch plus one shard.
DOC_BATCH = 1000
# From this many bytes of plain-text line files on, prepare encodes them in worker processes by default.
POOL_MIN_BYTES = 32 << 20


@dataclasses.dataclass
class PreparedCorpus:
    """Read-only view of a prepared directory; shards are memory-mapped, nothing is loaded eagerly."""

    directory: Path
    manifest: dict[str, Any]
    shards: list[np.ndarray]

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PreparedCorpus:
        directory = Path(directory)
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except FileNotFoundError:
            raise UserError(f"{directory} is not a prepared corpus (no {MANIFEST}); run prepare first") from None
        shards = [np.load(directory / s["file"], mmap_mode="r") for s in manifest["shards"]]
        return cls(directory, manifest, shards)

    @property
    def num_blocks(self) -> int:
        return self.manifest["total_blocks"]

    @property
    def max_seq_length(self) -> int:
        return self.manifest["max_seq_length"]

    def block(self, i: int) -> np.ndarray:
        """Block `i` as int32 [max_seq_length]."""
        return self.blocks(np.array([i]))[0]

    def blocks(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Blocks at `indices` (any order, repeats allowed) as int32 [len(indices), max_seq_length]."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_blocks):
            raise IndexError(f"block index out of range [0, {self.num_blocks})")
        starts = self._starts
        shard_of = np.searchsorted(starts, indices, side="right") - 1
        out = np.empty((len(indices), self.max_seq_length), np.int32)
        for s in np.unique(shard_of):
            rows = shard_of == s
            out[rows] = self.shards[s][indices[rows] - starts[s]]
        return out

    @functools.cached_property
    def _starts(self) -> np.ndarray:
        """First global block index of each shard."""
        return np.cumsum([0] + [s["blocks"] for s in self.manifest["shards"][:-1]])


def prepare_corpus(
    sources: Iterable[SourceSpec],
    tokenizer_dir: str | os.PathLike,
    out_root: str | os.PathLike,
    max_seq_length: int = 512,
    shard_blocks: int = 8192,
    model_max_positions: int | None = None,
    model_vocab_size: int | None = None,
    workers: int | None = None,
) -> PreparedCorpus:
    """Tokenize + pack `sources` into `out_root/<fingerprint>/`, or reuse that directory if complete.

    workers: encoding processes for plain-text line files (default: `default_workers`, i.e. all cores up to
    8 from POOL_MIN_BYTES of such files on, else 1 = in-process). The output does not depend on it.
    model_max_positions: the model's usable positions (RoBERTa: max_position_embeddings - 2).
    model_vocab_size: the model's embedding rows; the tokenizer must not produce ids beyond it.
    Call it on one process and `PreparedCorpus.load` the result on the others: two processes
    preparing the same directory at once would remove each other's unfinished work.
    """
    sources = [parse_source(s) for s in sources]
    if not sources:
        raise UserError("no corpus sources given; pass at least one path, glob, hf: or tfds: source")
    if max_seq_length < 3:
        raise UserError(f"max_seq_length {max_seq_length} is too small; a block needs <s>, a token and </s> (use >= 3)")
    if model_max_positions is not None and max_seq_length > model_max_positions:
        raise UserError(
            f"max_seq_length {max_seq_length} exceeds the model's {model_max_positions} positions; lower max_seq_length"
        )
    if shard_blocks < 1:
        raise UserError(f"shard_blocks must be >= 1, got {shard_blocks}")
    tok = load_tokenizer(tokenizer_dir)
    if model_vocab_size is not None and len(tok) > model_vocab_size:
        raise UserError(
            f"tokenizer has {len(tok)} tokens but the model only {model_vocab_size} embeddings; "
            "use the model's tokenizer"
        )
    tok_fp = tokenizer_fingerprint(tok)
    corpus_fp = corpus_fingerprint(sources)
    key = json.dumps([corpus_fp, tok_fp, max_seq_length, FORMAT_VERSION])
    directory = Path(out_root) / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (directory / MANIFEST).is_file():
        log.info("reusing prepared corpus at %s", directory)
        return PreparedCorpus.load(directory)
    if directory.exists():
        log.warning("removing incomplete prepared corpus at %s (no manifest)", directory)
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    log.info("preparing corpus into %s", directory)

    ids = special_ids(tok)
    dtype = np.dtype(np.uint16 if len(tok) <= 2**16 else np.int32)
    stats = {"documents": 0, "stream_tokens": 0}
    workers = default_workers(sources) if workers is None else workers
    blocks = _pack(_token_stream(sources, tok, ids["eos"], workers, stats), max_seq_length, ids)
    shards = _write_shards(blocks, directory, shard_blocks, dtype)
    total_blocks = sum(s["blocks"] for s in shards)
    total_tokens = stats["stream_tokens"] + 2 * total_blocks  # each block adds <s> and </s>
    manifest = {
        "format_version": FORMAT_VERSION,
        "input_fingerprint": corpus_fp,
        "tokenizer_fingerprint": tok_fp,
        "sources": [dataclasses.asdict(s) for s in sources],
        "max_seq_length": max_seq_length,
        "vocab_size": len(tok),
        "dtype": dtype.name,
        "shards": shards,
        "total_blocks": total_blocks,
        "total_tokens": total_tokens,
        "pad_tokens": total_blocks * max_seq_length - total_tokens,
        "documents": stats["documents"],
    }
    _atomic_write(directory / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    log.info("prepared %d documents into %d blocks at %s", stats["documents"], total_blocks, directory)
    return PreparedCorpus.load(directory)


def _token_stream(sources: list[CorpusSource], tok: PreTrainedTokenizerFast, eos: int, workers: int,
                  stats: dict[str, int]) -> Iterator[np.ndarray]:
    """Yield 1-D arrays of the concatenated stream `doc </s> doc </s> ...` of all sources, in order.

    Plain-text line files go to the worker pool when there is one; everything else is encoded here, in
    batches of DOC_BATCH documents. The stream does not depend on which path a source took.
    """
    backend = tok.backend_tokenizer
    cached = piece_cache.applicable(backend)
    stream = PieceCache(backend).stream if cached else functools.partial(_plain_stream, tok)
    use_pool = workers > 1 and cached and any(map(_splittable, sources))
    pool = EncodePool(backend.to_str(), eos, workers) if use_pool else None
    try:
        for source in sources:
            if pool and _splittable(source):
                pieces = _pooled(pool, source)
            else:
                docs = iter_documents(source)
                batches = iter(lambda: list(itertools.islice(docs, DOC_BATCH)), [])
                pieces = ((len(batch), stream(batch, eos)) for batch in batches)
            for documents, piece in pieces:
                stats["documents"] += documents
                stats["stream_tokens"] += len(piece)
                yield piece
    finally:
        if pool:
            pool.close()


def _splittable(source: CorpusSource) -> bool:
    """Whether workers can read the source by byte ranges: uncompressed one-document-per-line files."""
    return source.kind == "lines" and not any(f.endswith(".gz") for f in resolve_files(source))


def _pooled(pool: EncodePool, source: CorpusSource) -> Iterator[tuple[int, np.ndarray]]:
    """`iter_documents`' checks (no empty file, at least one document) around the pool's ranges."""
    documents = 0
    for path in resolve_files(source):
        if os.path.getsize(path) == 0:
            raise UserError(f"file {path} is empty; remove it from the sources or fill it")
        for count, piece in pool.encode_file(path):
            documents += count
            yield count, piece
    if documents == 0:
        raise UserError(f"corpus source {source.path} has no documents (all empty); check the path and format")


def default_workers(sources: list[CorpusSource]) -> int:
    """All cores (up to 8) for >= POOL_MIN_BYTES of plain-text line files; in-process below that, where
    starting workers costs more than it saves."""
    size = sum(os.path.getsize(f) for s in sources if _splittable(s) for f in resolve_files(s))
    return min(len(os.sched_getaffinity(0)), 8) if size >= POOL_MIN_BYTES else 1


def _plain_stream(tok: PreTrainedTokenizerFast, texts: list[str], eos: int) -> np.ndarray:
    """What `PieceCache.stream` gives, for tokenizers it cannot reproduce: the Rust batch encoder's ids."""
    return np.fromiter(itertools.chain.from_iterable([*ids, eos] for ids in encode_plain(tok, texts)), np.int32)


def _pack(stream: Iterator[np.ndarray], max_seq_length: int, ids: dict[str, int]) -> Iterator[np.ndarray]:
    """Cut the stream into `<s> chunk </s>` rows ([n, max_seq_length] per yield); last chunk padded."""
    chunk = max_seq_length - 2
    carry = np.zeros(0, np.int64)
    for piece in stream:
        carry = np.concatenate([carry, piece])
        n = len(carry) // chunk
        if n:
            rows = carry[: n * chunk].reshape(n, chunk)
            yield np.concatenate([np.full((n, 1), ids["bos"]), rows, np.full((n, 1), ids["eos"])], axis=1)
            carry = carry[n * chunk :]
    if len(carry):
        last = np.full((1, max_seq_length), ids["pad"], np.int64)
        last[0, : len(carry) + 2] = np.concatenate([[ids["bos"]], carry, [ids["eos"]]])
        yield last


def _write_shards(blocks: Iterator[np.ndarray], directory: Path, shard_blocks: int, dtype: np.dtype) -> list[dict]:
    """Regroup incoming rows into `shard-NNNNN.npy` files of `shard_blocks` rows; returns their entries."""
    shards: list[dict] = []

    def flush(rows: np.ndarray) -> None:
        name = f"shard-{len(shards):05d}.npy"
        _atomic_write(directory / name, lambda f: np.save(f, rows))
        shards.append({"file": name, "blocks": len(rows)})

    pending: list[np.ndarray] = []
    count = 0
    for rows in blocks:
        pending.append(rows.astype(dtype))
        count += len(rows)
        while count >= shard_blocks:
            merged = np.concatenate(pending)
            flush(merged[:shard_blocks])
            pending, count = [merged[shard_blocks:]], len(merged) - shard_blocks
    if count:
        flush(np.concatenate(pending))
    return shards


def _atomic_write(path: Path, write: Any) -> None:
    with publishing(path) as tmp, open(tmp, "wb") as f:
        write(f)
