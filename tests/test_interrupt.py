"""Interrupting, resuming and changing a run.

- SIGTERM and SIGKILL at random moments of the tiny grid (base, DAPT, TAPT, fine-tunes) and of a continual run:
  SIGTERM exits 75 promptly with one line, and the rerun's results equal an uninterrupted run's; no fine-tune
  ever starts from an unfinished parent.
- A fine-tune stopped mid-epoch resumes mid-epoch to the same parameters and scores.
- A rerun with a config that changes the result is refused, naming the fields; an unfinished parent is refused.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_pretrain import command, final_params, run, write_corpus

from dontstop_jax.engine.checkpoint import Checkpointer
from dontstop_jax.errors import Interrupted, UserError
from dontstop_jax.phases.finetune import finetune
from dontstop_jax.phases.synthetic import get_config, tiny_model
from dontstop_jax.synthetic import generate_benchmark
from dontstop_jax.train.loop import StopSignal

INTERRUPTED = "interrupted at step {} of {}; rerun the same command to continue"


def _without_timings(tree):
    if isinstance(tree, dict):
        return {k: _without_timings(v) for k, v in tree.items() if "seconds" not in k}
    if isinstance(tree, list):
        return [_without_timings(v) for v in tree]
    return tree


def _interrupt(
    cmd: list[str], cwd: Path, pattern: str, sig: signal.Signals, rng: random.Random
) -> tuple[int, str, float]:
    """Run `cmd`, send `sig` a random 0-0.8 s after `pattern` first appears on stderr; (exit code, stderr, seconds
    from the signal to the exit)."""
    log = cwd / f"stderr-{time.monotonic_ns()}.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        deadline = time.time() + 600
        while pattern not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"finished before {pattern!r} appeared:\n{log.read_text()[-2000:]}"
        time.sleep(rng.uniform(0, 0.8))
        proc.send_signal(sig)
        sent = time.time()
        proc.wait(timeout=600)
    return proc.returncode, log.read_text(), time.time() - sent


def _stop_each(cmd: list[str], cwd: Path, stops: list[tuple[str, signal.Signals]], rng: random.Random) -> None:
    """Interrupt `cmd` once per (stderr pattern, signal), rerunning it each time. SIGTERM must exit 75 within a
    minute (one step plus one checkpoint) with the one-line message and no traceback."""
    for pattern, sig in stops:
        code, stderr, seconds = _interrupt(cmd, cwd, pattern, sig, rng)
        print(f"{sig.name} after {pattern!r}: exit {code} in {seconds:.2f} s: {stderr.strip().splitlines()[-1]}")
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL
            continue
        last = stderr.strip().splitlines()[-1]
        assert code == 75, stderr[-3000:]
        assert last.startswith("interrupted at step ") and last.endswith("; rerun the same command to continue")
        assert "Traceback" not in stderr
        assert seconds < 60, f"took {seconds:.1f} s to stop"


def _parents_were_finished(root: Path) -> None:
    """Every fine-tune started from its parent's final step, and that parent had finished."""
    for done in root.glob("finetune/*/DONE.json"):
        parent = json.loads(done.read_text())["parent"]
        if not parent.startswith("checkpoint:"):
            continue
        directory, step = parent[len("checkpoint:") :].rsplit("@", 1)
        summary = json.loads((Path(directory).parent / "DONE.json").read_text())
        assert int(step) == summary["steps"], (done, parent, summary["steps"])


