"""DAS on the synthetic benchmark (3 domains): it forgets measurably less than plain sequential DAPT (NCL),
while still learning each new domain; the continual recipe writes its per-stage table."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dontstop_jax.analysis.continual import backward_transfer, forgetting
from dontstop_jax.phases.continual import Continual, synthetic_config
from dontstop_jax.phases.synthetic import materialize


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    cfg = synthetic_config("tiny")
    cfg.workdir = str(root)
    cfg.synthetic.directory = str(root / "benchmark")
    cfg.finetune.train.epochs = 1
    # 60 steps per stage: with 20, forgetting lives in the embeddings/LM head (which DAS does not mask); at 60
    # the encoder carries it (measured: swapping the stage-1 output side back barely lowers NCL's bio loss).
    cfg.dapt.train.steps = 60
    return Continual(materialize(cfg))


@pytest.mark.slow
@pytest.mark.xla_defaults  # the margins below were measured at XLA's defaults
def test_das_forgets_less_than_ncl(recipe):
    base = recipe.base()
    seq = list(recipe.cfg.sequence)
    losses = {m: recipe.domain_losses([base] + recipe.stages(m, base), seq) for m in ("das", "ncl")}
    # losses[m][k, d]: MLM loss on domain d after stage k (0 = base). Forgetting of domain d: its loss at the
    # end minus right after learning it; learning of the last domain: its loss drop in the last stage.
    forget = {m: np.mean([L[-1, d] - L[d + 1, d] for d in range(len(seq) - 1)]) for m, L in losses.items()}
    learned = {m: L[-2, -1] - L[-1, -1] for m, L in losses.items()}
    print({m: np.round(L, 3).tolist() for m, L in losses.items()}, forget, learned)
    # Measured (2026-11-23): NCL forgets 4.58 nats, DAS 3.59; NCL learns news by 4.55, DAS by 4.07. 2026-12-05 at
    # XLA -O1: NCL 4.11, DAS 3.53; at -O0 DAS 3.84, which fails: the margin is thin and sensitive to the compiler's
    # rounding (this test compiles at XLA's defaults: xla_defaults, conftest.py).
    assert forget["ncl"] > 1.0  # the benchmark really makes a sequential learner forget
    assert forget["das"] < 0.9 * forget["ncl"]
    assert learned["das"] > 0.7 * learned["ncl"] > 0  # protection is soft: DAS still learns the new domain


@pytest.mark.slow
def test_cli_writes_the_continual_table(recipe):
    """The whole recipe through the CLI on the module's workdir (its DAPT stages are reused by fingerprint),
    without `das`: its tasks are scored as `ncl`'s are (the stages above are DAS's own test)."""
    cfg = recipe.cfg
    overrides = {
        "workdir": cfg.workdir,
        "synthetic.directory": cfg.synthetic.directory,
        "finetune.train.epochs": 1,
        "dapt.train.steps": 60,
        "methods": '["ncl","one","base"]',
    }
    out = subprocess.run(
        [sys.executable, "-m", "dontstop_jax", "continual", "--config", "configs/continual.py:tiny"]
        + [f"--config.{k}={v}" for k, v in overrides.items()],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((Path(cfg.workdir) / "continual.json").read_text())
    tasks, stages = result["tasks"], result["stages"]
    assert stages == ["bio", "cs", "news"] and len(tasks) == 3
    for method, per_task in result["scores"].items():
        for task, curve in per_task.items():
            first = stages.index(task.split("_")[0])  # a task is scored from the stage of its domain on
            assert all((s is None) == (i < first) for i, s in enumerate(curve)), (method, task, curve)
        assert result["forgetting"][method] == pytest.approx(forgetting(per_task))
        assert result["bwt"][method] == pytest.approx(backward_transfer(per_task))
        assert result["average"][method][-1] == pytest.approx(np.mean([c[-1] for c in per_task.values()]))
    scores = result["scores"]
    assert all(
        len(set(c[i] for i in range(stages.index(t.split("_")[0]), 3))) == 1 for t, c in scores["base"].items()
    )  # the base model does not change between stages
    assert scores["one"]["bio_topic"][0] == scores["ncl"]["bio_topic"][0]  # the same first-stage model
    assert result["forgetting"]["one"] == 0.0  # each domain keeps its own model
    # Forward transfer: a task's domain's stage starts from the base for `one` and `base` (the same fine-tunes).
    assert result["fwt"]["one"] == result["fwt"]["base"] == 0.0
    assert set(result["before"]["ncl"]) == set(tasks) and result["before"]["ncl"]["bio_topic"] is None
    assert "| ncl | 3: news |" in out.stdout and "Over seeds" in out.stdout
