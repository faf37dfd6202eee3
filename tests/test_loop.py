"""The shared step loop: logging cadence (the last step is always logged) and a stop request."""

import json
import os
import signal

import jax.numpy as jnp
import pytest

from dontstop_jax.errors import Interrupted
from dontstop_jax.train import MetricsWriter, ProgressBar
from dontstop_jax.train.loop import Report, Saving, StopSignal, run_steps


def _step(state, batch):
    return state + 1, {"loss": jnp.float32(1.0) / (state + 1)}


def _logged_steps(workdir):
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_logs_every_n_steps_and_always_the_last(tmp_path):
    with MetricsWriter(tmp_path) as writer, StopSignal() as stop:
        state, skipped = run_steps(
            0,
            _step,
            iter(range(100)),
            start=0,
            stop=7,
            tokens_per_step=0,
            report=Report(writer, ProgressBar(7, enabled=False), 5),
            saving=Saving(stop),
        )
    assert (state, skipped) == (7, 0)
    assert _logged_steps(tmp_path) == [5, 7]


def test_a_stop_request_saves_after_the_current_step_and_raises(tmp_path):
    saved = []
    with MetricsWriter(tmp_path) as writer, StopSignal() as stop:
        StopSignal.request()
        with pytest.raises(Interrupted, match="interrupted at step 4 of dapt; rerun the same command to continue"):
            run_steps(
                3,
                _step,
                iter(range(100)),
                start=3,
                stop=10,
                tokens_per_step=0,
                report=Report(writer, ProgressBar(10, enabled=False)),
                saving=Saving(stop, "dapt", lambda state, skipped: saved.append(state)),
            )
    assert saved == [4]
    assert not StopSignal.requested()  # leaving the outermost StopSignal forgets the request


def test_a_second_signal_stops_at_once():
    with StopSignal():
        os.kill(os.getpid(), signal.SIGTERM)
        assert StopSignal.requested()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)


def test_logged_lines_carry_throughput_when_tokens_are_counted(tmp_path):
    with MetricsWriter(tmp_path) as writer, StopSignal() as stop:
        run_steps(
            0,
            _step,
            iter(range(100)),
            start=0,
            stop=7,
            tokens_per_step=64,
            report=Report(writer, ProgressBar(7, enabled=False), 5),
            saving=Saving(stop),
        )
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [5, 7]
    assert all(m["tokens_per_s"] > 0 for m in lines)


def test_tokens_counted_per_batch_when_batches_vary(tmp_path, monkeypatch):
    """Fine-tuning's bucketed batches differ in length: the rate comes from each batch's own token count."""
    clock = iter(range(0, 1000, 2))  # every perf_counter call advances 2 s
    monkeypatch.setattr("dontstop_jax.train.loop.time.perf_counter", lambda: next(clock))
    with MetricsWriter(tmp_path) as writer, StopSignal() as stop:
        run_steps(
            0,
            _step,
            iter(range(1, 100)),
            start=0,
            stop=4,
            tokens_per_step=lambda batch: 10 * batch,
            report=Report(writer, ProgressBar(4, enabled=False), 2),
            saving=Saving(stop),
        )
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # steps 1-2 read batches 1 and 2 (30 tokens), steps 3-4 batches 3 and 4 (70 tokens); one clock tick per log
    assert [(m["step"], m["tokens_per_s"]) for m in lines] == [(2, 30 / 2), (4, 70 / 2)]


def test_several_processes_agree_on_a_stop_every_n_steps_only(tmp_path, monkeypatch):
    """No collective on the other steps; the request made at step 3 is seen at the check of step 4, read (and
    stopped at) one step later, on every process alike."""
    import jax
    import numpy as np

    dispatched = []

    def any_process(flag):  # what each process's call of the all-device reduction would return
        dispatched.append(flag)
        return np.bool_(flag)

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr("dontstop_jax.train.loop.any_process", any_process)

    def step(state, batch):
        if state == 2:
            StopSignal.request()  # during step 3
        return _step(state, batch)

    saved = []
    with MetricsWriter(tmp_path) as writer, StopSignal() as stop:
        with pytest.raises(Interrupted, match="interrupted at step 5 of dapt"):
            run_steps(
                0,
                step,
                iter(range(100)),
                start=0,
                stop=10,
                tokens_per_step=0,
                report=Report(writer, ProgressBar(10, enabled=False)),
                saving=Saving(stop, "dapt", lambda state, skipped: saved.append(state), poll_every=2),
            )
    assert dispatched == [False, True] and saved == [5]  # checks at steps 2 and 4 only
