"""Encode plain-text corpus files on several cores: each worker reads and encodes its own byte ranges.

The parent only cuts files into line-aligned byte ranges and packs the id streams that come back, so it
stays light (on 2 cores a pool that shipped documents from the parent was no faster than one process).
Workers are plain subprocesses (`python -m dontstop_jax.data.encode_pool`) that import only this module,
`piece_cache` and `tokenizers`: unlike multiprocessing's spawn they do not re-import the caller's main
module, so they start in a fraction of a second and need no `if __name__ == "__main__":` guard.

A range yields exactly the documents `corpus.iter_documents` yields for those lines: one per line,
stripped, empty ones dropped (a newline byte never occurs inside a UTF-8 sequence).

Protocol: the parent writes the tokenizer JSON and the `</s>` id as the first two lines of a worker's
stdin, then one `path<TAB>start<TAB>end` line per range; the worker answers each with a frame on its stdout:
`int64 documents, int64 n` then n int32 ids, or `-1, n` then an n-byte UTF-8 error message.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO

import numpy as np

from dontstop_jax.errors import UserError

RANGE_BYTES = 4 << 20  # per task: ~1000 documents of a typical corpus, a few MB of ids in flight per worker
_HEADER = np.dtype([("documents", "<i8"), ("n", "<i8")])


def line_ranges(path: str, target: int | None = None) -> list[tuple[int, int]]:
    """[(start, end)] byte ranges of about `target` (default RANGE_BYTES) covering `path`, each ending just after
    a newline (or at the end of the file)."""
    target = target or RANGE_BYTES
    size = os.path.getsize(path)
    ranges, start = [], 0
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(start + target, size))
            f.readline()  # finish the line the cut fell into
            end = min(f.tell(), size)
            ranges.append((start, end))
            start = end
    return ranges


def encode_range(stream: Callable[[Sequence[str], int], np.ndarray], eos: int, path: str, start: int,
                 end: int) -> tuple[int, np.ndarray]:
    """(documents, int32 ids of `doc </s> doc </s> ...`) for the lines in bytes [start, end) of `path`."""
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        with open(path, "rb") as f:
            lineno = f.read(start + e.start).count(b"\n") + 1
        raise UserError(f"{path}: invalid UTF-8 at byte offset {start + e.start} (line {lineno}); "
                        "re-encode the file as UTF-8") from None
    docs = [d for d in map(str.strip, text.split("\n")) if d]
    return len(docs), stream(docs, eos)


def _serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """The worker loop: encode each requested range and write its frame."""
    from tokenizers import Tokenizer

    from dontstop_jax.data.piece_cache import PieceCache

    stream = PieceCache(Tokenizer.from_str(requests.readline().decode())).stream
    eos = int(requests.readline())
    for line in requests:
        path, start, end = line.decode().rstrip("\n").split("\t")
        try:
            documents, ids = encode_range(stream, eos, path, int(start), int(end))
            body = ids.tobytes()
        except UserError as e:
            documents, body = -1, str(e).encode()
        replies.write(np.array([(documents, len(body) // (4 if documents >= 0 else 1))], _HEADER).tobytes() + body)
        replies.flush()


class EncodePool:
    """`workers` encoding subprocesses; `encode_file` yields (documents, ids) per range, in file order."""

    def __init__(self, tokenizer_json: str, eos: int, workers: int):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_package_root(), os.environ.get("PYTHONPATH")]))}
        self._procs = [subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env) for _ in range(workers)]
        for proc in self._procs:
            proc.stdin.write(tokenizer_json.encode() + b"\n" + str(eos).encode() + b"\n")
            proc.stdin.flush()

    def encode_file(self, path: str) -> Iterator[tuple[int, np.ndarray]]:
        """Ranges go round-robin to the workers, at most 2 per worker in flight, so memory stays bounded."""
        pending: collections.deque = collections.deque()
        ranges = iter(line_ranges(path))
        turn = 0
        while True:
            while len(pending) < 2 * len(self._procs) and (r := next(ranges, None)) is not None:
                proc = self._procs[turn % len(self._procs)]
                proc.stdin.write(f"{path}\t{r[0]}\t{r[1]}\n".encode())
                proc.stdin.flush()
                pending.append(proc)
                turn += 1
            if not pending:
                return
            yield self._reply(pending.popleft())

    def _reply(self, proc: subprocess.Popen) -> tuple[int, np.ndarray]:
        header = proc.stdout.read(_HEADER.itemsize)
        if len(header) < _HEADER.itemsize:
            raise UserError(f"an encoding worker of prepare_corpus exited (code {proc.poll()}; out of memory?); "
                            "pass workers=1 to encode in-process")
        documents, n = np.frombuffer(header, _HEADER)[0].tolist()
        if documents < 0:
            raise UserError(proc.stdout.read(n).decode())
        return documents, np.frombuffer(proc.stdout.read(4 * n), np.int32)

    def close(self) -> None:
        for proc in self._procs:
            proc.kill()  # unread replies may be pending; nothing a worker holds needs a clean shutdown
            proc.wait()
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
