"""Hardening of checkpoints and reports (issue #14), on tiny phases run in this process:

- a finished phase whose newest step is damaged still exports and starts the next phase, from the older step,
  with a warning; an explicitly requested damaged step is a one-line error naming the readable ones;
- fine-tuning's best epoch is the first of tied dev scores, for the summary, the kept checkpoint and test;
- skipped (non-finite) steps are counted across resumes in the summary, with a warning above 1%;
- a resumed run drops what a killed run logged past the restored step (metrics.jsonl and TensorBoard).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_logging import read_events
from tiny_pretrain import REPO, write_corpus

from dontstop_jax.engine.checkpoint import Checkpointer
from dontstop_jax.errors import Interrupted, UserError
from dontstop_jax.phases import finetune as finetune_module
from dontstop_jax.phases.defaults import pretrain_config
from dontstop_jax.phases.export import export
from dontstop_jax.phases.pretrain import mlm, pretrain
from dontstop_jax.phases.synthetic import get_config, tiny_model
from dontstop_jax.synthetic import generate_benchmark
from dontstop_jax.train import MetricsWriter
from dontstop_jax.train.loop import StopSignal
from dontstop_jax.train.source import resolve


def _pretrain_config(root: Path, workdir: Path, tokenizer: str, steps: int, **train) -> object:
    """A 2-layer, 32-wide MLM phase from scratch on a 400-line corpus, batch 8 of 32 tokens."""
    cfg = pretrain_config("dapt")
    cfg.name, cfg.workdir, cfg.init, cfg.tokenizer = workdir.name, str(workdir), "scratch", tokenizer
    cfg.data.update(sources=[str(write_corpus(root))], max_seq_length=32, cache_dir=str(root / "cache"))
    cfg.train.update(batch_size=8, accum_steps=1, steps=steps, log_every=1, **train)
    cfg.checkpoint.update(every=2, keep_last=2)
    cfg.model.update(
        vocab_size=512,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=34,
    )
    cfg.optim.learning_rate = 1e-3
    return cfg


def _damage_params(workdir: Path, step: int) -> None:
    """What a full disk or a lost file leaves: the step's parameter files truncated to nothing."""
    for path in (workdir / "checkpoints" / str(step) / "params").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")


@pytest.fixture(scope="module")
def damaged_phase(tmp_path_factory, tiny_tokenizer_dir):
    """A finished 4-step phase (checkpoints at steps 2 and 4) whose final step's parameters are damaged."""
    root = tmp_path_factory.mktemp("damaged")
    workdir = root / "phase"
    pretrain(_pretrain_config(root, workdir, tiny_tokenizer_dir, 4))
    assert Checkpointer(workdir / "checkpoints", read_only=True).all_steps() == [2, 4]
    _damage_params(workdir, 4)
    return root, workdir


def _fallback_warning(caplog) -> str:
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "dontstop_jax.engine.checkpoint"]
    return warning


def test_export_and_init_fall_back_past_a_damaged_final_step(damaged_phase, tmp_path, caplog):
    _, workdir = damaged_phase
    export(str(workdir), str(tmp_path / "exported"))
    assert "step 4" in _fallback_warning(caplog) and "restoring step 2 instead" in _fallback_warning(caplog)
    exported = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert exported["num_hidden_layers"] == 2
    caplog.clear()

    source = resolve(str(workdir))  # what a phase with init=<workdir> starts from
    assert source.parent.endswith("@2") and "restoring step 2 instead" in _fallback_warning(caplog)
    older = Checkpointer(workdir / "checkpoints", read_only=True).restore_params(2)
    jax.tree_util.tree_map(np.testing.assert_array_equal, source.params, older)


def test_an_explicitly_requested_damaged_step_is_one_line_naming_the_readable_ones(damaged_phase, tmp_path):
    _, workdir = damaged_phase
    with pytest.raises(UserError, match=r"checkpoint step 4 in .* is unreadable \(.*\); readable steps: 2$"):
        export(str(workdir), str(tmp_path / "exported"), step=4)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dontstop_jax",
            "export",
            "--from",
            str(workdir),
            "--to",
            str(tmp_path / "cli"),
            "--step",
            "4",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr[-2000:]
    assert out.stderr.startswith("error: checkpoint step 4 in ") and out.stderr.endswith("readable steps: 2\n")


# -- fine-tuning: one rule for the best epoch --------------------------------------------------------------------


def _fingerprint(params) -> float:
    return float(sum(np.asarray(x, np.float64).sum() for x in jax.tree_util.tree_leaves(jax.device_get(params))))


def _finetune_config(root: Path, epochs: int):
    """A from-scratch fine-tune of the tiny synthetic bio task, `epochs` epochs without early stopping."""
    bench = generate_benchmark(root / "bench", seed=0, scale="tiny", domains=("bio",))
    cfg = get_config("tiny").finetune.copy_and_resolve_references()
    cfg.init, cfg.tokenizer, cfg.workdir, cfg.name = "scratch", str(bench.tokenizer), str(root / "ft"), "ft"
    cfg.model.update({k: v for k, v in tiny_model().items() if k in cfg.model})
    cfg.task.path = str(bench.tasks["bio_topic"].train.parent)
    cfg.train.update(epochs=epochs, patience=10)
    return cfg


