"""The step loop shared by every phase: no host sync per step, NaN guard, preemption-safe stop."""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

from dontstop_jax.distributed import any_process
from dontstop_jax.errors import Interrupted, UserError
from dontstop_jax.train.logging import MetricsBuffer, MetricsWriter, ProgressBar

_REQUESTED = threading.Event()  # process-wide: a signal between two phases still stops the next one
_ENTERED: list[StopSignal] = []


def _on_signal(*_: Any) -> None:
    """The first signal asks for a graceful stop; a second one (Ctrl-C twice) stops at once."""
    if _REQUESTED.is_set():
        raise KeyboardInterrupt
    _REQUESTED.set()


class StopSignal:
    """SIGTERM/SIGINT (a TPU maintenance event, `scancel`, Ctrl-C) ask the run to stop: the step loop finishes
    its step, checkpoints and raises `Interrupted`. Handlers stay installed while any StopSignal is entered;
    the CLI holds one for the whole command, so a signal that arrives between phases (during data preparation,
    evaluation or compilation) stops the next phase before its first step. A second signal stops at once.

    With several processes the signal reaches each at a slightly different step, but saving is collective, so
    they must stop at the same one: `poll` combines every process's flag on every `poll_every`-th step (one small
    all-device reduction, read one step late like the metrics, so the host never waits for it), and all stop on
    the step after. Not JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`): it learns
    of SIGTERM from the C handler `jax.distributed.initialize` installs, which the handler here replaces, and
    must, for a signal between phases and a second signal to be ours to act on.
    """

    def __init__(self):
        self._previous: dict[int, Any] = {}
        self._pending: jax.Array | None = None

    def __enter__(self) -> StopSignal:
        if not _ENTERED and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, _on_signal)
        _ENTERED.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ENTERED.remove(self)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if not _ENTERED:
            _REQUESTED.clear()

    @staticmethod
    def request() -> None:
        """Ask to stop, as a signal would (tests, or an embedding program's own preemption notice)."""
        _REQUESTED.set()

    def poll(self, step: int, poll_every: int = 1) -> bool:
        """Whether to stop after `step`; every process calls it once per step with the same arguments. Several
        processes combine their flags on multiples of `poll_every` and stop one step later."""
        if jax.process_count() == 1:
            return _REQUESTED.is_set()
        agreed = self._pending
        self._pending = any_process(_REQUESTED.is_set()) if step % poll_every == 0 else None
        return agreed is not None and bool(agreed)

    @staticmethod
    def requested() -> bool:
        """Whether this process was asked to stop (no collective: for work that runs on one process)."""
        return _REQUESTED.is_set()

    @staticmethod
    def agreed_now() -> bool:
        """Whether any process was asked to stop (a collective: every process calls it at the same point)."""
        if jax.process_count() == 1:
            return _REQUESTED.is_set()
        return bool(jax.device_get(any_process(_REQUESTED.is_set())))


def _check_finite(step: int, metrics: dict[str, float]) -> None:
    loss = metrics.get("loss")
    if loss is not None and not math.isfinite(loss) and not metrics.get("skipped"):
        raise UserError(
            f"loss became {loss} at step {step}; the last good checkpoint is kept: lower the learning "
            "rate, use float32, check the data, or set train.skip_nonfinite=True to skip such steps"
        )


@dataclasses.dataclass(frozen=True)
class Report:
    """Where the step loop's metrics go: `writer` (as train/...) every `log_every` steps and the last, `progress`
    every step."""

    writer: MetricsWriter
    progress: ProgressBar
    log_every: int = 10


@dataclasses.dataclass(frozen=True)
class Saving:
    """When the step loop saves and stops: `save(state, skipped)` every `every` steps (0: never) and before
    stopping on a request to `signal`, which several processes agree on every `poll_every` steps (StopSignal.poll;
    a stop then comes up to `poll_every` steps after the signal); the `Interrupted` raised names `phase`."""

    signal: StopSignal
    phase: str = "training"
    save: Callable[[Any, int], None] | None = None
    every: int = 0
    poll_every: int = 10


def run_steps(
    state: Any,
    step_fn: Callable,
    batches: Iterator[Any],
    *,
    start: int,
    stop: int,
    tokens_per_step: int | Callable[[Any], int],
    report: Report,
    saving: Saving,
    skipped: int = 0,
) -> tuple[Any, int]:
    """Run steps (start, stop] and return the state and the count of skipped steps. Metrics are fetched one step
    late. When asked to stop (`saving.signal`), the state is saved and `Interrupted(phase, step)` raised.
    Steps a `skipped` metric marks (see StepSpec's skip_nonfinite) are counted on from `skipped` (those of
    earlier runs of the phase), so the logged `skipped` and what `save(state, skipped)` gets are phase totals.
    `tokens_per_step`: a count, or a function of the batch (fine-tuning's length-bucketed batches vary); when
    it gives tokens, each logged line also gets `tokens_per_s` since the previous line (host wall clock at
    fetch time, so the first line includes compilation)."""
    if saving.poll_every < 1:
        raise UserError(f"train.stop_poll_every={saving.poll_every} must be >= 1 (steps between stop checks)")
    count_tokens = tokens_per_step if callable(tokens_per_step) else (lambda _: tokens_per_step)
    buffer = MetricsBuffer()
    tokens_through: dict[int, int] = {}  # step -> tokens since `start`, until its metrics are drained
    total_tokens = 0
    last_logged = (start, time.perf_counter(), 0)  # (step, wall clock, tokens through that step)

    def drain(items):
        nonlocal skipped, last_logged
        for s, m in items:
            _check_finite(s, m)
            if "skipped" in m:
                skipped += int(m["skipped"])
                m = {**m, "skipped": skipped}
            through = tokens_through.pop(s)
            if s % report.log_every == 0 or s == stop:
                now = time.perf_counter()
                if through > last_logged[2]:
                    m = {**m, "tokens_per_s": (through - last_logged[2]) / max(now - last_logged[1], 1e-9)}
                last_logged = (s, now, through)
                report.writer.write(s, m, prefix="train/")
            report.progress.update(s, m, tokens=0)

    step = start
    for step in range(start + 1, stop + 1):
        batch = next(batches)
        tokens = count_tokens(batch)
        total_tokens += tokens
        tokens_through[step] = total_tokens
        state, metrics = step_fn(state, batch)
        buffer.push(step, metrics)
        report.progress.update(step, None, tokens=tokens)
        drain(buffer.pop_ready())
        stopping = saving.signal.poll(step, saving.poll_every)
        if saving.save is not None and ((saving.every and step % saving.every == 0) or stopping):
            drain(buffer.flush())  # never checkpoint a state whose loss was not finite
            saving.save(state, skipped)
        if stopping:
            raise Interrupted(saving.phase, step)
    drain(buffer.flush())
    return state, skipped