@pytest.mark.slow
def test_tiny_grid_interrupted_everywhere_gives_the_uninterrupted_table(tmp_path, tiny_grid):
    rng = random.Random(int(time.time()))
    print("random seed for the kill moments:", rng.getstate()[1][0])
    reference, _ = tiny_grid  # the same tiny demo, run uninterrupted

    def demo(name: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "dontstop_jax",
            "demo",
            "--scale",
            "tiny",
            f"--config.workdir={tmp_path / name}",
            f"--config.synthetic.directory={tmp_path / 'bench'}",
        ]

    stops = [
        ("base: step", signal.SIGTERM),
        ("dapt-bio: step", signal.SIGTERM),
        ("tapt-bio_topic: step", signal.SIGKILL),
        ("bio_topic-tapt-s0: step", signal.SIGTERM),
        ("bio_topic-dapt_tapt-s1: step", signal.SIGKILL),
        ("dapt-cs: step", signal.SIGTERM),
    ]
    _stop_each(demo("interrupted"), tmp_path, stops, rng)
    again = subprocess.run(demo("interrupted"), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "interrupted at step" not in again.stderr  # (its workdir is named "interrupted")
    results = [
        json.loads((root / "results.json").read_text()) for root in (reference / "grid", tmp_path / "interrupted")
    ]
    assert _without_timings(results[0]) == _without_timings(results[1])
    _parents_were_finished(tmp_path / "interrupted")


@pytest.mark.slow
def test_continual_interrupted_gives_the_uninterrupted_table(tmp_path, continual_reference, monkeypatch):
    """The session's tiny DAS sequence (conftest.py), stopped in both stages and in a fine-tune, then rerun: its
    table is the uninterrupted run's (on the reference's 2 devices)."""
    rng = random.Random(int(time.time()) + 1)
    print("random seed for the kill moments:", rng.getstate()[1][0])
    argv, reference = continual_reference
    monkeypatch.setenv("DONTSTOP_LOCAL_DEVICES", "2")
    cmd = [sys.executable, "-m", "dontstop_jax", *argv, f"--config.workdir={tmp_path / 'interrupted'}"]
    cmd.append(f"--config.synthetic.directory={tmp_path / 'bench'}")
    stops = [("das-bio: step", signal.SIGTERM), ("das-cs: step", signal.SIGKILL), ("cs_topic-s0: step", signal.SIGTERM)]
    _stop_each(cmd, tmp_path, stops, rng)
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    table = json.loads((tmp_path / "interrupted" / "continual.json").read_text())
    assert _without_timings(reference) == _without_timings(table)
    _parents_were_finished(tmp_path / "interrupted")


@pytest.fixture(scope="module")
def finetune_config(tmp_path_factory):
    """A 3-epoch fine-tune of a tiny RoBERTa from scratch on the synthetic bio task (5 batches per epoch)."""
    root = tmp_path_factory.mktemp("finetune")
    bench = generate_benchmark(root / "bench", seed=0, scale="tiny", domains=("bio",))
    cfg = get_config("tiny").finetune
    cfg.init, cfg.tokenizer = "scratch", str(bench.tokenizer)
    cfg.model.update({k: v for k, v in tiny_model().items() if k in cfg.model})
    cfg.task.path = str(bench.tasks["bio_topic"].train.parent)
    cfg.train.log_every = 1
    return root, cfg


def _finetune_in(cfg, workdir: Path):
    cfg = cfg.copy_and_resolve_references()
    cfg.workdir, cfg.name = str(workdir), workdir.name
    return cfg


@pytest.fixture(scope="module")
def finetune_reference(finetune_config):
    root, cfg = finetune_config
    return finetune(_finetune_in(cfg, root / "reference"))


@pytest.mark.parametrize("batch", [2, 4], ids=["mid_epoch", "at_the_epochs_last_step"])
def test_finetune_stopped_in_an_epoch_resumes_there(finetune_config, finetune_reference, batch, monkeypatch):
    """Stopped at epoch 1's third step, or at its last one (the checkpoint then precedes the epoch's evaluation,
    and the resumed run's evaluation replaces it at the same step)."""
    root, cfg = finetune_config
    reference, name = finetune_reference, f"interrupted-{batch}"

    from dontstop_jax.data.tasks import ClassificationBatches

    epoch = ClassificationBatches.epoch

    def stop_during_epoch_1(self, e, start=0):
        for i, item in enumerate(epoch(self, e, start)):
            if self.shuffle and e == 1 and start + i == batch:
                StopSignal.request()  # as SIGTERM would, while the step reading this batch runs
            yield item

    monkeypatch.setattr(ClassificationBatches, "epoch", stop_during_epoch_1)
    with StopSignal(), pytest.raises(Interrupted) as stopped:
        finetune(_finetune_in(cfg, root / name))
    assert str(stopped.value) == INTERRUPTED.format(6 + batch, name)  # epoch 1 is steps 6-10
    assert not (root / name / "DONE.json").exists()
    monkeypatch.undo()

    resumed = finetune(_finetune_in(cfg, root / name))
    assert (resumed["test"], resumed["dev"], resumed["best_step"]) == (
        reference["test"],
        reference["dev"],
        reference["best_step"],
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, final_params(root / name), final_params(root / "reference"))


@pytest.fixture(scope="module")
def finished_phase(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("drift")
    corpus, cache = write_corpus(root), root / "cache"
    out = run(command(root / "phase", corpus, tiny_tokenizer_dir, cache, 4))
    assert out.returncode == 0, out.stderr[-2000:]
    return root, corpus, tiny_tokenizer_dir, cache


def test_a_changed_config_is_refused_naming_the_fields(finished_phase):
    root, corpus, tokenizer, cache = finished_phase
    changed = run(command(root / "phase", corpus, tokenizer, cache, 5, {"optim.learning_rate": 2e-3}))
    assert changed.returncode == 2
    line = changed.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("error: "), line
    assert "optim.learning_rate: 0.001 -> 0.002" in line and "train.steps: 4 -> 5" in line
    assert "use a new workdir" in line and "phase_config.json" in line


def test_run_time_only_fields_may_change(finished_phase):
    root, corpus, tokenizer, cache = finished_phase
    same = run(
        command(
            root / "phase",
            corpus,
            tokenizer,
            cache,
            4,
            {"train.log_every": 1, "checkpoint.every": 2, "mesh.shape": "(2, -1, 1)"},
        )
    )
    assert same.returncode == 0, same.stderr[-2000:]
    assert json.loads(same.stdout)["steps"] == 4  # the finished phase's summary, nothing retrained


def test_an_unfinished_parent_is_refused(finished_phase, tmp_path):
    root, corpus, tokenizer, cache = finished_phase
    unfinished = tmp_path / "unfinished"
    subprocess.run(["cp", "-r", str(root / "phase"), str(unfinished)], check=True)
    (unfinished / "DONE.json").unlink()
    child = run(command(tmp_path / "child", corpus, tokenizer, cache, 2, {"init": str(unfinished)}))
    assert child.returncode == 2
    assert child.stderr.strip() == (
        f"error: init={str(unfinished)!r} is a phase that has not finished (no DONE.json); "
        "rerun the command that trains it until it completes, then start from it"
    )


def test_python_callers_get_the_same_errors(finished_phase):
    from dontstop_jax.train.workdir import require_finished

    root, *_ = finished_phase
    assert require_finished(root / "phase", "init")["steps"] == 4
    with pytest.raises(UserError, match="has not finished"):
        require_finished(root, "init")


def test_a_run_that_failed_before_writing_anything_does_not_pin_its_config(finished_phase, tmp_path):
    root, corpus, tokenizer, cache = finished_phase
    failed = run(command(tmp_path / "w", corpus, tokenizer, cache, 2, {"init": "/nonexistent/model"}))
    assert failed.returncode == 2 and "is neither" in failed.stderr
    assert run(command(tmp_path / "w", corpus, tokenizer, cache, 3)).returncode == 0  # another config, same place


def test_steps_per_epoch_caps_each_epoch(finetune_config):
    """A large task's "epoch" can be capped: dev evaluation and early stopping every `steps_per_epoch` batches."""
    root, cfg = finetune_config
    cfg = _finetune_in(cfg, root / "capped")
    cfg.train.update(epochs=2, steps_per_epoch=2)
    summary = finetune(cfg)
    assert summary["epochs_run"] == 2 and summary["best_step"] in (2, 4)
    assert Checkpointer(root / "capped" / "checkpoints", read_only=True).latest_step() == 4
