"""A pretraining phase killed with SIGKILL and relaunched ends with the same parameters as an uninterrupted
run (data order included: the loader position is in the checkpoint); SIGTERM checkpoints and exits 0."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from dontstop_jax.engine.checkpoint import Checkpointer

pytestmark = pytest.mark.slow
STEPS = 120


def _command(workdir: Path, corpus: Path, tokenizer: str, cache: Path) -> list[str]:
    overrides = {
        "init": "scratch", "tokenizer": tokenizer, "workdir": str(workdir), "data.sources": f'["{corpus}"]',
        "data.max_seq_length": 32, "data.cache_dir": str(cache), "train.batch_size": 8, "train.accum_steps": 1,
        "train.steps": STEPS, "train.log_every": 5, "checkpoint.every": 10, "checkpoint.keep_last": 2,
        "model.vocab_size": 512, "model.hidden_size": 32, "model.num_hidden_layers": 2,
        "model.num_attention_heads": 4, "model.intermediate_size": 64, "model.max_position_embeddings": 34,
        "mesh.shape": "(-1, 1, 1)", "optim.learning_rate": 1e-3}
    return [sys.executable, "-m", "dontstop_jax", "pretrain", "--config", "configs/dapt.py:biomed",
            "--compilation-cache", str(cache / "xla")] + [f"--config.{k}={v}" for k, v in overrides.items()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "protein", "binds", "cell", "graph", "node", "edge"]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, 20)) for _ in range(400)) + "\n")
    return root, corpus, tiny_tokenizer_dir


def _run(cmd, **kwargs):
    return subprocess.run(cmd, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=600, **kwargs)


def _params(workdir: Path):
    return Checkpointer(workdir / "checkpoints", read_only=True).restore_params()


def _wait_for_checkpoint(workdir: Path, proc: subprocess.Popen, min_step: int) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
        if steps and max(steps) >= min_step:
            return
        time.sleep(0.02)


def test_killed_and_relaunched_equals_uninterrupted(setup):
    root, corpus, tokenizer = setup
    cache = root / "cache"
    ref = _run(_command(root / "uninterrupted", corpus, tokenizer, cache))
    assert ref.returncode == 0, ref.stderr[-2000:]
    reference = _params(root / "uninterrupted")

    for kill_after in (10, 50):  # two different kill points
        workdir = root / f"killed-{kill_after}"
        proc = subprocess.Popen(_command(workdir, corpus, tokenizer, cache), cwd=Path(__file__).parents[1],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_checkpoint(workdir, proc, kill_after)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (workdir / "DONE.json").exists(), "the run finished before it could be killed"
        again = _run(_command(workdir, corpus, tokenizer, cache))
        assert again.returncode == 0, again.stderr[-2000:]
        jax.tree_util.tree_map(np.testing.assert_array_equal, _params(workdir), reference)


def test_sigterm_checkpoints_and_exits_cleanly(setup):
    root, corpus, tokenizer = setup
    workdir = root / "preempted"
    proc = subprocess.Popen(_command(workdir, corpus, tokenizer, root / "cache"), cwd=Path(__file__).parents[1],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(workdir, proc, 10)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    step = Checkpointer(workdir / "checkpoints", read_only=True).latest_step()
    assert 10 <= step < STEPS and not (workdir / "DONE.json").exists()
    assert _run(_command(workdir, corpus, tokenizer, root / "cache")).returncode == 0
    assert (workdir / "DONE.json").exists()
