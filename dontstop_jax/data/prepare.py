"""Tokenize and pack a corpus once into fixed-length blocks on disk, cached by content fingerprint.

Packing follows RoBERTa's FULL-SENTENCES (as in the paper's `TextDataset`): documents are
concatenated into one token stream with `</s>` after each document, the stream is cut into
chunks of `max_seq_length - 2` tokens, and every block is `<s> chunk </s>`. Blocks may span
document boundaries. The final partial chunk is kept as `<s> rest </s>` padded with `<pad>`
(its pad count is recorded in the manifest) so no text is lost.

Layout of `out_root/<fingerprint>/`: `shard-00000.npy`, ... (each [n, max_seq_length], uint16
when the vocabulary fits, else int32) and `manifest.json`. The directory is built under a private
hidden name (`.<fingerprint>.tmp-<pid>-<random>`, never read as a cache) and published by one
rename, which fails onto an existing directory: of concurrent builders of one key the first to
finish publishes, the others drop their copy and use it. Opening checks that every shard the
manifest lists is there whole; a damaged directory is moved aside and rebuilt. Private directories
of dead builders are removed once untouched for STALE_SECONDS.
Memory stays bounded by one document batch plus one shard, whatever the corpus size.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import itertools
import json
import logging
import os
import secrets
import shutil
import time
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
from dontstop_jax import files
from dontstop_jax.files import publishing

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Documents per encode call (byte-level BPE tokenizers go through `piece_cache`, others through the Rust
# backend's batch encoder). Memory stays bounded by one batch plus one shard.
DOC_BATCH = 1000
# From this many bytes of plain-text line files on, prepare encodes them in worker processes by default.
POOL_MIN_BYTES = 32 << 20
# A private build directory untouched this long belongs to a dead builder (a live one adds a shard every few
# seconds to minutes).
STALE_SECONDS = 24 * 3600


class Damaged(Exception):
    """Why a directory is not a usable prepared corpus (no or unreadable manifest, missing or truncated shard)."""


@dataclasses.dataclass
class PreparedCorpus:
    """Read-only view of a prepared directory; shards are memory-mapped, nothing is loaded eagerly."""

    directory: Path
    manifest: dict[str, Any]
    shards: list[np.ndarray]

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PreparedCorpus:
        try:
            return cls.open_checked(Path(directory))
        except Damaged as e:
            raise UserError(f"{directory} is not a prepared corpus ({e}); run prepare to build it") from None

    @classmethod
    def open_checked(cls, directory: Path) -> PreparedCorpus:
        """Open `directory`, raising `Damaged` unless each shard the manifest lists has its full size (header +
        blocks x max_seq_length x dtype). Cheap (a header read per shard); it catches what a crash after a lost
        write, a full disk, a hand deletion or older versions' concurrent builds leave: shards gone or short."""
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
            width, dtype = manifest["max_seq_length"], np.dtype(manifest["dtype"])
            entries = [(s["file"], (s["blocks"], width)) for s in manifest["shards"]]
        except FileNotFoundError:
            raise Damaged(f"no {MANIFEST}") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise Damaged(f"unreadable {MANIFEST}: {e!r}") from None
        shards = []
        for name, shape in entries:
            try:
                shard = np.load(directory / name, mmap_mode="r")
                size = (directory / name).stat().st_size
            except FileNotFoundError:
                raise Damaged(f"{name} is missing") from None
            except (OSError, ValueError, EOFError) as e:
                raise Damaged(f"{name} is unreadable: {e}") from None
            if shard.shape != shape or shard.dtype != dtype:
                raise Damaged(f"{name} holds {shard.shape} {shard.dtype}, not {shape} {dtype}")
            if shard.offset + shard.nbytes != size:
                raise Damaged(f"{name} is {size} bytes, not {shard.offset + shard.nbytes}")
            shards.append(shard)
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
    Concurrent calls for one key are safe (each builds privately; the first to finish publishes, the
    others use its directory), but all but one tokenize in vain: call it on one process where you can.
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
    name = hashlib.sha256(key.encode()).hexdigest()[:16]
    # A bucket cache is read through this host's verified local copy (memory-mapped like a local cache).
    remote = files.path(out_root) / name if files.is_remote(out_root) else None
    directory = (files.local_cache("prepared") if remote else Path(out_root)) / name
    corpus = _reuse(directory) or (_download(remote, directory) if remote else None)
    if corpus is not None:
        log.info("reusing prepared corpus at %s", remote or directory)
        if remote and not (remote / MANIFEST).exists():
            _upload(corpus, remote)
        return corpus
    _remove_stale(directory.parent)
    build = _private(directory)
    try:
        build.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"cannot write the prepared-corpus cache {directory.parent} ({e.strerror}); "
                        "make it writable or choose another cache directory") from None
    log.info("preparing corpus into %s", directory)
    try:
        _build(sources, tok, tok_fp, corpus_fp, build, max_seq_length, shard_blocks, workers)
        corpus = _publish(build, directory)
        if remote:
            _upload(corpus, remote)
        return corpus
    finally:
        shutil.rmtree(build, ignore_errors=True)  # already gone unless the build failed or lost the race


