"""A tiny DAPT phase run through the CLI, shared by the resume and launch tests; `cli` runs any command."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dontstop_jax.engine.checkpoint import Checkpointer

REPO = Path(__file__).parents[1]
WORDS = ["alpha", "beta", "gamma", "delta", "protein", "binds", "cell", "graph", "node", "edge"]


def write_corpus(root: Path) -> Path:
    """400 lines of 20 random words: a few hundred 32-token blocks."""
    rng = np.random.default_rng(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS, 20)) for _ in range(400)) + "\n")
    return corpus


def command(
    workdir: Path, corpus: Path, tokenizer: str, cache: Path, steps: int, extra: dict[str, object] | None = None
) -> list[str]:
    """`python -m dontstop_jax pretrain ...` for a 2-layer, 32-wide RoBERTa; `extra` adds/overrides fields."""
    overrides = {
        "init": "scratch",
        "tokenizer": tokenizer,
        "workdir": str(workdir),
        "data.sources": f'["{corpus}"]',
        "data.max_seq_length": 32,
        "data.cache_dir": str(cache),
        "train.batch_size": 8,
        "train.accum_steps": 1,
        "train.steps": steps,
        "train.log_every": 5,
        "checkpoint.every": 10,
        "checkpoint.keep_last": 2,
        "model.vocab_size": 512,
        "model.hidden_size": 32,
        "model.num_hidden_layers": 2,
        "model.num_attention_heads": 4,
        "model.intermediate_size": 64,
        "model.max_position_embeddings": 34,
        "mesh.shape": "(-1, 1, 1)",
        "optim.learning_rate": 1e-3,
        **(extra or {}),
    }
    return [sys.executable, "-m", "dontstop_jax", "pretrain", "--config", "configs/dapt.py:biomed"] + [
        f"--config.{k}={v}" for k, v in overrides.items()
    ]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=600, **kwargs)


def cli(*args: str, cwd: Path = REPO) -> str:
    """`dontstop ARGS` in a fresh process; its stdout (a failure shows its stderr)."""
    out = subprocess.run(
        [sys.executable, "-m", "dontstop_jax", *args], cwd=cwd, capture_output=True, text=True, timeout=1200
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, timeout: float = 300) -> None:
    """Return once `ready()` holds, the process has ended, or `timeout` seconds passed."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)


def wait_for_checkpoint(workdir: Path, proc: subprocess.Popen, min_step: int) -> None:
    """Return once a checkpoint at `min_step` or later exists (or the process ended)."""

    def ready() -> bool:
        return any(int(p.name) >= min_step for p in (workdir / "checkpoints").glob("*") if p.name.isdigit())

    wait_until(ready, proc)


def final_params(workdir: Path):
    """The phase's latest parameters, read in this (single) process as host numpy arrays."""
    return Checkpointer(workdir / "checkpoints", read_only=True).restore_params()
