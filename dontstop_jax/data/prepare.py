"""Tokenize and pack a corpus once into fixed-length blocks on disk, cached by content fingerprint.

Packing follows RoBERTa's FULL-SENTENCES (as in the paper's `TextDataset`): documents are
concatenated into one token stream with `</s>` after each document, the stream is cut into
chunks of `max_seq_length - 2` tokens, and every block is `<s> chunk </s>`. Blocks may span
document boundaries. The final partial chunk is kept as `<s> rest </s>` padded with `<pad>`
(its pad count is recorded in the manifest) so no text is lost.

Layout of `out_root/<fingerprint>/`: `shard-00000.npy`, ... (each [n, max_seq_length], uint16
when the vocabulary fits, else int32) and `manifest.json`.

Every process of a run builds (`prepare_corpus` is a collective): the input is cut into units whose bounds do
not depend on the process count (UNIT_BYTES, UNIT_LINES, UNIT_RECORDS); each process encodes its units (dealt
round-robin, or for files read from the start, a contiguous share of their stored bytes), on all its cores, into
pieces of the token stream (`pieces/`, in the shards' dtype); then each writes every
process_count-th shard, packed from the pieces that hold its slice of the stream; process 0 writes the manifest
once all are in. The shards, and so the batches, are byte-identical on any number of processes. `out_root` is a bucket
or a disk all processes share; a corpus in a bucket is read there in place (`BucketShards`), never copied to a host.

A local directory is built under a private hidden name (`.<fingerprint>.tmp-<token>`, never read as a cache) and
published by one rename, which fails onto an existing directory: of concurrent builders of one key the first to
finish publishes, the others drop their copy and use it. In a bucket the manifest is written last. Opening
checks that every shard the manifest lists is there whole; a damaged directory is moved aside and rebuilt.
Private directories of dead builders are removed once untouched for STALE_SECONDS.
Memory stays bounded by one unit's ids (UNIT_BYTES of text: about as many bytes of int32) plus one shard.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import functools
import hashlib
import io
import itertools
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from transformers import PreTrainedTokenizerFast

from dontstop_jax import files
from dontstop_jax.data import encode_pool, piece_cache
from dontstop_jax.data.corpus import (
    CorpusSource,
    SourceSpec,
    corpus_fingerprint,
    iter_file,
    iter_hf,
    iter_line_segments,
    iter_tfds,
    parse_source,
    resolve_files,
)
from dontstop_jax.data.encode_pool import EncodePool, docs_request, encode_request, file_request, lines_request
from dontstop_jax.data.piece_cache import PieceCache
from dontstop_jax.data.tokenizer import encode_plain, load_tokenizer, special_ids, tokenizer_fingerprint
from dontstop_jax.distributed import all_codes, decide
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
# How the input is cut into units, each encoded by one process into one piece of the token stream. Fixed sizes, so
# the pieces (and the blocks) are the same whatever the process count.
UNIT_BYTES = 16 << 20  # plain line and JSON-lines files: byte ranges of about this
UNIT_LINES = 20_000  # compressed files and files in a bucket: line ranges
UNIT_RECORDS = 100_000  # Hugging Face and TFDS sources: record ranges
# Compressed and bucket files are read in blocks of this many stored bytes; a unit goes to the process whose share of
# the stored bytes holds the block its first line starts in.
STREAM_BLOCK = 1 << 20
PIECES = "pieces"
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
    shards: list[np.ndarray] | BucketShards

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
        if isinstance(self.shards, BucketShards):
            return self.shards.rows(shard_of, indices - starts[shard_of])
        out = np.empty((len(indices), self.max_seq_length), np.int32)
        for s in np.unique(shard_of):
            rows = shard_of == s
            out[rows] = self.shards[s][indices[rows] - starts[s]]
        return out

    @classmethod
    def open_bucket(cls, directory: files.Path) -> PreparedCorpus:
        """The corpus in a bucket, read in place: `blocks` fetches just the rows asked for (`BucketShards`), so a host
        holds no copy of it. Raises `Damaged` unless every shard the manifest lists has its full size."""
        try:
            manifest = json.loads(files.retrying(directory / MANIFEST, (directory / MANIFEST).read_text))
        except FileNotFoundError:
            raise Damaged(f"no {MANIFEST}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise Damaged(f"unreadable {MANIFEST}: {e!r}") from None
        return cls(directory, manifest, BucketShards(directory, manifest))

    @functools.cached_property
    def _starts(self) -> np.ndarray:
        """First global block index of each shard."""
        return np.cumsum([0] + [s["blocks"] for s in self.manifest["shards"][:-1]])


class BucketShards:
    """The shards of a corpus in a bucket, as byte ranges: a `rows` call fetches all its rows with concurrent range
    requests (gcsfs `cat_ranges`); with the loader's prefetch thread the next batches are read while one trains."""

    def __init__(self, directory: files.Path, manifest: dict[str, Any]):
        import fsspec

        self.fs, root = fsspec.core.url_to_fs(os.fspath(directory))
        self.width, self.dtype = manifest["max_seq_length"], np.dtype(manifest["dtype"])
        self.row_bytes = self.width * self.dtype.itemsize
        sizes = {
            os.path.basename(e["name"]): int(e["size"])
            for e in files.retrying(directory, lambda: self.fs.ls(root, detail=True))
        }
        self.paths, self.headers = [], []
        for shard in manifest["shards"]:
            header = _npy_header_bytes((shard["blocks"], self.width), self.dtype)
            want = header + shard["blocks"] * self.row_bytes
            if shard["file"] not in sizes:
                raise Damaged(f"{shard['file']} is missing")
            if sizes[shard["file"]] != want:
                raise Damaged(f"{shard['file']} is {sizes[shard['file']]} bytes, not {want}")
            self.paths.append(f"{root}/{shard['file']}")
            self.headers.append(header)
        self.directory = directory

    def rows(self, shard_of: np.ndarray, local: np.ndarray) -> np.ndarray:
        """int32 [len(local), width]: row local[i] of shard shard_of[i]."""
        if not len(local):
            return np.zeros((0, self.width), np.int32)
        starts = [self.headers[s] + int(r) * self.row_bytes for s, r in zip(shard_of, local)]
        data = files.retrying(
            self.directory,
            lambda: self.fs.cat_ranges([self.paths[s] for s in shard_of], starts, [a + self.row_bytes for a in starts]),
        )
        return np.frombuffer(b"".join(data), self.dtype).reshape(len(local), self.width).astype(np.int32)


