"""The result table's cells, Markdown, CSV/JSON files and the two-std significance criterion."""

from __future__ import annotations

import csv
import json

import pytest

from dontstop_jax.analysis import results_table, significance
from dontstop_jax.errors import UserError

METRICS = {"chemprot": "micro_f1", "citation_intent": "macro_f1"}


def rec(task: str, variant: str, seed: int, value: float) -> dict:
    return {"task": task, "variant": variant, "seed": seed, "metrics": {METRICS[task]: value, "accuracy": 0.5}}


RECORDS = [
    *(rec("chemprot", "dapt+tapt", s, v) for s, v in [(2, 0.86), (0, 0.84), (1, 0.85)]),
    *(rec("chemprot", "baseline", s, v) for s, v in enumerate([0.80, 0.82, 0.81])),
    *(rec("chemprot", "tapt", s, v) for s, v in enumerate([0.82, 0.80, 0.84])),
    *(rec("citation_intent", "baseline", s, v) for s, v in enumerate([0.60, 0.70])),
    rec("citation_intent", "dapt+tapt", 0, 0.72),
]


def test_cells_and_default_order():
    table = results_table(RECORDS, METRICS)
    assert table.variants == ("baseline", "dapt+tapt", "tapt") and table.tasks == ("chemprot", "citation_intent")
    cell = table.cells[("dapt+tapt", "chemprot")]
    assert cell.seeds == (0, 1, 2) and cell.values == (0.84, 0.85, 0.86)
    assert cell.mean == pytest.approx(0.85) and cell.std == pytest.approx(0.01) and cell.n == 3
    assert table.cells[("dapt+tapt", "citation_intent")].std is None
    assert ("tapt", "citation_intent") not in table.cells
    assert table.delta("dapt+tapt", "chemprot") == pytest.approx(0.04)
    assert table.beats_baseline("dapt+tapt", "chemprot") is True
    assert table.beats_baseline("tapt", "chemprot") is False
    assert table.beats_baseline("dapt+tapt", "citation_intent") is None  # one seed: cannot judge


def test_markdown():
    lines = results_table(RECORDS, METRICS).to_markdown().splitlines()
    assert lines[:5] == [
        "| variant | chemprot (micro_f1) | citation_intent (macro_f1) |",
        "|:--|--:|--:|",
        "| baseline | 81.0 ± 1.0, n=3 | 65.0 ± 7.1, n=2 |",
        "| dapt+tapt | 85.0 ± 1.0 (+4.0†), n=3 | 72.0 ± n/a (+7.0), n=1 |",
        "| tapt | 82.0 ± 2.0 (+1.0), n=3 | – |",
    ]
    assert "2 × the larger std" in lines[-1]


def test_explicit_order_and_no_baseline():
    table = results_table(RECORDS, METRICS, variant_order=["tapt", "dapt+tapt", "baseline", "dapt"])
    assert table.variants == ("tapt", "dapt+tapt", "baseline", "dapt")
    assert "| dapt | – | – |" in table.to_markdown()
    with pytest.raises(UserError, match="not in variant_order"):
        results_table(RECORDS, METRICS, variant_order=["baseline"])
    plain = results_table([r for r in RECORDS if r["variant"] != "baseline"], METRICS)
    assert plain.baseline is None and "(+" not in plain.to_markdown() and "†" not in plain.to_markdown()


def test_write_all_csv_json(tmp_path):
    table = results_table(RECORDS, METRICS)
    table.write_all(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.csv", "results.json", "results.md"]
    assert (tmp_path / "out" / "results.md").read_text() == table.to_markdown()
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["task"]) for r in rows] == [
        ("baseline", "chemprot"),
        ("baseline", "citation_intent"),
        ("dapt+tapt", "chemprot"),
        ("dapt+tapt", "citation_intent"),
        ("tapt", "chemprot"),
    ]
    assert rows[2]["seeds"] == "0;1;2" and [float(v) for v in rows[2]["values"].split(";")] == [0.84, 0.85, 0.86]
    assert float(rows[2]["mean"]) == pytest.approx(0.85) and rows[2]["n"] == "3" and rows[2]["beats_baseline"] == "True"
    assert rows[3]["std"] == "" and rows[3]["beats_baseline"] == ""
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["baseline"] == "baseline" and data["tasks"] == ["chemprot", "citation_intent"]
    assert data["cells"][3] == {
        "variant": "dapt+tapt",
        "task": "citation_intent",
        "metric": "macro_f1",
        "n": 1,
        "mean": 0.72,
        "std": None,
        "delta_vs_baseline": pytest.approx(0.07),
        "beats_baseline": None,
        "seeds": [0],
        "values": [0.72],
    }
    table.to_csv(tmp_path / "one.csv")
    table.to_json(tmp_path / "one.json")
    assert (tmp_path / "one.csv").read_text() == (tmp_path / "out" / "results.csv").read_text()
    assert json.loads((tmp_path / "one.json").read_text()) == json.loads(
        (tmp_path / "out" / "results.json").read_text()
    )
    table.write_all(tmp_path / "off", enabled=False)
    assert not (tmp_path / "off").exists()