def _build(sources: list[CorpusSource], tok: PreTrainedTokenizerFast, tok_fp: str, corpus_fp: str, directory: Path,
           max_seq_length: int, shard_blocks: int, workers: int | None) -> None:
    """Write the shards, then the manifest, into the private `directory`."""
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
    log.info("prepared %d documents into %d blocks", stats["documents"], total_blocks)


def _private(directory: Path) -> Path:
    """A fresh hidden sibling name for this process's build (or for a damaged directory moved aside)."""
    return directory.with_name(f".{directory.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _reuse(directory: Path) -> PreparedCorpus | None:
    """The published corpus at `directory` if it checks out, else None. A damaged one is renamed aside before it
    is deleted, so its name is free for a rebuild at once and no process ever sees it half-deleted."""
    if not directory.exists():
        return None
    try:
        return PreparedCorpus.open_checked(directory)
    except Damaged as e:
        problem = str(e)
    log.warning("prepared corpus at %s is damaged (%s); rebuilding it", directory, problem)
    aside = _private(directory)
    try:
        os.rename(directory, aside)
    except FileNotFoundError:
        return None  # another builder moved it aside first
    except OSError as e:
        raise UserError(f"prepared corpus at {directory} is damaged ({problem}) and cannot be removed ({e.strerror}); "
                        "delete it, or make its cache directory writable") from None
    shutil.rmtree(aside, ignore_errors=True)
    return None


def _publish(build: Path, directory: Path) -> PreparedCorpus:
    """Rename the finished `build` to `directory` in one step. rename() fails onto a non-empty directory, so a
    corpus another builder published first, which others may be reading, is used rather than replaced."""
    try:
        os.rename(build, directory)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        corpus = _reuse(directory)
        if corpus is not None:
            log.info("another process published %s first; using it", directory)
            return corpus
        os.rename(build, directory)
    log.info("published prepared corpus at %s", directory)
    return PreparedCorpus.load(directory)


def _upload(corpus: PreparedCorpus, remote: files.Path) -> None:
    """Copy a prepared corpus into the bucket: shards first, the manifest last, so a reader that finds the
    manifest finds every shard."""
    for shard in corpus.manifest["shards"]:
        files.upload(corpus.directory / shard["file"], remote / shard["file"])
    files.upload(corpus.directory / MANIFEST, remote / MANIFEST)
    log.info("uploaded prepared corpus to %s", remote)


def _download(remote: files.Path, directory: Path) -> PreparedCorpus | None:
    """This host's copy of the corpus prepared in the bucket at `remote`, verified against its manifest;
    None when the bucket holds no complete one (then it is built here and uploaded again)."""
    try:
        manifest = json.loads((remote / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    build = _private(directory)
    build.mkdir(parents=True)
    try:
        for shard in [entry["file"] for entry in manifest["shards"]] + [MANIFEST]:
            files.download(remote / shard, build / shard)
        PreparedCorpus.open_checked(build)
    except (FileNotFoundError, Damaged) as e:
        log.warning("prepared corpus in %s is damaged (%s); rebuilding it", remote, e)
        shutil.rmtree(build, ignore_errors=True)
        return None
    log.info("copied prepared corpus from %s", remote)
    try:
        return _publish(build, directory)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _remove_stale(out_root: Path) -> None:
    """Delete private directories left by builders that died (SIGKILL, power loss) once untouched for long."""
    for path in out_root.glob(".*.tmp-*"):
        try:
            if time.time() - path.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except FileNotFoundError:
            pass


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
        if files.source_stat(files.path(path))[0] == 0:
            raise UserError(f"file {path} is empty; remove it from the sources or fill it")
        with files.staged(path) as local:  # a bucket file is copied here one at a time for the workers
            for count, piece in pool.encode_file(str(local)):
                documents += count
                yield count, piece
    if documents == 0:
        raise UserError(f"corpus source {source.path} has no documents (all empty); check the path and format")


def default_workers(sources: list[CorpusSource]) -> int:
    """All cores (up to 8) for >= POOL_MIN_BYTES of plain-text line files; in-process below that, where
    starting workers costs more than it saves."""
    size = sum(files.source_stat(files.path(f))[0] for s in sources if _splittable(s) for f in resolve_files(s))
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
