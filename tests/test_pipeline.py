"""End to end through the CLI on the tiny synthetic scale: grid -> table -> export -> transformers reload,
and the analysis of the grid's run directory."""

import csv
import json
from pathlib import Path

import pytest
from export_check import assert_transformers_logits_match
from tiny_pretrain import cli as _cli

from dontstop_jax.analysis import results_table

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]


def test_the_demo_writes_nothing_outside_its_workdir(tiny_grid):
    root, _ = tiny_grid
    assert list((root / "cwd").iterdir()) == []  # the benchmark and the prepared data used to land in ./runs
    assert (root / "grid" / "benchmark").is_dir() and list((root / "grid" / "cache").glob("*/manifest.json"))


def test_demo_prints_and_writes_the_table(tiny_grid):
    root, stdout = tiny_grid
    assert "| baseline |" in stdout and "| dapt_tapt |" in stdout
    for name in ("results.md", "results.csv", "results.json", "records.json"):
        assert (root / "grid" / name).exists()
    saved = json.loads((root / "grid" / "records.json").read_text())
    records = saved["records"]
    assert {r["variant"] for r in records} == {"baseline", "dapt", "tapt", "dapt_tapt", "not_dapt"}
    assert {r["seed"] for r in records} == {0, 1}
    # The task's reference scores are kept with the records, which rebuild the table; each record's
    # majority-class flag is the one its fine-tune's summary carries.
    assert [(r["task"], r["reference"]) for r in saved["references"]] == [
        ("bio_topic", "majority class"),
        ("bio_topic", "bag-of-words LR"),
        ("bio_topic", "static word vectors LR"),
    ]
    rebuilt = results_table(records, {"bio_topic": "macro_f1"}, references=saved["references"])
    assert rebuilt.to_markdown() == (root / "grid" / "results.md").read_text()
    assert "| majority class (reference) |" in stdout and "| bag-of-words LR (reference) |" in stdout
    for r in records:
        (done,) = (root / "grid" / "finetune").glob(f"bio_topic-{r['variant']}-s{r['seed']}-*/DONE.json")
        assert r["dev_at_majority"] is json.loads(done.read_text())["dev_at_majority"]
    # Each phase ran once: a domain's DAPT is shared by dapt, dapt_tapt and (the other domain's) not_dapt.
    phases = sorted(p.name.rsplit("-", 1)[0] for p in (root / "grid" / "pretrain").iterdir())
    assert phases == ["base", "dapt-bio", "dapt-cs", "tapt-bio_topic", "tapt-bio_topic"]


def test_exported_classifier_reloads_in_transformers_with_the_same_logits(tiny_grid):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    root, _ = tiny_grid
    phase = next((root / "grid" / "finetune").glob("bio_topic-dapt_tapt-s0-*"))
    _cli("export", "--from", str(phase), "--to", str(root / "exported"))
    assert_transformers_logits_match(phase, root / "exported")


def test_analyze_after_the_demo_shows_why_the_domains_need_adaptation(tiny_grid):
    root, _ = tiny_grid
    out = root / "analysis"
    _cli(
        "analyze",
        "--config",
        "configs/analyze.py:synthetic-tiny",
        f"--config.grid_dir={root / 'grid'}",
        f"--config.synthetic.directory={root / 'grid' / 'benchmark'}",
        f"--config.out_dir={out}",
        f"--config.mlm.cache_dir={root / 'cache'}",
    )
    with (out / "vocab_overlap.csv").open() as f:
        overlap = {row["corpus"]: {k: float(v) for k, v in row.items() if k != "corpus"} for row in csv.DictReader(f)}
    with (out / "mlm_loss.csv").open() as f:
        loss = {(row["checkpoint"], row["corpus"]): float(row["mlm_loss"]) for row in csv.DictReader(f)}
    assert {c for c, _ in loss} == {"base", "dapt-bio", "dapt-cs", "tapt-bio_topic", "dapt-bio+tapt-bio_topic"}
    for domain in ("bio", "cs"):
        # Each domain's words are its own: it shares less with general text than with another sample of itself.
        assert max(overlap[domain]["general"], overlap["general"][domain]) < overlap[domain][domain], overlap
        # DAPT lowers the domain's held-out MLM loss, and by more than it changes the general text's.
        gain = {c: loss["base", c] - loss[f"dapt-{domain}", c] for c in ("general", domain)}
        assert gain[domain] > 0 and gain[domain] > gain["general"], gain
    for name in ("vocab_overlap.png", "mlm_loss.png", "training_curves.png", "results.png", "summary.md"):
        assert (out / name).stat().st_size > 0
