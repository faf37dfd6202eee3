"""launch/run.sh: the exact commands of every mode, and a real 2-process x 2-device run on this machine that
matches one process with 4 devices (losses, parameters) and shares checkpoints with it in both directions."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_pretrain import REPO, command, final_params, run, wait_until, write_corpus

from dontstop_jax.engine.checkpoint import Checkpointer

pytestmark = pytest.mark.fast_compile_commands  # tiny pretraining runs: compile-bound (conftest.py)

LAUNCH = str(REPO / "launch" / "run.sh")
ARGS = [
    "pretrain",
    "--config",
    "configs/dapt.py:biomed",
    "--config.mesh.shape=(4, 1, 1)",
    '--config.data.sources=["/data/my corpus/*.txt", "gs://bkt/data/*.jsonl.gz"]',
    "--config.workdir=gs://bkt/runs/dapt",
    "--config.optim.learning_rate=1e-3",
]
STEPS = 20


def _dry_run(*launcher: str) -> list[str]:
    out = subprocess.run(["bash", LAUNCH, *launcher, "--dry-run", *ARGS], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_local_dry_run_prints_one_command_per_process():
    lines = _dry_run("local", "--processes", "3", "--devices", "2", "--port", "4321", "--log-dir", "logs/t")
    assert lines[-1] == "wait" and len(lines) == 4
    for i, line in enumerate(lines[:3]):
        command, redirect = line.split(" > ", 1)
        assert shlex.split(command) == [
            "env",
            "DONTSTOP_COORDINATOR=127.0.0.1:4321",
            "DONTSTOP_NUM_PROCESSES=3",
            f"DONTSTOP_PROCESS_ID={i}",
            "DONTSTOP_LOCAL_DEVICES=2",
            "python3",
            "-m",
            "dontstop_jax",
            *ARGS,
        ]
        assert f"logs/t/process-{i}.log" in redirect and redirect.endswith("2>&1 &")


def test_local_dry_run_picks_a_free_port():
    port = _dry_run("local")[0].split("DONTSTOP_COORDINATOR=127.0.0.1:")[1].split()[0]
    assert 0 < int(port) < 65536


def test_gpu_dry_run_is_one_plain_process():
    command, redirect = _dry_run("gpu", "--python", "/venv/bin/python", "--log-dir", "L")[0].split(" > ", 1)
    assert shlex.split(command) == ["/venv/bin/python", "-m", "dontstop_jax", *ARGS]
    assert "tee L/process-0.log" in redirect


def test_slurm_dry_run_is_one_srun_task_per_node():
    mkdir, srun = _dry_run("slurm", "--log-dir", "L", "--srun-args", "--gpus-per-node=8 --time=1:00:00")
    assert mkdir == "mkdir -p L"
    assert shlex.split(srun) == [
        "srun",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--output=L/process-%t.log",
        "--gpus-per-node=8",
        "--time=1:00:00",
        "python3",
        "-m",
        "dontstop_jax",
        *ARGS,
    ]


def test_tpu_dry_run_runs_on_every_worker_and_splits_logs():
    mkdir, pipeline = _dry_run(
        "tpu", "--tpu", "v4-32", "--zone", "us-central2-b", "--project", "p", "--venv", "~/venv", "--log-dir", "L"
    )
    assert mkdir == "mkdir -p L"
    ssh, split = pipeline.split(" 2>&1 | ", 1)
    argv = shlex.split(ssh)
    assert argv[:11] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "v4-32",
        "--zone",
        "us-central2-b",
        "--project",
        "p",
        "--worker=all",
    ]
    remote = argv[11].removeprefix("--command=")
    assert "cd dontstop-jax && source ~/venv/bin/activate && " in remote
    dontstop = remote.split("DONTSTOP_TPU=1 ", 1)[1].split(" 2>&1 | ", 1)[0]
    assert shlex.split(dontstop) == ["python3", "-m", "dontstop_jax", *ARGS]  # arguments pass unchanged
    assert split.startswith("awk -v dir=L ") and "/worker-" in split


def test_help_and_errors():
    text = subprocess.run(["bash", LAUNCH, "--help"], capture_output=True, text=True, check=True).stdout
    for mode in ("local", "gpu", "slurm", "tpu"):
        assert f"launch/run.sh {mode} " in text  # a copy-pasteable example per mode
    for bad in (["nope", "pretrain"], ["local", "--bogus", "1", "pretrain"], ["local"], ["tpu", "pretrain"]):
        out = subprocess.run(["bash", LAUNCH, *bad], capture_output=True, text=True, check=False)
        assert out.returncode == 2 and out.stderr.startswith("run.sh: ")


# ---- real runs: 2 processes x 2 CPU devices against 1 process x 4 devices ----------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("launch")
    return root, write_corpus(root), tiny_tokenizer_dir


def _argv(tiny, workdir: Path, mesh: str, dcn: str = "None") -> list[str]:
    root, corpus, tokenizer = tiny
    extra = {
        "mesh.shape": mesh,
        "mesh.dcn_shape": dcn,
        "checkpoint.keep_last": STEPS,
    }  # keep every checkpoint: resume from step 10
    return command(workdir, corpus, tokenizer, root / "cache", STEPS, extra)


def _one_process(argv: list[str]) -> None:
    out = run(argv, env={**os.environ, "DONTSTOP_LOCAL_DEVICES": "4"})
    assert out.returncode == 0, out.stderr[-3000:]


def _two_processes(argv: list[str], log_dir: Path) -> None:
    out = run(_launcher(argv, log_dir))
    assert out.returncode == 0, out.stderr[-3000:]


def _launcher(argv: list[str], log_dir: Path) -> list[str]:
    return [
        "bash",
        LAUNCH,
        "local",
        "--processes",
        "2",
        "--devices",
        "2",
        "--python",
        sys.executable,
        "--log-dir",
        str(log_dir),
        *argv[3:],
    ]


def _losses(workdir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


def _assert_same_params(a, b) -> None:
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)


def _keep_checkpoints_up_to(source: Path, target: Path, step: int) -> None:
    """A copy of a finished phase as if it had stopped at checkpoint `step`."""
    shutil.copytree(source, target)
    (target / "DONE.json").unlink()
    for path in (target / "checkpoints").iterdir():
        if path.name.isdigit() and int(path.name) > step:
            shutil.rmtree(path)


@pytest.fixture(scope="module")
def reference(tiny):
    """One process with 4 CPU devices, mesh (4,1,1)."""
    workdir = tiny[0] / "one-process"
    _one_process(_argv(tiny, workdir, "(4, 1, 1)"))
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["(4, 1, 1)", "(2, 2, 1)"])
def test_two_processes_match_one(tiny, reference, mesh):
    root = tiny[0]
    workdir, logs = root / f"two-processes-{mesh}", root / f"logs-{mesh}"
    _two_processes(_argv(tiny, workdir, mesh), logs)
    assert sorted(p.name for p in logs.iterdir()) == ["process-0.log", "process-1.log"]
    expected, losses = _losses(reference), _losses(workdir)
    assert sorted(losses) == sorted(expected) and len(losses) == STEPS // 5
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [expected[s] for s in sorted(losses)], rtol=1e-5)
    _assert_same_params(final_params(workdir), final_params(reference))  # restored here, in one process


@pytest.mark.slow
def test_checkpoints_move_between_process_counts(tiny, reference):
    root = tiny[0]
    one_to_two = root / "one-then-two"  # 1 process -> 10 steps -> 2 processes finish, on a hybrid mesh
    _keep_checkpoints_up_to(reference, one_to_two, 10)  # whose data axis is the 2 processes (as slices)
    _two_processes(_argv(tiny, one_to_two, "(1, 2, 1)", dcn="(2, 1, 1)"), root / "logs-one-then-two")
    _assert_same_params(final_params(one_to_two), final_params(reference))

    two_to_one = root / "two-then-one"  # 2 processes stopped by SIGTERM -> 1 process finishes
    poll = ["--config.train.stop_poll_every=2"]  # the processes agree on a stop every 2 steps, not every step
    proc = subprocess.Popen(
        _launcher(_argv(tiny, two_to_one, "(2, 2, 1)") + poll, root / "logs-two-then-one"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = two_to_one / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and metrics.stat().st_size > 0, proc)  # both are past step 5
    proc.send_signal(signal.SIGTERM)  # forwarded to both processes, which agree on the step to stop at
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]  # EX_TEMPFAIL: rerun to continue
    stopped = Checkpointer(two_to_one / "checkpoints", read_only=True).latest_step()
    assert stopped is not None and 0 < stopped < STEPS and not (two_to_one / "DONE.json").exists()
    said = [
        re.findall(r"interrupted at step (\d+) of", (root / "logs-two-then-one" / f"process-{p}.log").read_text())
        for p in range(2)
    ]
    assert said == [[str(stopped)], [str(stopped)]]  # both processes stopped after the step they saved
    _one_process(_argv(tiny, two_to_one, "(2, 2, 1)"))
    _assert_same_params(final_params(two_to_one), final_params(reference))
