"""Learning curves: a grid's scores against the number of labeled train examples (its `train_sizes`).

Records and reference records carry `train_size` (absent means "all": every record written before the axis
existed is a full-train one). In a few-shot grid (phases/grid.py `shots`) the size is the number of examples per
class and records also carry `shots`. A fine-tune on a subsampled train set trains on the stratified draw of its
seed, so a variant's spread over seeds includes the draw's; a reference on a subsampled set is fitted once per
draw (its record's `draw`). Reference records also carry `train_examples`, the curve's x for their size
(the whole train split's size for "all").

`by_size` gives one results table per size (analysis/table.py); `learning_curves` the points of every
variant and reference, as learning_curve.json (read by analysis/plots.learning_curves) and a Markdown table.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dontstop_jax import files
from dontstop_jax.analysis.table import Record, ResultsTable, results_table
from dontstop_jax.errors import UserError
from dontstop_jax.files import write_text

ALL = "all"
Size = int | str


def size_of(record: Record) -> Size:
    return record.get("train_size", ALL)


def size_order(size: Size) -> tuple[int, int]:
    """Numbered sizes ascending, then "all"."""
    return (1, 0) if size == ALL else (0, int(size))


def by_size(
    records: Sequence[Record],
    references: Sequence[Record],
    metric_by_task: Mapping[str, str],
    variant_order: Sequence[str],
    sizes: Sequence[Size] = (),
) -> dict[Size, ResultsTable]:
    """{train size: the results table of its records and references}, smallest size first; every size of
    `sizes` has one (default: the sizes the records name)."""
    sizes = sorted({*sizes, *(size_of(r) for r in [*records, *references])}, key=size_order)
    return {
        size: results_table(
            [r for r in records if size_of(r) == size],
            metric_by_task,
            variant_order,
            references=[r for r in references if size_of(r) == size],
        )
        for size in sizes
    }


def _point(size: Size, examples: int, values: Sequence[float]) -> dict[str, Any]:
    return {
        "train_size": size,
        "examples": examples,
        "n": len(values),
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
        "values": list(values),
    }


def learning_curves(
    records: Sequence[Record],
    references: Sequence[Record],
    metric_by_task: Mapping[str, str],
    variant_order: Sequence[str],
) -> dict[str, Any]:
    """Every variant's and reference's test score per train size and task: {"sizes", "metric_by_task", "lines":
    [{"task", "name", "reference": bool, "points": [{"train_size", "examples", "n", "mean", "std", "values"}]}]}
    (mean and sample std over seeds, or over draws for a reference)."""
    tables = by_size(records, references, metric_by_task, variant_order)  # checks every record
    examples: dict[tuple[str, Size], int] = {}
    for i, ref in enumerate(references):
        if "train_examples" not in ref:
            raise UserError(f"reference record {i} has no train_examples; rerun the grid to rescore its references")
        examples[(ref["task"], size_of(ref))] = int(ref["train_examples"])
    for task, size in {(r["task"], size_of(r)) for r in records} - set(examples):
        raise UserError(
            f"{task} has results on {size} train examples but no reference records for that size; "
            "rerun the grid to score them"
        )
    lines = []
    for task, metric in metric_by_task.items():
        for variant in variant_order:
            points = [
                _point(size, examples[(task, size)], table.cells[(variant, task)].values)
                for size, table in tables.items()
                if (variant, task) in table.cells
            ]
            lines += [{"task": task, "name": variant, "reference": False, "points": points}] if points else []
        for name in dict.fromkeys(r["reference"] for r in references if r["task"] == task):
            points = [
                _point(
                    size,
                    examples[(task, size)],
                    [
                        float(r["test"][metric])
                        for r in references
                        if r["task"] == task and r["reference"] == name and size_of(r) == size
                    ],
                )
                for size in tables
                if (task, size) in examples
            ]
            lines.append({"task": task, "name": name, "reference": True, "points": points})
    return {"sizes": list(tables), "metric_by_task": dict(metric_by_task), "lines": lines}


def _cell(point: dict[str, Any] | None) -> str:
    if point is None:
        return "–"
    return f"{100 * point['mean']:.1f} ± " + ("n/a" if point["std"] is None else f"{100 * point['std']:.1f}")


def to_markdown(curves: Mapping[str, Any]) -> str:
    """One table per task: rows = variants then references, columns = train sizes (with their example counts)."""
    out = []
    for task, metric in curves["metric_by_task"].items():
        lines = [line for line in curves["lines"] if line["task"] == task]
        examples = {p["train_size"]: p["examples"] for line in lines for p in line["points"]}
        header = [
            f"{task} ({metric})",
            *(f"{s} ({examples[s]})" if examples[s] != s else str(s) for s in curves["sizes"] if s in examples),
        ]
        rows = ["| " + " | ".join(header) + " |", "|:--" + "|--:" * (len(header) - 1) + "|"]
        for line in lines:
            points = {p["train_size"]: p for p in line["points"]}
            name = line["name"] + (" (reference)" if line["reference"] else "")
            rows.append(
                "| " + " | ".join([name, *(_cell(points.get(s)) for s in curves["sizes"] if s in examples)]) + " |"
            )
        out += rows + [""]
    legend = (
        "Test scores in % by number of labeled train examples: mean ± sample std over seeds, each seed "
        "fine-tuned on its own stratified draw; references: over the same draws. In a few-shot grid the columns are "
        "examples per class (the examples in all in brackets) and each draw has its dev set of that size."
    )
    return "\n".join(out) + "\n" + legend + "\n"


def write_learning_curves(out_dir: str | files.Path, curves: Mapping[str, Any]) -> None:
    """learning_curve.json and learning_curve.md in `out_dir` (the plot: `dontstop analyze`)."""
    out = files.path(out_dir)
    write_text(out / "learning_curve.json", json.dumps(curves, indent=2) + "\n")
    write_text(out / "learning_curve.md", to_markdown(curves))
