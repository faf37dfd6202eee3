"""The commands of docs/get-started/first-run.md, run through the CLI with the shipped paper configs on a tiny
RoBERTa that `transformers` wrote: HF directory -> DAPT (.jsonl.gz corpus) -> TAPT (the task's text) ->
fine-tuning (micro-F1, dev-selected checkpoint) -> export -> transformers gives our logits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from export_check import assert_transformers_logits_match
from tiny_hf import save_tiny_roberta, write_biomed_data

pytestmark = [pytest.mark.slow, pytest.mark.fast_compile_commands]  # tiny runs: compile-bound (conftest.py)
ROOT = Path(__file__).parents[1]
SMALL = ["--config.train.batch_size=16", "--config.data.max_seq_length=64"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "dontstop_jax", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def flow(tmp_path_factory, tiny_tokenizer_dir):
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("readme")
    save_tiny_roberta(root / "roberta-tiny", tiny_tokenizer_dir)
    write_biomed_data(root / "s2orc", root / "chemprot", corpus_docs=600)
    cfg = str(ROOT / "configs")
    _cli(
        "pretrain",
        "--config",
        f"{cfg}/dapt.py:biomed",
        "--config.init=roberta-tiny",
        "--config.data.sources=['s2orc/*.jsonl.gz']",
        "--config.workdir=runs/dapt-biomed",
        "--config.train.steps=30",
        "--config.train.accum_steps=2",
        "--config.optim.learning_rate=3e-3",
        *SMALL,
        cwd=root,
    )
    _cli(
        "pretrain",
        "--config",
        f"{cfg}/tapt.py:chemprot",
        "--config.init=runs/dapt-biomed",
        "--config.data.sources=['chemprot/train.jsonl']",
        "--config.workdir=runs/dapt-tapt-chemprot",
        "--config.train.epochs=3",
        *SMALL,
        cwd=root,
    )
    _cli(
        "finetune",
        "--config",
        f"{cfg}/finetune.py:chemprot",
        "--config.init=runs/dapt-tapt-chemprot",
        "--config.task.path=chemprot",
        "--config.seed=1",
        "--config.workdir=runs/finetune-chemprot",
        "--config.train.epochs=3",
        *SMALL,
        cwd=root,
    )
    _cli("export", "--from", "runs/finetune-chemprot", "--to", "exported/chemprot", cwd=root)
    return root


def _done(root: Path, phase: str) -> dict:
    return json.loads((root / "runs" / phase / "DONE.json").read_text())


def test_each_phase_starts_from_the_previous_one(flow):
    assert _done(flow, "dapt-biomed")["parent"] == f"hf:{flow / 'roberta-tiny'}"
    assert _done(flow, "dapt-tapt-chemprot")["parent"].startswith(f"checkpoint:{flow / 'runs' / 'dapt-biomed'}")
    finetuned = _done(flow, "finetune-chemprot")
    assert finetuned["parent"].startswith(f"checkpoint:{flow / 'runs' / 'dapt-tapt-chemprot'}")
    assert finetuned["metric"] == "micro_f1" and set(finetuned["test"]) >= {"micro_f1", "macro_f1"}
    assert finetuned["label_names"] == ["ACTIVATOR", "INHIBITOR"]


def test_dapt_lowers_the_masked_lm_loss_of_the_imported_model(flow):
    losses = [
        json.loads(line)["loss"]
        for line in (flow / "runs" / "dapt-biomed" / "metrics.jsonl").read_text().splitlines()
        if "loss" in line
    ]
    assert losses[-1] < losses[0] - 0.1


def test_export_reloads_in_transformers_with_our_logits(flow):
    meta = assert_transformers_logits_match(flow / "runs" / "finetune-chemprot", flow / "exported" / "chemprot")
    assert meta["phase"] == "finetune-chemprot"