REFERENCES = [
    {"task": "chemprot", "reference": "majority class", "dev": {"micro_f1": 0.35}, "test": {"micro_f1": 0.362}},
    {"task": "chemprot", "reference": "bag-of-words LR", "dev": {"micro_f1": 0.5}, "test": {"micro_f1": 0.55}},
    {"task": "citation_intent", "reference": "majority class", "dev": {"macro_f1": 0.1}, "test": {"macro_f1": 0.1}},
]


def test_reference_rows_below_the_variants_without_std_delta_or_dagger(tmp_path):
    table = results_table(RECORDS, METRICS, references=REFERENCES)
    markdown = table.to_markdown()
    lines = markdown.splitlines()
    assert lines[5:7] == ["| majority class (reference) | 36.2 | 10.0 |", "| bag-of-words LR (reference) | 55.0 | – |"]
    assert "(reference) = no contextual model" in lines[-1] and "most frequent train label" in lines[-1]
    assert "‡" not in markdown  # no seed was flagged
    table.write_all(tmp_path)
    with open(tmp_path / "results.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["reference"]]
    assert [(r["variant"], r["task"], float(r["mean"])) for r in rows] == [
        ("majority class", "chemprot", 0.362),
        ("majority class", "citation_intent", 0.1),
        ("bag-of-words LR", "chemprot", 0.55),
    ]
    assert all(
        r["reference"] == "True" and r["n"] == r["std"] == r["delta_vs_baseline"] == r["beats_baseline"] == ""
        for r in rows
    )
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["references"][0] == {
        "reference": "majority class",
        "task": "chemprot",
        "metric": "micro_f1",
        "score": 0.362,
    }
    assert len(data["references"]) == 3 and "majority class" not in data["variants"]
    assert "(reference)" not in results_table(RECORDS, METRICS).to_markdown()


def test_seeds_whose_dev_never_left_the_majority_class_are_marked(tmp_path):
    flagged = [{**r, "dev_at_majority": r["variant"] == "baseline" and r["seed"] < 2} for r in RECORDS]
    flagged.append({**rec("chemprot", "tapt", 3, 0.1), "discarded": True, "dev_at_majority": True})  # not counted
    table = results_table(flagged, METRICS, references=REFERENCES)
    lines = table.to_markdown().splitlines()
    assert lines[2:5] == [
        "| baseline | 81.0 ± 1.0, n=3 (2‡) | 65.0 ± 7.1, n=2 (2‡) |",
        "| dapt+tapt | 85.0 ± 1.0 (+4.0†), n=3 | 72.0 ± n/a (+7.0), n=1 |",
        "| tapt | 82.0 ± 2.0 (+1.0), n=3 (+1 discarded) | – |",
    ]
    assert "(k‡) = k seeds whose best dev score was no higher than the majority class's" in lines[-1]
    table.write_all(tmp_path)
    with open(tmp_path / "results.csv", newline="") as f:
        rows = {(r["variant"], r["task"]): r for r in csv.DictReader(f)}
    assert rows["baseline", "chemprot"]["dev_at_majority"] == "2" and rows["tapt", "chemprot"]["dev_at_majority"] == ""
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert [c.get("dev_at_majority") for c in cells] == [2, 2, None, None, None]


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"task": "chemprot", "test": {"micro_f1": 0.3}}, "lacks"),
        ({**REFERENCES[0], "reference": "always 1"}, "not one of"),
        ({**REFERENCES[0], "task": "rct"}, "metric_by_task lacks"),
        ({**REFERENCES[0], "test": {"accuracy": 0.3}}, "has no 'micro_f1'"),
        ({**REFERENCES[0], "test": {"micro_f1": 36.2}}, "not percentages"),
        (REFERENCES[0], "two reference records"),
    ],
)
def test_bad_references(bad, match):
    with pytest.raises(UserError, match=match):
        results_table(RECORDS, METRICS, references=[*REFERENCES, bad])


def test_significance_definition():
    result = significance(RECORDS, "chemprot", "dapt+tapt", "baseline", metric="micro_f1")
    assert result.diff == pytest.approx(0.04) and result.threshold == pytest.approx(0.02) and result.significant
    close = significance(RECORDS, "chemprot", "tapt", "baseline", metric="micro_f1")
    assert close.diff == pytest.approx(0.01) and close.threshold == pytest.approx(0.04) and not close.significant
    assert not significance(RECORDS, "chemprot", "baseline", "dapt+tapt", metric="micro_f1").significant
    with pytest.raises(UserError, match=">= 2 seeds"):
        significance(RECORDS, "citation_intent", "dapt+tapt", "baseline", metric="macro_f1")
    with pytest.raises(UserError, match="no results for variant 'dapt'"):
        significance(RECORDS, "chemprot", "dapt", "baseline", metric="micro_f1")


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"task": "chemprot", "variant": "x", "seed": 0}, "lacks"),
        ({**rec("chemprot", "x", 0, 0.5), "task": "rct"}, "metric_by_task lacks"),
        ({**rec("chemprot", "x", 0, 0.5), "metrics": {"accuracy": 0.5}}, "has no 'micro_f1'"),
        (rec("chemprot", "x", 0, 85.0), "not percentages"),
        ({**rec("chemprot", "x", 0, 0.5), "seed": "0"}, "integers"),
        (rec("chemprot", "baseline", 1, 0.5), "seed 1 twice"),
    ],
)
def test_bad_records(bad, match):
    with pytest.raises(UserError, match=match):
        results_table([*RECORDS, bad], METRICS)
