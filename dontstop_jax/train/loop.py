"""The step loop shared by every phase: no host sync per step, NaN guard, preemption-safe stop."""

from __future__ import annotations

import math
import signal
import threading
from typing import Any, Callable, Iterator

from dontstop_jax.errors import UserError
from dontstop_jax.train.logging import MetricsBuffer, MetricsWriter, ProgressBar


class StopSignal:
    """Set by SIGTERM/SIGINT (a TPU maintenance event, `scancel`, Ctrl-C): finish the step, save, exit 0."""

    def __init__(self):
        self.event = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, lambda *_: self.event.set())
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __bool__(self) -> bool:
        return self.event.is_set()


def _check_finite(step: int, metrics: dict[str, float]) -> None:
    loss = metrics.get("loss")
    if loss is not None and not math.isfinite(loss):
        raise UserError(f"loss became {loss} at step {step}; the last good checkpoint is kept: lower the learning "
                        "rate, use float32, or check the data")


def run_steps(state: Any, step_fn: Callable, batches: Iterator[dict], *, start: int, stop: int,
              writer: MetricsWriter, progress: ProgressBar, tokens_per_step: int, stop_signal: StopSignal,
              log_every: int = 10, save: Callable[[Any], None] | None = None, save_every: int = 0,
              prefix: str = "train/") -> tuple[Any, bool]:
    """Run steps [start, stop). Returns (state, interrupted). Metrics are fetched one step late."""
    buffer = MetricsBuffer()

    def drain(items):
        for s, m in items:
            _check_finite(s, m)
            if s % log_every == 0 or s == stop:
                writer.write(s, m, prefix=prefix)
            progress.update(s, m, tokens=0)

    step = start
    for step in range(start + 1, stop + 1):
        state, metrics = step_fn(state, next(batches))
        buffer.push(step, metrics)
        progress.update(step, None, tokens=tokens_per_step)
        drain(buffer.pop_ready())
        if save is not None and ((save_every and step % save_every == 0) or stop_signal):
            drain(buffer.flush())  # never checkpoint a state whose loss was not finite
            save(state)
        if stop_signal:
            return state, True
    drain(buffer.flush())
    return state, False
