"""Encode corpus text on several cores: workers read and encode byte ranges of files, or text the parent sends.

The parent only cuts files into line-aligned byte ranges (or, for compressed files and datasets, forwards raw
lines or documents) and packs the id streams that come back, so it stays light (on 2 cores a pool that parsed
documents in the parent was no faster than one process). Workers are plain subprocesses (`python -m
dontstop_jax.data.encode_pool`) that import only this module, `corpus`, `piece_cache` and `tokenizers`: unlike
multiprocessing's spawn they do not re-import the caller's main module, so they start in a fraction of a second.

A request yields exactly the documents `corpus.iter_documents` yields for its lines (one per line, or the
`text_field` of each JSON line; stripped, empty ones dropped) with the same one-line errors; a newline byte never
occurs inside a UTF-8 sequence.

Protocol: the parent writes the tokenizer JSON and the `</s>` id as the first two lines of a worker's stdin, then
per request one JSON line (`Request`) followed by `size` bytes of payload; the worker answers each with a frame
on its stdout: `int64 documents, int64 n` then n int32 ids, or `-1, n` then an n-byte UTF-8 error message.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import BinaryIO

import numpy as np

from dontstop_jax.errors import UserError

RANGE_BYTES = 4 << 20  # per task: ~1000 documents of a typical corpus, a few MB of ids in flight per worker
_HEADER = np.dtype([("documents", "<i8"), ("n", "<i8")])


def line_ranges(path: str, target: int | None = None, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """[(start, end)] byte ranges of about `target` (default RANGE_BYTES) covering bytes [start, end) of `path`
    (default: all of it; start at a line start), each ending just after a newline (or at `end`)."""
    target = target or RANGE_BYTES
    end = os.path.getsize(path) if end is None else end
    ranges = []
    with open(path, "rb") as f:
        while start < end:
            f.seek(min(start + target, end))
            f.readline()  # finish the line the cut fell into
            cut = min(f.tell(), end)
            ranges.append((start, cut))
            start = cut
    return ranges


def file_request(path: str, start: int, end: int, kind: str, field: str) -> tuple[dict, bytes]:
    """A request for the documents in bytes [start, end) of the local file `path`, which the worker reads."""
    return {"path": path, "start": start, "end": end, "kind": kind, "field": field}, b""


def lines_request(path: str, raw: bytes, first_line: int, offset: int, kind: str, field: str) -> tuple[dict, bytes]:
    """A request for the documents in `raw`: whole lines of `path` from line `first_line`, at (decompressed) byte
    `offset`."""
    return {"path": path, "line": first_line, "offset": offset, "kind": kind, "field": field, "size": len(raw)}, raw


def docs_request(docs: list[str]) -> tuple[dict, bytes]:
    """A request for ready documents (a dataset's records)."""
    payload = json.dumps(docs).encode()
    return {"docs": True, "size": len(payload)}, payload


def encode_request(
    stream: Callable[[Sequence[str], int], np.ndarray], eos: int, request: dict, payload: bytes
) -> tuple[int, np.ndarray]:
    """(documents, int32 ids of `doc </s> doc </s> ...`) of one request."""
    if request.get("docs"):
        docs = [d for d in map(str.strip, json.loads(payload)) if d]
    else:
        docs = _documents(request, payload)
    return len(docs), stream(docs, eos)


def _documents(request: dict, payload: bytes) -> list[str]:
    from dontstop_jax.data.corpus import record_field

    path, kind = request["path"], request["kind"]
    if "start" in request:
        with open(path, "rb") as f:
            f.seek(request["start"])
            raw = f.read(request["end"] - request["start"])
        offset, where = request["start"], "byte offset"
    else:
        raw, offset = payload, request["offset"]
        where = "decompressed byte offset" if path.endswith(".gz") else "byte offset"

    def lineno(at: int) -> int:
        if "start" in request:  # counted only for an error message
            with open(path, "rb") as f:
                return f.read(offset + at).count(b"\n") + 1
        return request["line"] + raw[:at].count(b"\n")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: invalid UTF-8 at {where} {offset + e.start} (line {lineno(e.start)}); re-encode the file as UTF-8"
        ) from None
    lines = text.split("\n")
    if kind != "jsonl":
        return [d for d in map(str.strip, lines) if d]
    docs, at = [], 0
    for line in lines:
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{path} line {lineno(at)} is not valid JSON ({e.msg}); fix or remove that line"
                ) from None
            if not isinstance(record, dict):
                raise UserError(
                    f'{path} line {lineno(at)} is not a JSON object; each line must be {{"field": value, ...}}'
                )
            if request["field"] not in record or not isinstance(record[request["field"]], str):
                record_field(record, request["field"], f"{path} line {lineno(at)}", str)  # raises its one line
            docs.append(record[request["field"]].strip())
        at += len(line.encode()) + 1
    return [d for d in docs if d]


