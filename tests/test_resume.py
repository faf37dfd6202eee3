"""A pretraining phase killed with SIGKILL and relaunched ends with the same parameters as an uninterrupted
run (data order included: the loader position is in the checkpoint); SIGTERM checkpoints and exits 75."""

import signal
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_pretrain import command, final_params, run, wait_for_checkpoint, write_corpus

from dontstop_jax.engine.checkpoint import Checkpointer

pytestmark = [pytest.mark.slow, pytest.mark.fast_compile_commands]  # tiny runs: compile-bound (conftest.py)
STEPS = 120


def _command(workdir: Path, corpus: Path, tokenizer: str, cache: Path) -> list[str]:
    return command(workdir, corpus, tokenizer, cache, STEPS)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("resume")
    return root, write_corpus(root), tiny_tokenizer_dir


def test_killed_and_relaunched_equals_uninterrupted(setup):
    root, corpus, tokenizer = setup
    cache = root / "cache"
    ref = run(_command(root / "uninterrupted", corpus, tokenizer, cache))
    assert ref.returncode == 0, ref.stderr[-2000:]
    reference = final_params(root / "uninterrupted")

    for kill_after in (10, 50):  # two different kill points
        workdir = root / f"killed-{kill_after}"
        proc = subprocess.Popen(
            _command(workdir, corpus, tokenizer, cache),
            cwd=Path(__file__).parents[1],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_checkpoint(workdir, proc, kill_after)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (workdir / "DONE.json").exists(), "the run finished before it could be killed"
        again = run(_command(workdir, corpus, tokenizer, cache))
        assert again.returncode == 0, again.stderr[-2000:]
        jax.tree_util.tree_map(np.testing.assert_array_equal, final_params(workdir), reference)


def test_sigterm_checkpoints_and_exits_cleanly(setup):
    root, corpus, tokenizer = setup
    workdir = root / "preempted"
    proc = subprocess.Popen(
        _command(workdir, corpus, tokenizer, root / "cache"),
        cwd=Path(__file__).parents[1],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_checkpoint(workdir, proc, 10)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    step = Checkpointer(workdir / "checkpoints", read_only=True).latest_step()
    assert step is not None and 10 <= step < STEPS and not (workdir / "DONE.json").exists()
    assert run(_command(workdir, corpus, tokenizer, root / "cache")).returncode == 0
    assert (workdir / "DONE.json").exists()