def _npy_header_bytes(shape: tuple[int, int], dtype: np.dtype) -> int:
    """The header length `np.save` writes for an array of `shape` and `dtype` (where its rows start)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    return buffer.tell()


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

    Every process of a multi-process run calls it (a collective): each encodes its share of the input and writes
    its share of the shards into `out_root` (a bucket, or a disk all processes share); process 0 publishes the
    manifest once all are in. Whether the corpus is there already is decided once, on process 0.
    workers: encoding processes on this host (default: `default_workers`: all cores from POOL_MIN_BYTES of input
    on, else 1 = in-process). The output depends neither on it nor on the process count.
    model_max_positions: the model's usable positions (RoBERTa: max_position_embeddings - 2).
    model_vocab_size: the model's embedding rows; the tokenizer must not produce ids beyond it.
    Concurrent independent calls for one key are safe (each builds privately; the first to finish publishes).
    """
    parsed = [parse_source(s) for s in sources]
    if not parsed:
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
    corpus_fp = corpus_fingerprint(parsed)
    key = json.dumps([corpus_fp, tok_fp, max_seq_length, FORMAT_VERSION])
    # process 0's name for all: hosts may hold the same corpus under other paths (each in its own home)
    name = decide("name the prepared corpus", lambda: hashlib.sha256(key.encode()).hexdigest()[:16], timeout=600)
    # A bucket cache is built and read in place (no host holds a copy); a local one must be on a disk that all
    # processes share (one host, or NFS).
    remote = files.path(out_root) / name if files.is_remote(out_root) else None
    directory = Path(out_root, name) if not remote else None
    lead = jax.process_index() == 0
    if decide(f"look for the prepared corpus {name}", lambda: _published(remote, directory), timeout=600):
        log.info("reusing prepared corpus at %s", remote or directory)
        return _open(remote, directory)
    if lead and directory is not None:
        _remove_stale(directory.parent)
    # one private build name for all processes, on storage they share
    token = decide("name the corpus build", lambda: secrets.token_hex(4), timeout=600)
    build = files.path(out_root) / _private(Path(name), token).name
    if directory is not None:
        try:
            build.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"cannot write the prepared-corpus cache {directory.parent} ({e.strerror}); "
                "make it writable or choose another cache directory"
            ) from None
    log.info("preparing corpus into %s", remote or directory)
    try:
        plan = Plan(
            parsed,
            build,
            remote,
            max_seq_length,
            shard_blocks,
            special_ids(tok),
            np.dtype(np.uint16 if len(tok) <= 2**16 else np.int32),
        )
        _collectively("encoding its share of the input", lambda: _encode_share(plan, tok, workers))
        units = _gather_units(plan)
        _collectively("writing its shards", lambda: _write_shards(plan, units))
        _collectively(
            "publishing the manifest",
            lambda: _publish_manifest(plan, units, tok, tok_fp, corpus_fp, directory) if lead else None,
        )
        return _open(remote, directory)
    finally:
        if lead:
            _remove_tree(build)  # already gone locally unless the build failed or lost the race


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a build writes where: shards go to `remote` (a bucket) or into `build` (published by a rename)."""

    sources: list[CorpusSource]
    build: Any  # Path or files.Path: private, shared by all processes
    remote: Any
    max_seq_length: int
    shard_blocks: int
    ids: dict[str, int]
    dtype: np.dtype

    @property
    def shard_dir(self) -> Any:
        return self.remote or self.build


def _published(remote: files.Path | None, directory: Path | None) -> bool:
    """Whether a complete corpus is there (checked by process 0; a damaged local one is moved aside, a damaged
    one in a bucket is rebuilt over)."""
    if directory is not None:
        return _reuse(directory) is not None
    assert remote is not None  # exactly one of the two is set
    try:
        PreparedCorpus.open_bucket(remote)
        return True
    except Damaged as e:
        if files.retrying(remote / MANIFEST, (remote / MANIFEST).exists):
            log.warning("prepared corpus at %s is damaged (%s); rebuilding it", remote, e)
        return False


def _open(remote: files.Path | None, directory: Path | None) -> PreparedCorpus:
    """The published corpus: from local (or shared) disk, memory-mapped, or read in place in the bucket."""
    if directory is not None:
        return PreparedCorpus.load(directory)
    try:
        return PreparedCorpus.open_bucket(remote)
    except Damaged as e:
        raise UserError(f"{remote} is not a prepared corpus ({e}); delete it and prepare again") from None


def _collectively(what: str, step: Callable[[], Any]) -> None:
    """Run `step` on every process; where it failed on any, all raise (its own error where it failed)."""
    try:
        step()
        failure = None
    except BaseException as err:  # noqa: BLE001 (re-raised below, after the others have heard of it)
        failure = err
    codes = all_codes(0 if failure is None else 1)
    if failure is not None:
        raise failure
    if any(codes):
        raise UserError(f"process {codes.index(1)} failed while preparing the corpus ({what}); its log has the error")


def _remove_tree(where: Any) -> None:
    if files.is_remote(where):
        for path in files.walk(where).values():
            path.unlink(missing_ok=True)
    else:
        shutil.rmtree(where, ignore_errors=True)


def _put(plan: Plan, write: Callable[[Any], None], target: Any) -> None:
    """Write a file with `write(f)` to `target`, whole or not at all (a bucket: one upload of a local file)."""
    if files.is_remote(target):
        with tempfile.TemporaryDirectory(prefix="dontstop-prepare-") as scratch:
            local = Path(scratch, "file")
            with open(local, "wb") as f:
                write(f)
            files.upload(local, target)
    else:
        _atomic_write(Path(target), write)


def _piece(plan: Plan, key: tuple[int, int, int]) -> Any:
    return plan.build / PIECES / "piece-{:03d}-{:05d}-{:06d}.ids".format(*key)


def _encode_share(plan: Plan, tok: PreTrainedTokenizerFast, workers: int | None) -> None:
    """Encode this process's units of the input, each into a piece file of ids (`doc </s> doc </s> ...`, in the
    shards' dtype), and list them with their token and document counts in `share-<process>.json`."""
    backend = tok.backend_tokenizer
    cached = piece_cache.applicable(backend)
    workers = default_workers(plan.sources) if workers is None else workers
    if workers > 1 and cached:
        encoder = EncodePool(backend.to_str(), plan.ids["eos"], workers)
        encode, close = encoder.encode, encoder.close
    else:
        stream = PieceCache(backend).stream if cached else functools.partial(_plain_stream, tok)
        encode = functools.partial(map, lambda r: encode_request(stream, plan.ids["eos"], *r))
        close = lambda: None  # noqa: E731
    if not files.is_remote(plan.build):
        (plan.build / PIECES).mkdir(parents=True, exist_ok=True)
    keys: collections.deque = collections.deque()

    def requests() -> Iterator[tuple[dict, bytes]]:
        for key, request in _my_requests(plan.sources, jax.process_index(), jax.process_count()):
            keys.append(key)
            yield request

    units: list[list] = []
    try:
        for key, replies in itertools.groupby(encode(requests()), key=lambda _: keys.popleft()):
            pieces = [(documents, ids) for documents, ids in replies]
            stream_ids = np.concatenate([ids for _, ids in pieces]) if pieces else np.zeros(0, np.int32)
            _put(plan, lambda f: f.write(stream_ids.astype(plan.dtype).tobytes()), _piece(plan, key))  # noqa: B023 (called here)
            units.append([list(key), len(stream_ids), sum(d for d, _ in pieces)])
    finally:
        close()
    files.write_json(plan.build / f"share-{jax.process_index():05d}.json", units)