def _serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """The worker loop: encode each request and write its frame."""
    from tokenizers import Tokenizer

    from dontstop_jax.data.piece_cache import PieceCache

    stream = PieceCache(Tokenizer.from_str(requests.readline().decode())).stream
    eos = int(requests.readline())
    for line in requests:
        request = json.loads(line)
        payload = requests.read(request.get("size", 0))
        try:
            documents, ids = encode_request(stream, eos, request, payload)
            body = ids.tobytes()
        except UserError as e:
            documents, body = -1, str(e).encode()
        replies.write(np.array([(documents, len(body) // (4 if documents >= 0 else 1))], _HEADER).tobytes() + body)
        replies.flush()


class EncodePool:
    """`workers` encoding subprocesses; `encode_file` yields (documents, ids) per range, in file order."""

    def __init__(self, tokenizer_json: str, eos: int, workers: int):
        path = os.pathsep.join(filter(None, [_package_root(), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        self._procs = [
            subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            for _ in range(workers)
        ]
        for proc in self._procs:
            assert proc.stdin is not None  # opened with PIPE, as stdout
            proc.stdin.write(tokenizer_json.encode() + b"\n" + str(eos).encode() + b"\n")
            proc.stdin.flush()

    def encode(self, requests: Iterable[tuple[dict, bytes]]) -> Iterator[tuple[int, np.ndarray]]:
        """(documents, ids) per request, in order. Requests go round-robin to the workers, at most 2 per worker
        in flight, so memory stays bounded."""
        pending: collections.deque = collections.deque()
        requests = iter(requests)
        turn = 0
        while True:
            while len(pending) < 2 * len(self._procs) and (r := next(requests, None)) is not None:
                proc = self._procs[turn % len(self._procs)]
                assert proc.stdin is not None
                proc.stdin.write(json.dumps(r[0]).encode() + b"\n" + r[1])
                proc.stdin.flush()
                pending.append(proc)
                turn += 1
            if not pending:
                return
            yield self._reply(pending.popleft())

    def _reply(self, proc: subprocess.Popen) -> tuple[int, np.ndarray]:
        assert proc.stdout is not None
        header = proc.stdout.read(_HEADER.itemsize)
        if len(header) < _HEADER.itemsize:
            raise UserError(
                f"an encoding worker of prepare_corpus exited (code {proc.poll()}; out of memory?); "
                "pass workers=1 to encode in-process"
            )
        documents, n = np.frombuffer(header, _HEADER)[0].tolist()
        if documents < 0:
            raise UserError(proc.stdout.read(n).decode())
        return documents, np.frombuffer(proc.stdout.read(4 * n), np.int32)

    def close(self) -> None:
        for proc in self._procs:
            proc.kill()  # unread replies may be pending; nothing a worker holds needs a clean shutdown
            proc.wait()
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.close()
            proc.stdout.close()

    def __enter__(self) -> EncodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _package_root() -> str:
    """The directory holding `dontstop_jax`, so workers import this very copy of the package."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


if __name__ == "__main__":
    replies = sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print in a library must not corrupt the reply frames
    _serve(sys.stdin.buffer, replies)
