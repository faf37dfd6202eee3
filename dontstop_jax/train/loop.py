"""The step loop shared by every phase: no host sync per step, NaN guard, preemption-safe stop."""

from __future__ import annotations

import math
import signal
import threading
import time
from typing import Any, Callable, Iterator

import jax

from dontstop_jax.distributed import any_process
from dontstop_jax.errors import UserError
from dontstop_jax.train.logging import MetricsBuffer, MetricsWriter, ProgressBar


class StopSignal:
    """Set by SIGTERM/SIGINT (a TPU maintenance event, `scancel`, Ctrl-C): finish the step, save, exit 0.

    With several processes the signal reaches each at a slightly different step, but saving is collective, so
    they must stop at the same one: `poll` combines every process's flag, read one step late like the metrics.
    """

    def __init__(self):
        self.event = threading.Event()
        self._previous: dict[int, Any] = {}
        self._pending: jax.Array | None = None

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, lambda *_: self.event.set())
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def poll(self) -> bool:
        """Whether to stop after this step; every process calls it once per step."""
        if jax.process_count() == 1:
            return self.event.is_set()
        agreed, self._pending = self._pending, any_process(self.event.is_set())
        return agreed is not None and bool(agreed)


def _check_finite(step: int, metrics: dict[str, float]) -> None:
    loss = metrics.get("loss")
    if loss is not None and not math.isfinite(loss) and not metrics.get("skipped"):
        raise UserError(f"loss became {loss} at step {step}; the last good checkpoint is kept: lower the learning "
                        "rate, use float32, check the data, or set train.skip_nonfinite=True to skip such steps")


def run_steps(state: Any, step_fn: Callable, batches: Iterator[dict], *, start: int, stop: int,
              writer: MetricsWriter, progress: ProgressBar, tokens_per_step: int | Callable[[Any], int],
              stop_signal: StopSignal, log_every: int = 10, save: Callable[[Any], None] | None = None,
              save_every: int = 0, prefix: str = "train/") -> tuple[Any, bool]:
    """Run steps [start, stop). Returns (state, interrupted). Metrics are fetched one step late.
    A `skipped` metric (see make_train_step's skip_nonfinite) is logged as the count since `start`.
    `tokens_per_step`: a count, or a function of the batch (fine-tuning's length-bucketed batches vary); when
    it gives tokens, each logged line also gets `tokens_per_s` since the previous line (host wall clock at
    fetch time, so the first line includes compilation)."""
    count_tokens = tokens_per_step if callable(tokens_per_step) else (lambda _: tokens_per_step)
    buffer = MetricsBuffer()
    skipped = 0.0
    tokens_through: dict[int, int] = {}  # step -> tokens since `start`, until its metrics are drained
    total_tokens = 0
    last_logged = (start, time.perf_counter(), 0)  # (step, wall clock, tokens through that step)

    def drain(items):
        nonlocal skipped, last_logged
        for s, m in items:
            _check_finite(s, m)
            if "skipped" in m:
                skipped += m["skipped"]
                m = {**m, "skipped": skipped}
            through = tokens_through.pop(s)
            if s % log_every == 0 or s == stop:
                now = time.perf_counter()
                if through > last_logged[2]:
                    m = {**m, "tokens_per_s": (through - last_logged[2]) / max(now - last_logged[1], 1e-9)}
                last_logged = (s, now, through)
                writer.write(s, m, prefix=prefix)
            progress.update(s, m, tokens=0)

    step = start
    for step in range(start + 1, stop + 1):
        batch = next(batches)
        tokens = count_tokens(batch)
        total_tokens += tokens
        tokens_through[step] = total_tokens
        state, metrics = step_fn(state, batch)
        buffer.push(step, metrics)
        progress.update(step, None, tokens=tokens)
        drain(buffer.pop_ready())
        stopping = stop_signal.poll()
        if save is not None and ((save_every and step % save_every == 0) or stopping):
            drain(buffer.flush())  # never checkpoint a state whose loss was not finite
            save(state)
        if stopping:
            return state, True
    drain(buffer.flush())
    return state, False