def _my_requests(sources: list[CorpusSource], process: int, processes: int) -> Iterator[tuple[tuple, tuple]]:
    """(unit key, encode request) of this process's units, in input order. Units are cut the same way whatever the
    process count (byte ranges of plain files, line ranges of compressed or bucket files, record ranges of
    datasets, whole paragraph files). Files read by seeking (byte ranges) and datasets deal their units round-robin:
    unit k of the i-th of them goes to process (i + k) % processes. Files read from the start (compressed or in a
    bucket) are split by where their units start as stored, all of them laid end to end (`_streamed_owner`): each
    process reads only the files and the part of a file before and in its contiguous share, so a corpus of many
    `.gz` files is split by file, and a single one is decompressed by a process only up to the end of its share."""
    listed = [
        (si, source, list(enumerate(resolve_files(source))) if source.kind not in ("hf", "tfds") else [])
        for si, source in enumerate(sources)
    ]
    streamed = {
        (si, fi): files.source_stat(files.path(path))[0]
        for si, source, paths in listed
        for fi, path in paths
        if source.kind != "paragraphs" and _streamed(path)
    }
    owner = functools.partial(_streamed_owner, processes=processes, total=sum(streamed.values()))
    turn, base = 0, 0
    for si, source, paths in listed:
        if source.kind in ("hf", "tfds"):
            texts = (iter_hf if source.kind == "hf" else iter_tfds)(source)
            for k, group in itertools.groupby(enumerate(texts), key=lambda item: item[0] // UNIT_RECORDS):
                if (turn + k) % processes == process:
                    for batch in iter(lambda: list(itertools.islice(group, DOC_BATCH)), []):  # noqa: B023 (drained here)
                        yield (si, 0, k), docs_request([text for _, text in batch])
            turn += 1
            continue
        for fi, path in paths:
            if files.source_stat(files.path(path))[0] == 0:
                raise UserError(f"file {path} is empty; remove it from the sources or fill it")
            if (si, fi) in streamed:
                size, start = streamed[si, fi], base
                base += size
                if owner(start) <= process <= owner(start + (size - 1) // STREAM_BLOCK * STREAM_BLOCK):

                    def owner_at(at: int, start: int = start) -> int:  # who owns this file's stored byte `at`
                        return owner(start + at)

                    for k, first, offset, raw in _line_chunks(path, owner_at, process):
                        yield (si, fi, k), lines_request(path, raw, first, offset, source.kind, source.text_field)
                continue
            mine = lambda k, turn=turn: (turn + k) % processes == process  # noqa: E731
            turn += 1
            if source.kind == "paragraphs":
                if mine(0):
                    docs = iter_file(path, source)
                    for batch in iter(lambda: list(itertools.islice(docs, DOC_BATCH)), []):  # noqa: B023 (drained here)
                        yield (si, fi, 0), docs_request(batch)
            else:
                for k, (start, end) in enumerate(encode_pool.line_ranges(path, UNIT_BYTES)):
                    if mine(k):
                        for a, b in encode_pool.line_ranges(path, None, start, end):
                            yield (si, fi, k), file_request(path, a, b, source.kind, source.text_field)


def _streamed(path: str) -> bool:
    """Whether a file is read from its start (compressed, or in a bucket) rather than cut into byte ranges."""
    return path.endswith(".gz") or files.is_remote(path)


def _streamed_owner(position: int, processes: int, total: int) -> int:
    """The process that encodes a unit of a streamed file starting at `position` of all streamed files' stored
    bytes laid end to end (`total`): contiguous, equal shares of the stored bytes."""
    return min(processes - 1, position * processes // max(total, 1))


def _line_chunks(path: str, owner: Callable[[int], int], process: int) -> Iterator[tuple[int, int, int, bytes]]:
    """(unit, first line number, byte offset, raw lines) of about RANGE_BYTES each, of this process's units among
    the UNIT_LINES-line ranges of a file read in order: those `owner` gives it by the stored position their first
    line starts at. Other units' lines are only counted; reading stops at the first unit of a later process."""
    chunk: list[bytes] = []
    size = unit = first = start = 0
    for position, lineno, offset, lines in _unit_slices(path):
        k, into = divmod(lineno - 1, UNIT_LINES)
        if not into:
            if owner(position) > process:
                break
            mine = owner(position) == process
        if not mine:
            continue
        if chunk and (k != unit or size >= encode_pool.RANGE_BYTES):
            yield unit, first, start, b"".join(chunk)
            chunk, size = [], 0
        if not chunk:
            unit, first, start = k, lineno, offset
        chunk.append(lines)
        size += len(lines)
    if chunk:
        yield unit, first, start, b"".join(chunk)


def _unit_slices(path: str) -> Iterator[tuple[int, int, int, bytes]]:
    """(stored position, first line number, byte offset, whole lines) of a file read in order (`iter_line_segments`,
    in blocks of STREAM_BLOCK), cut where UNIT_LINES-line units start; lines are counted, never split one by one."""
    lineno, offset = 1, 0
    for position, segment in iter_line_segments(path, STREAM_BLOCK):
        at = 0
        while at < len(segment):
            end = _after_lines(segment, at, UNIT_LINES - (lineno - 1) % UNIT_LINES)
            yield position, lineno, offset, segment[at:end]
            lineno += segment.count(b"\n", at, end) + (not segment.endswith(b"\n", at, end))
            offset, at = offset + end - at, end


def _after_lines(data: bytes, at: int, n: int) -> int:
    """Where `n` lines of `data` from `at` end (or its end, if it holds fewer)."""
    if data.count(b"\n", at) <= n:
        return len(data)
    return at + int(np.flatnonzero(np.frombuffer(data, np.uint8, offset=at) == 10)[n - 1]) + 1


def _gather_units(plan: Plan) -> list[list]:
    """Every process's units ([key, tokens, documents]) in input order: the pieces of the global token stream."""
    shares = sorted(files.walk(plan.build).items())
    units = sorted(
        (u for name, path in shares if name.startswith("share-") for u in files.read_json(path)), key=lambda u: u[0]
    )
    for si, source in enumerate(plan.sources):
        if not any(u[2] for u in units if u[0][0] == si):
            raise UserError(f"corpus source {source.path} has no documents (all empty); check the path and format")
    return units


def _stream(plan: Plan, units: list[list], start: int, end: int) -> np.ndarray:
    """Tokens [start, end) of the global stream, read from the pieces that hold them."""
    bounds = np.cumsum([0] + [u[1] for u in units])
    parts = []
    for i in np.flatnonzero((bounds[:-1] < end) & (bounds[1:] > start)):
        lo, hi = max(start - bounds[i], 0), min(end, bounds[i + 1]) - bounds[i]
        parts.append(_read_ids(_piece(plan, tuple(units[i][0])), int(lo), int(hi - lo), plan.dtype))
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def _read_ids(piece: Any, start: int, count: int, dtype: np.dtype) -> np.ndarray:
    if not files.is_remote(piece):
        return np.fromfile(piece, dtype, count, offset=dtype.itemsize * start)

    def read() -> bytes:
        with piece.open("rb") as f:
            f.seek(dtype.itemsize * start)
            return f.read(dtype.itemsize * count)

    return np.frombuffer(files.retrying(piece, read), dtype)


def _shards(plan: Plan, units: list[list]) -> list[dict]:
    """The manifest's shard entries: `shard_blocks` blocks each, the last one the rest."""
    total = -(-sum(u[1] for u in units) // (plan.max_seq_length - 2))
    return [
        {"file": f"shard-{s:05d}.npy", "blocks": min(plan.shard_blocks, total - s * plan.shard_blocks)}
        for s in range(-(-total // plan.shard_blocks))
    ]


def _write_shards(plan: Plan, units: list[list]) -> None:
    """Write this process's shards (every process_count-th): shard s packs its slice of the global stream."""
    chunk, stream_tokens = plan.max_seq_length - 2, sum(u[1] for u in units)
    for s, shard in list(enumerate(_shards(plan, units)))[jax.process_index() :: jax.process_count()]:
        start = s * plan.shard_blocks * chunk
        tokens = _stream(plan, units, start, min(start + shard["blocks"] * chunk, stream_tokens))
        rows = np.concatenate(list(_pack(iter([tokens]), plan.max_seq_length, plan.ids))).astype(plan.dtype)
        _put(plan, lambda f: np.save(f, rows), plan.shard_dir / shard["file"])  # noqa: B023 (called here)


def _publish_manifest(
    plan: Plan, units: list[list], tok: PreTrainedTokenizerFast, tok_fp: str, corpus_fp: str, directory: Path | None
) -> None:
    """Process 0, once every shard is in: write the manifest (in a bucket, last) and publish the directory."""
    shards = _shards(plan, units)
    total_blocks = sum(s["blocks"] for s in shards)
    total_tokens = sum(u[1] for u in units) + 2 * total_blocks  # each block adds <s> and </s>
    manifest = {
        "format_version": FORMAT_VERSION,
        "input_fingerprint": corpus_fp,
        "tokenizer_fingerprint": tok_fp,
        "sources": [dataclasses.asdict(s) for s in plan.sources],
        "max_seq_length": plan.max_seq_length,
        "vocab_size": len(tok),
        "dtype": plan.dtype.name,
        "shards": shards,
        "total_blocks": total_blocks,
        "total_tokens": total_tokens,
        "pad_tokens": total_blocks * plan.max_seq_length - total_tokens,
        "documents": sum(u[2] for u in units),
    }
    _remove_tree(plan.build / PIECES)
    for name, path in files.walk(plan.build).items():
        if name.startswith("share-"):
            path.unlink()
    _put(plan, lambda f: f.write(json.dumps(manifest, indent=1).encode()), plan.shard_dir / MANIFEST)
    if directory is not None:
        _publish(plan.build, directory)
    log.info("prepared %d documents into %d blocks", manifest["documents"], total_blocks)


def _private(directory: Path, token: str | None = None) -> Path:
    """A fresh hidden sibling name for a build (or for a damaged directory moved aside); `token` makes it one that
    all processes share."""
    return directory.with_name(f".{directory.name}.tmp-{token or f'{os.getpid()}-{secrets.token_hex(4)}'}")


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
        raise UserError(
            f"prepared corpus at {directory} is damaged ({problem}) and cannot be removed ({e.strerror}); "
            "delete it, or make its cache directory writable"
        ) from None
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


def _remove_stale(out_root: Path) -> None:
    """Delete private directories left by builders that died (SIGKILL, power loss) once untouched for long."""
    for path in out_root.glob(".*.tmp-*"):
        try:
            if time.time() - path.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except FileNotFoundError:
            pass


def default_workers(sources: list[CorpusSource]) -> int:
    """All cores for >= POOL_MIN_BYTES of input files, or for a dataset source; in-process below that, where
    starting workers costs more than it saves."""
    if any(s.kind in ("hf", "tfds") for s in sources):
        return len(os.sched_getaffinity(0))
    size = sum(files.source_stat(files.path(f))[0] for s in sources for f in resolve_files(s))
    return len(os.sched_getaffinity(0)) if size >= POOL_MIN_BYTES else 1


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


def _atomic_write(path: Path, write: Any) -> None:
    with publishing(path) as tmp, open(tmp, "wb") as f:
        write(f)