def test_tied_dev_scores_pick_the_first_best_epoch_everywhere(tmp_path, monkeypatch):
    cfg = _finetune_config(tmp_path, epochs=4)
    dev = iter([0.5, 0.5, 0.4, 0.5])  # epochs 1, 2 and 4 tie

    def evaluate(predict, params, batches, mesh, num_labels):  # dev scores as above; test: which model it was
        score = next(dev, None)
        return {"macro_f1": _fingerprint(params) if score is None else score}

    monkeypatch.setattr(finetune_module, "evaluate", evaluate)
    summary = finetune_module.finetune(cfg)

    ckpt = Checkpointer(tmp_path / "ft" / "checkpoints", read_only=True, best_metric="dev_macro_f1")
    latest = ckpt.latest_step()
    assert latest is not None
    per_epoch = latest // 4
    assert (summary["best_epoch"], summary["dev"]["macro_f1"], summary["best_step"]) == (1, 0.5, per_epoch)
    assert ckpt.all_steps() == [per_epoch, 4 * per_epoch] and ckpt.best_step() == per_epoch
    assert summary["test"]["macro_f1"] == _fingerprint(ckpt.restore_params(per_epoch))
    assert summary["test"]["macro_f1"] != _fingerprint(ckpt.restore_params(4 * per_epoch))
    assert resolve(str(tmp_path / "ft")).parent.endswith(f"@{per_epoch}")  # init / export read the same step
    assert summary["dev_at_majority"] is False and summary["majority_dev"]["macro_f1"] < 0.5


def test_a_fine_tune_whose_dev_score_never_beats_the_majority_class_is_flagged_by_name(tmp_path, monkeypatch, caplog):
    cfg = _finetune_config(tmp_path, epochs=1)
    # Every dev score 5% macro-F1: below always predicting the tiny bio task's majority class (9.6% on dev).
    monkeypatch.setattr(finetune_module, "evaluate", lambda *_: {"macro_f1": 0.05})
    summary = finetune_module.finetune(cfg)
    assert summary["dev_at_majority"] is True and summary["majority_dev"]["macro_f1"] > 0.05
    again = finetune_module.finetune(cfg)  # the finished phase's summary warns again
    warnings = [r.getMessage() for r in caplog.records if r.name == "dontstop_jax.phases.finetune"]
    assert again == summary and len(warnings) == 2 and warnings[0] == warnings[1]
    assert warnings[0].startswith(f"fine-tune ft ({cfg.workdir}) may have learned nothing: its best dev macro_f1, 5.0%")


# -- skipped steps and metrics after a resume --------------------------------------------------------------------


def mostly_nonfinite(model, params):
    """MLM whose loss is NaN at about 90% of the steps (drawn from the step's RNG, so a resumed run agrees)."""
    loss_sums, hooks = mlm(model, params)

    def loss(params, batch, rng, deterministic):
        total, aux = loss_sums(params, batch, rng, deterministic)
        return jnp.where(jax.random.uniform(rng) < 0.9, jnp.nan, total), aux

    return loss, hooks


def _train_lines(workdir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m.get("phase") == "train/"]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, tiny_tokenizer_dir):
    """A 20-step phase that skips most steps, stopped after step 9 (its checkpoint), then left as a run killed
    after logging steps 10-12 would leave it (torn last line included), then resumed to the end."""
    root = tmp_path_factory.mktemp("skipping")
    workdir = root / "resumed"
    cfg = _pretrain_config(root, workdir, tiny_tokenizer_dir, 20, skip_nonfinite=True)
    polls = itertools.count(1)
    with pytest.MonkeyPatch.context() as patch, pytest.raises(Interrupted, match="at step 9 "):
        patch.setattr(StopSignal, "poll", lambda self, *_: next(polls) == 9)
        pretrain(cfg, mostly_nonfinite)
    with MetricsWriter(workdir) as killed:
        for step in (10, 11, 12):
            killed.write(step, {"loss": 1.0, "skipped": 99.0}, prefix="train/")
    with (workdir / "metrics.jsonl").open("a") as jsonl:
        jsonl.write('{"step": 13, "pha')
    return root, tiny_tokenizer_dir, workdir, pretrain(cfg, mostly_nonfinite)


def test_skipped_steps_are_counted_across_a_resume_and_reported(resumed_run, caplog):
    root, tokenizer, workdir, resumed = resumed_run
    reference = pretrain(
        _pretrain_config(root, root / "reference", tokenizer, 20, skip_nonfinite=True), mostly_nonfinite
    )
    assert reference["skipped_steps"] > 0.01 * 20
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "dontstop_jax.train.trainer"]
    assert f"skipped {reference['skipped_steps']} of its 20 steps" in warning
    assert resumed["skipped_steps"] == reference["skipped_steps"]
    assert [m["skipped"] for m in _train_lines(workdir)] == [m["skipped"] for m in _train_lines(root / "reference")]


def test_a_resumed_run_logs_each_step_once(resumed_run):
    *_, workdir, _ = resumed_run
    assert [m["step"] for m in _train_lines(workdir)] == list(range(1, 21))
    events = [
        e for f in sorted((workdir / "tensorboard").iterdir()) for e in read_events(f) if "train//loss" in e["scalars"]
    ]
    assert [e["step"] for e in events] == list(range(1, 21))
