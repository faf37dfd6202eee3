"""The shared step loop: logging cadence (the last step is always logged) and a stop request."""

import json

import jax.numpy as jnp

from dontstop_jax.train import MetricsWriter, ProgressBar
from dontstop_jax.train.loop import StopSignal, run_steps


def _step(state, batch):
    return state + 1, {"loss": jnp.float32(1.0) / (state + 1)}


def _logged_steps(workdir):
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_logs_every_n_steps_and_always_the_last(tmp_path):
    with MetricsWriter(tmp_path) as writer, StopSignal() as stop:
        state, interrupted = run_steps(0, _step, iter(range(100)), start=0, stop=7, writer=writer,
                                       progress=ProgressBar(7, enabled=False), tokens_per_step=0,
                                       stop_signal=stop, log_every=5)
    assert (state, interrupted) == (7, False)
    assert _logged_steps(tmp_path) == [5, 7]


def test_a_stop_request_saves_and_returns_after_the_current_step(tmp_path):
    saved = []
    with MetricsWriter(tmp_path) as writer, StopSignal() as stop:
        stop.event.set()
        state, interrupted = run_steps(3, _step, iter(range(100)), start=3, stop=10, writer=writer,
                                       progress=ProgressBar(10, enabled=False), tokens_per_step=0,
                                       stop_signal=stop, save=saved.append)
    assert (state, interrupted, saved) == (4, True, [4])


def test_logged_lines_carry_throughput_when_tokens_are_counted(tmp_path):
    with MetricsWriter(tmp_path) as writer, StopSignal() as stop:
        run_steps(0, _step, iter(range(100)), start=0, stop=7, writer=writer, progress=ProgressBar(7, enabled=False),
                  tokens_per_step=64, stop_signal=stop, log_every=5)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [5, 7]
    assert all(m["tokens_per_s"] > 0 for m in lines)
