"""Training-loop reporting: metrics to JSON lines + TensorBoard, a progress bar, and one-step-late fetching.

TensorBoard events are written by hand rather than with tensorboardX: scalars need only a TFRecord frame
(length, masked CRC32C, payload) around a three-field Event proto, about 40 lines, and that avoids a
dependency whose generated protobuf code has to track the protobuf version that orbax and friends pin.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self, TextIO

import jax
import numpy as np
from tqdm import tqdm

from dontstop_jax import files
from dontstop_jax.files import publishing, write_text

_RESERVED_KEYS = ("step", "phase")


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli) rotated and offset, as TFRecord frames require."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # int64 two's complement, as protobuf encodes negatives
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _f32(value: float) -> bytes:
    """Little-endian float32; values beyond its range (a diverged loss) become ±inf instead of raising."""
    with np.errstate(over="ignore"):
        return np.asarray(value, dtype="<f4").tobytes()


def _event(wall_time: float, step: int, *, file_version: str = "", scalars: Mapping[str, float] | None = None) -> bytes:
    """tensorflow.Event{wall_time=1, step=2, file_version=3, summary=5{value=1{tag=1, simple_value=2}}}."""
    out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version:
        out += _field(3, file_version.encode())
    if scalars:
        values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + _f32(value)) for tag, value in scalars.items())
        out += _field(5, values)
    return out


def _event_step(event: bytes) -> int:
    """The step of an Event that `_event` wrote: wall_time (tag 0x09, 8 bytes), then step (tag 0x10, varint)."""
    step = 0
    for shift, byte in enumerate(event[10:20]):
        step |= (byte & 0x7F) << 7 * shift
        if byte < 0x80:
            break
    return step


def _events_through(data: bytes, step: int) -> bytes:
    """The TFRecord frames (length 8, its CRC 4, payload, payload CRC 4) of `data` whose events are at `step`
    or earlier; a torn last frame is dropped."""
    kept, pos = [], 0
    while pos + 12 <= len(data):
        end = pos + 16 + struct.unpack_from("<Q", data, pos)[0]
        if end > len(data):
            break
        if _event_step(data[pos + 12 : end - 4]) <= step:
            kept.append(data[pos:end])
        pos = end
    return b"".join(kept)


def _line_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line torn by a kill


def _truncate(workdir: Path, step: int) -> None:
    """Drop what was logged after `step` (by a run killed after logging, before its next checkpoint, whose steps
    the resumed run replays) from metrics.jsonl and the TensorBoard event files; rewritten atomically."""
    jsonl = workdir / "metrics.jsonl"
    if jsonl.exists():
        lines = jsonl.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if _line_step(line) <= step and line.endswith("\n")]
        if len(kept) < len(lines):
            write_text(jsonl, "".join(kept))
    for events in (workdir / "tensorboard").glob("events.out.tfevents.*"):
        data = events.read_bytes()
        if len(kept := _events_through(data, step)) < len(data):
            with publishing(events) as tmp:
                tmp.write_bytes(kept)


def _log_files(workdir: Path) -> list[Path]:
    return [workdir / "metrics.jsonl", *sorted((workdir / "tensorboard").glob("events.out.tfevents.*"))]


def _mirror(remote: files.Path) -> Path:
    """A fresh local copy of the logs of the bucket workdir `remote`, in this host's cache."""
    local = files.local_cache("logs", hashlib.sha256(str(remote).encode()).hexdigest()[:16])
    for stale in _log_files(local):
        stale.unlink(missing_ok=True)
    (local / "tensorboard").mkdir(exist_ok=True)
    for name in ["metrics.jsonl", *(f"tensorboard/{p.name}" for p in (remote / "tensorboard").glob("events.*"))]:
        if (remote / name).exists():
            files.download(remote / name, local / name)
    return local


class _EventFile:
    """An append-only TensorBoard event file (TFRecord frames of Event protos), flushed after each record."""

    def __init__(self, logdir: Path) -> None:
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(logdir / name, "ab")  # noqa: SIM115 (lives until close())
        self._record(_event(time.time(), 0, file_version="brain.Event:2"))

    def _record(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._file.write(
            header + struct.pack("<I", _masked_crc32c(header)) + data + struct.pack("<I", _masked_crc32c(data))
        )
        self._file.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._record(_event(time.time(), step, scalars=values))

    def close(self) -> None:
        self._file.close()


class _Uploads:
    """Writes snapshots of the log files ({bucket path: bytes}) to the bucket from a daemon thread, so the step
    loop never waits on the network. At most `pending` snapshots wait (a further `put` blocks until one is
    written); a failed upload is raised by the next `put` or by `close`, which writes what is queued first."""

    def __init__(self, pending: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="log-uploads", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (snapshot := self._queue.get()) is not None:
            if self._error is not None:
                continue  # already failed: drop the rest, the error is raised at the next put or close
            try:
                for target, data in snapshot.items():
                    with target.open("wb") as dst:  # one object write: readers see all of it or none
                        dst.write(data)
            except BaseException as err:  # handed to the training thread
                self._error = err

    def put(self, snapshot: dict[Any, bytes]) -> None:
        self._raise()
        self._queue.put(snapshot)

    def close(self) -> None:
        """Write what is queued, end the thread, and raise the first upload error, if any."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"uploading the logs to the bucket failed: {err!r}") from err


def _to_float(key: str, value: Any) -> float:
    if np.ndim(value) != 0:
        raise ValueError(f"metric {key!r} has shape {np.shape(value)}; log scalars only")
    return float(value)


class MetricsWriter:
    """Appends `{"step", "phase"?, ...scalars}` lines to workdir/metrics.jsonl and the same scalars to
    workdir/tensorboard/ (tag `prefix/name`). Each write is flushed, so a killed run keeps its lines.

    Pass `enabled=jax.process_index() == 0` in multi-host runs; a disabled writer touches no files.
    NaN and inf are written as JSON's NaN/Infinity extensions, which Python's json reads back.
    `resume_step`: the step a run restarts from; what was logged after it is dropped first, so a resumed run's
    replayed steps are not logged twice.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        enabled: bool = True,
        resume_step: int | None = None,
        sync_every_s: float = 30.0,
    ) -> None:
        self.enabled = enabled
        if not enabled:
            return
        # A workdir in a bucket is logged to a local mirror that is uploaded every `sync_every_s` and at close
        # (objects cannot be appended to), by a background thread; a run killed meanwhile loses only lines its
        # resume replays anyway.
        self._remote = files.path(workdir) if files.is_remote(workdir) else None
        self._uploads = _Uploads() if self._remote else None
        self._sync_every_s, self._synced = sync_every_s, time.monotonic()
        local = _mirror(self._remote) if self._remote else Path(workdir)
        tb_dir = local / "tensorboard"
        tb_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            _truncate(local, resume_step)
        self._local = local
        self._jsonl = open(local / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._events = _EventFile(tb_dir)

    def _sync(self, force: bool = False) -> None:
        """Queue a snapshot of the local mirror's logs (flushed, read here: whole lines and frames only) for
        upload to the bucket workdir (nothing to do for a local workdir)."""
        if (
            self._remote is None
            or self._uploads is None
            or not (force or time.monotonic() - self._synced >= self._sync_every_s)
        ):
            return
        self._uploads.put(
            {
                self._remote / local.relative_to(self._local).as_posix(): local.read_bytes()
                for local in _log_files(self._local)
            }
        )
        self._synced = time.monotonic()

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
        """Log scalar metrics (Python, numpy or already-fetched jax scalars) for `step` under phase `prefix`."""
        if not self.enabled:
            return
        clash = [k for k in metrics if k in _RESERVED_KEYS]
        if clash:
            raise ValueError(f"metric names {clash} are reserved for the JSON line; rename them")
        scalars = {key: _to_float(key, value) for key, value in metrics.items()}
        line = {"step": int(step), **({"phase": prefix} if prefix else {}), **scalars}
        self._jsonl.write(json.dumps(line) + "\n")
        self._jsonl.flush()
        self._events.scalars(int(step), {f"{prefix}/{k}" if prefix else k: v for k, v in scalars.items()})
        self._sync()

    def close(self) -> None:
        """Close the files; for a bucket workdir, upload them and wait for every upload (raising a failed one)."""
        if self.enabled and not self._jsonl.closed:
            self._jsonl.close()
            self._events.close()
            if self._uploads is not None:
                try:
                    self._sync(force=True)
                finally:
                    self._uploads.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class ProgressBar:
    """Step, loss, learning rate, tokens/s and ETA, with rates over a moving window of wall-clock time so
    compilation and old stalls fade out. On a TTY it is a tqdm bar; elsewhere (CI, log files) it prints a
    plain line every `print_every_s` seconds instead of filling the log with redraws, and the final state once
    at close().

    It only formats host floats (see MetricsBuffer), so it never waits for the device.
    """

    def __init__(
        self,
        total_steps: int,
        enabled: bool = True,
        desc: str = "",
        *,
        file: TextIO | None = None,
        print_every_s: float = 30.0,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.desc = desc
        self._file = file if file is not None else sys.stderr
        self._print_every_s = print_every_s
        self._window_s = window_s
        self._clock = clock
        self._window: deque[tuple[float, int, int]] = deque()  # (time, step, tokens since previous update)
        self._last_print = -math.inf
        self._loss: float | None = None
        self._lr: float | None = None
        self._bar = None
        self._unprinted: int | None = None  # the newest step not printed yet (plain-line mode)
        if enabled and self._file.isatty():
            self._bar = tqdm(
                total=total_steps,
                desc=desc,
                file=self._file,
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
            )

    def update(self, step: int, metrics: Mapping[str, float] | None = None, tokens: int = 0) -> None:
        """Record that training reached `step` after `tokens` more tokens; `metrics` (host values, may lag a
        step) refresh the shown "loss" and "learning_rate"."""
        if not self.enabled:
            return
        if metrics:
            for value in metrics.values():
                if isinstance(value, jax.Array):
                    raise TypeError("ProgressBar takes host values; fetch metrics with MetricsBuffer first")
            self._loss = float(metrics["loss"]) if "loss" in metrics else self._loss
            self._lr = float(metrics["learning_rate"]) if "learning_rate" in metrics else self._lr
        now = self._clock()
        self._window.append((now, step, tokens))
        while len(self._window) > 2 and now - self._window[1][0] >= self._window_s:
            self._window.popleft()
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(self._stats())  # also refreshes (tqdm rate-limits redraws itself)
        elif now - self._last_print >= self._print_every_s:
            self._last_print = now
            self._print(step)
        else:
            self._unprinted = step  # close() prints the final state once, with the last metrics

    def _print(self, step: int) -> None:
        self._unprinted = None
        prefix = f"{self.desc}: " if self.desc else ""
        print(f"{prefix}step {step}/{self.total_steps} {self._stats()}".rstrip(), file=self._file, flush=True)

    def _stats(self) -> str:
        parts = []
        if self._loss is not None:
            parts.append(f"loss={self._loss:.4f}")
        if self._lr is not None:
            parts.append(f"lr={self._lr:.2e}")
        (t0, step0, _), (t1, step1, _) = self._window[0], self._window[-1]
        if t1 > t0:
            tokens = sum(n for _, _, n in list(self._window)[1:])
            parts.append(f"tok/s={_si(tokens / (t1 - t0))}")
            if step1 > step0:
                parts.append(f"eta={_duration((self.total_steps - step1) * (t1 - t0) / (step1 - step0))}")
        return " ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._unprinted is not None:
            self._print(self._unprinted)


class MetricsBuffer:
    """Fetches a jitted step's metrics one step late, so the host never blocks the step loop on the device.

    push() starts the device-to-host copy without waiting; pop_ready() fetches every entry but the newest,
    whose step may still be running. By then those copies are (nearly always) done, and the device keeps
    the just-dispatched step queued while the host logs.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[int, Mapping[str, Any]]] = []

    def push(self, step: int, device_metrics: Mapping[str, Any]) -> None:
        for leaf in jax.tree_util.tree_leaves(device_metrics):
            if isinstance(leaf, jax.Array):
                leaf.copy_to_host_async()
        self._pending.append((step, device_metrics))

    def pop_ready(self) -> list[tuple[int, dict[str, Any]]]:
        """[(step, host metrics)] for all pushed entries older than the newest one."""
        ready, self._pending = self._pending[:-1], self._pending[-1:]
        return self._fetch(ready)

    def flush(self) -> list[tuple[int, dict[str, Any]]]:
        """All remaining entries (waits for the device); call at the end of a run or before an eval."""
        ready, self._pending = self._pending, []
        return self._fetch(ready)

    @staticmethod
    def _fetch(entries: list[tuple[int, Mapping[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
        host = jax.device_get([dict(metrics) for _, metrics in entries])
        return [(step, metrics) for (step, _), metrics in zip(entries, host)]
