"""The experiment grid's result table: variants x tasks, mean ± std over seeds, and the acceptance test.

Inputs are records `{"task", "variant", "seed", "metrics": {...}}` holding test-set scores (fractions in
[0, 1]) of the dev-selected checkpoint. The Markdown shows percentages with one decimal, as in the paper;
CSV and JSON keep the raw fractions. Std is the sample std over seeds (ddof=1); with one seed it is
undefined: "n/a" in Markdown, empty in CSV, null in JSON, never a misleading 0.0.

A record may also carry `extras` (numbers such as trainable_params, seconds_per_epoch: their mean over
seeds is shown beside the score), `discarded: true` (a seed stopped early by Dodge et al.'s early
discarding: counted, but not part of the mean) and `dev_at_majority: true` (its best dev score was no higher
than the majority class's: it may have learned nothing; the cell counts such seeds and shows ‡).

Reference rows (analysis/reference.py: majority class, bag-of-words LR, static word vectors LR) come from
reference records `{"task", "reference", "test": {...}}`: one deterministic test score per task, no std, no
delta, never †. On a learning curve's subsampled train sets a reference is fitted on each draw (records
carrying `draw`): the row shows their mean.
They sit below the variants so a reader sees at once whether a variant learned more than the labels' counts
or the words alone give.

Significance, the project's acceptance criterion ("DAPT+TAPT beats the baseline by more than two standard
deviations of the seeds"), is one-sided: mean_a - mean_b > 2 * max(std_a, std_b), and needs >= 2 seeds
on both sides.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dontstop_jax import files
from dontstop_jax.analysis.reference import DESCRIPTIONS
from dontstop_jax.errors import UserError
from dontstop_jax.files import write_text

Record = Mapping[str, Any]


@dataclass(frozen=True)
class Cell:
    """One variant's scores on one task, one per seed (sorted by seed)."""

    variant: str
    task: str
    metric: str
    seeds: tuple[int, ...]
    values: tuple[float, ...]
    extras: Mapping[str, float] = dataclasses.field(default_factory=dict)  # means over seeds
    discarded: int = 0  # seeds stopped early, left out of `values`
    at_majority: int = 0  # seeds in `values` whose best dev score was no higher than the majority class's

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float | None:
        return float(np.std(self.values, ddof=1)) if self.n > 1 else None


@dataclass(frozen=True)
class Significance:
    """a vs b on one task: `significant` iff diff = mean_a - mean_b > threshold = 2 * max(std_a, std_b)."""

    a: Cell
    b: Cell
    diff: float
    threshold: float
    significant: bool


def _count(n: float) -> str:
    """125M, 0.37M -> 371K, 4.4K: parameter counts as people write them."""
    for unit, scale in (("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _compare(a: Cell, b: Cell) -> Significance:
    if a.std is None or b.std is None:
        raise UserError(
            f"significance of {a.variant!r} vs {b.variant!r} on {a.task!r} needs >= 2 seeds each, "
            f"got {a.n} and {b.n}; run more seeds"
        )
    diff, threshold = a.mean - b.mean, 2 * max(a.std, b.std)
    return Significance(a, b, diff, threshold, diff > threshold)


def _collect(records: Sequence[Record], metric_by_task: Mapping[str, str]) -> dict[tuple[str, str], Cell]:
    """Group records into cells, checking every record names a known task, its metric and a fresh seed."""
    runs: dict[tuple[str, str], dict[int, float]] = {}
    extras: dict[tuple[str, str], dict[str, list[float]]] = {}
    discarded: dict[tuple[str, str], int] = {}
    at_majority: dict[tuple[str, str], int] = {}
    for i, record in enumerate(records):
        missing = {"task", "variant", "seed", "metrics"} - set(record)
        if missing:
            raise UserError(f"result record {i} lacks {sorted(missing)}; records need task, variant, seed, metrics")
        task, variant, seed = record["task"], record["variant"], record["seed"]
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise UserError(f"result record {i} has seed {seed!r}; seeds must be integers")
        seed = int(seed)
        value = _fraction(
            f"result record {i}", f"{variant} on {task}, seed {seed}", task, record["metrics"], metric_by_task
        )
        for key, extra in record.get("extras", {}).items():
            extras.setdefault((variant, task), {}).setdefault(key, []).append(float(extra))
        if record.get("discarded"):
            discarded[(variant, task)] = discarded.get((variant, task), 0) + 1
            continue
        seeds = runs.setdefault((variant, task), {})
        if seed in seeds:
            raise UserError(f"{variant} on {task} has seed {seed} twice; drop the duplicate record")
        seeds[seed] = value
        at_majority[(variant, task)] = at_majority.get((variant, task), 0) + bool(record.get("dev_at_majority"))
    return {
        (variant, task): Cell(
            variant,
            task,
            metric_by_task[task],
            tuple(sorted(seeds)),
            tuple(seeds[s] for s in sorted(seeds)),
            {k: float(np.mean(v)) for k, v in extras.get((variant, task), {}).items()},
            discarded.get((variant, task), 0),
            at_majority[(variant, task)],
        )
        for (variant, task), seeds in runs.items()
    }


def _fraction(
    record: str, label: str, task: str, metrics: Mapping[str, Any], metric_by_task: Mapping[str, str]
) -> float:
    """The task's metric from `metrics`, a fraction; a one-line error naming `record` and `label` otherwise."""
    if task not in metric_by_task:
        raise UserError(f"{record} is for task {task!r}, which metric_by_task lacks; add it")
    metric = metric_by_task[task]
    if metric not in metrics:
        raise UserError(f"{record} ({label}) has no {metric!r}; it has {sorted(metrics)}")
    value = float(metrics[metric])
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{metric} of {label} is {value}, outside [0, 1]; record fractions, not percentages")
    return value


def _reference_scores(references: Sequence[Record], metric_by_task: Mapping[str, str]) -> dict[tuple[str, str], float]:
    """(reference, task) -> test score in the task's metric, checking each names a known reference and task.
    References fitted on several draws of a subsampled train set (records with distinct `draw`s) give their
    mean."""
    draws: dict[tuple[str, str], dict[Any, float]] = {}
    for i, ref in enumerate(references):
        missing = {"task", "reference", "test"} - set(ref)
        if missing:
            raise UserError(f"reference record {i} lacks {sorted(missing)}; records need task, reference, test")
        name, task = ref["reference"], ref["task"]
        if name not in DESCRIPTIONS:
            raise UserError(
                f"reference record {i} is {name!r}, not one of {sorted(DESCRIPTIONS)}; "
                "compute references with analysis/reference.py"
            )
        value = _fraction(f"reference record {i}", f"{name} on {task}", task, ref["test"], metric_by_task)
        if ref.get("draw") in draws.setdefault((name, task), {}):
            raise UserError(f"{name} on {task} has two reference records; drop the duplicate")
        draws[(name, task)][ref.get("draw")] = value
    return {key: float(np.mean(list(values.values()))) for key, values in draws.items()}


@dataclass(frozen=True)
class ResultsTable:
    """Rows = variants, then references; columns = tasks (in metric_by_task order); `cells` and `references`
    hold only combinations with scores."""

    variants: tuple[str, ...]
    tasks: tuple[str, ...]
    metric_by_task: Mapping[str, str]
    cells: Mapping[tuple[str, str], Cell]
    baseline: str | None
    references: Mapping[tuple[str, str], float] = dataclasses.field(default_factory=dict)  # (name, task) -> test

    @property
    def reference_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for name, _ in self.references))

    def _baseline_cell(self, task: str) -> Cell | None:
        return None if self.baseline is None else self.cells.get((self.baseline, task))

    def delta(self, variant: str, task: str) -> float | None:
        """Mean minus the baseline's mean on `task`, when both have runs."""
        cell, base = self.cells.get((variant, task)), self._baseline_cell(task)
        return None if cell is None or base is None else cell.mean - base.mean

    def beats_baseline(self, variant: str, task: str) -> bool | None:
        """The significance criterion vs the baseline; None when it cannot be judged (no runs, < 2 seeds)."""
        cell, base = self.cells.get((variant, task)), self._baseline_cell(task)
        if cell is None or base is None or variant == self.baseline or cell.n < 2 or base.n < 2:
            return None
        return _compare(cell, base).significant

    def _rows(self) -> list[dict[str, Any]]:
        return [
            {
                "variant": cell.variant,
                "task": cell.task,
                "metric": cell.metric,
                "n": cell.n,
                "mean": cell.mean,
                "std": cell.std,
                "delta_vs_baseline": self.delta(cell.variant, cell.task),
                "beats_baseline": self.beats_baseline(cell.variant, cell.task),
                "seeds": list(cell.seeds),
                "values": list(cell.values),
                **({"discarded": cell.discarded} if cell.discarded else {}),
                **({"dev_at_majority": cell.at_majority} if cell.at_majority else {}),
                **cell.extras,
            }
            for variant in self.variants
            for task in self.tasks
            if (cell := self.cells.get((variant, task))) is not None
        ]

    def _reference_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "reference": name,
                "task": task,
                "metric": self.metric_by_task[task],
                "score": self.references[(name, task)],
            }
            for name in self.reference_names
            for task in self.tasks
            if (name, task) in self.references
        ]

    def _markdown_cell(self, variant: str, task: str) -> str:
        cell = self.cells.get((variant, task))
        if cell is None:
            return "–"
        text = f"{100 * cell.mean:.1f} ± " + ("n/a" if cell.std is None else f"{100 * cell.std:.1f}")
        delta = self.delta(variant, task) if variant != self.baseline else None
        if delta is not None:
            text += f" ({100 * delta:+.1f}{'†' if self.beats_baseline(variant, task) else ''})"
        text += f", n={cell.n}" + (f" (+{cell.discarded} discarded)" if cell.discarded else "")
        text += f" ({cell.at_majority}‡)" if cell.at_majority else ""
        if "trainable_params" in cell.extras:
            text += f", {_count(cell.extras['trainable_params'])} params"
        if "seconds_per_epoch" in cell.extras:
            text += f", {cell.extras['seconds_per_epoch']:.3g} s/epoch"
        return text

    def to_markdown(self) -> str:
        header = ["variant", *(f"{task} ({self.metric_by_task[task]})" for task in self.tasks)]
        lines = ["| " + " | ".join(header) + " |", "|:--" + "|--:" * len(self.tasks) + "|"]
        for variant in self.variants:
            lines.append("| " + " | ".join([variant, *(self._markdown_cell(variant, t) for t in self.tasks)]) + " |")
        for name in self.reference_names:
            scores = (self.references.get((name, task)) for task in self.tasks)
            lines.append(
                "| "
                + " | ".join([f"{name} (reference)", *("–" if s is None else f"{100 * s:.1f}" for s in scores)])
                + " |"
            )
        legend = "Test scores in %: mean ± sample std over seeds (n/a for one seed), n = seeds; – = no runs."
        if self.baseline is not None:
            legend += (
                f" (+x) = mean minus {self.baseline}'s; † = ahead by more than 2 × the larger std of the two"
                " (needs n ≥ 2 on both)."
            )
        if any(cell.at_majority for cell in self.cells.values()):
            legend += (
                " (k‡) = k seeds whose best dev score was no higher than the majority class's: they may have"
                " learned nothing."
            )
        if self.reference_names:
            legend += (
                " (reference) = no contextual model, one deterministic score per train set, averaged over the"
                " draws of a subsampled one ("
                + "; ".join(f"{name} = {DESCRIPTIONS[name]}" for name in self.reference_names)
                + ")."
            )
        return "\n".join(lines) + "\n\n" + legend + "\n"

    def _csv_text(self) -> str:
        out = io.StringIO()
        fields = [
            "variant",
            "task",
            "metric",
            "n",
            "mean",
            "std",
            "delta_vs_baseline",
            "beats_baseline",
            "seeds",
            "values",
        ]
        rows = self._rows() + [
            {
                "variant": row["reference"],
                "task": row["task"],
                "metric": row["metric"],
                "mean": row["score"],
                "reference": True,
            }
            for row in self._reference_rows()
        ]
        fields += sorted(set().union(*rows) - set(fields))  # discarded, reference, ...: only when some row has them
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n", restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    key: "" if value is None else ";".join(map(str, value)) if isinstance(value, list) else value
                    for key, value in row.items()
                }
            )
        return out.getvalue()

    def _json_text(self) -> str:
        table = {
            "baseline": self.baseline,
            "metric_by_task": dict(self.metric_by_task),
            "variants": list(self.variants),
            "tasks": list(self.tasks),
            "cells": self._rows(),
            "references": self._reference_rows(),
        }
        return json.dumps(table, indent=2) + "\n"

    def to_csv(self, path: str | os.PathLike[str], *, enabled: bool = True) -> None:
        """One row per variant/task with runs, then one per reference/task (`reference` True, the score in
        `mean`); raw fractions, seeds and values joined by ';'."""
        if enabled:
            write_text(path, self._csv_text())

    def to_json(self, path: str | os.PathLike[str], *, enabled: bool = True) -> None:
        if enabled:
            write_text(path, self._json_text())

    def write_all(self, out_dir: str | os.PathLike[str], *, enabled: bool = True, stem: str = "results") -> None:
        """STEM.md, STEM.csv and STEM.json (results.*), each atomically. In a multi-host job pass
        enabled=jax.process_index() == 0 (not checked here: that would claim the accelerator from a
        report script)."""
        if not enabled:
            return
        out = files.path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / f"{stem}.md", self.to_markdown())
        write_text(out / f"{stem}.csv", self._csv_text())
        write_text(out / f"{stem}.json", self._json_text())


def results_table(
    records: Sequence[Record],
    metric_by_task: Mapping[str, str],
    variant_order: Sequence[str] | None = None,
    *,
    baseline: str = "baseline",
    references: Sequence[Record] = (),
) -> ResultsTable:
    """Summarize records over seeds. Rows follow `variant_order` (every recorded variant must be listed;
    listed ones without runs show "–"), else `baseline` first, then order of first appearance; then the
    `references` (records.json's "references", see the module doc), in order of first appearance."""
    cells = _collect(records, metric_by_task)
    seen = list(dict.fromkeys(record["variant"] for record in records))
    if variant_order is None:
        variants = sorted(seen, key=lambda v: v != baseline)
    else:
        unlisted = [v for v in seen if v not in variant_order]
        if unlisted:
            raise UserError(f"variants {unlisted} have results but are not in variant_order; list them")
        variants = list(dict.fromkeys(variant_order))
    return ResultsTable(
        tuple(variants),
        tuple(metric_by_task),
        dict(metric_by_task),
        cells,
        baseline if baseline in seen else None,
        _reference_scores(references, metric_by_task),
    )


def significance(records: Sequence[Record], task: str, a: str, b: str, *, metric: str) -> Significance:
    """Whether variant `a` beats `b` on `task` by more than two seed standard deviations (see module doc)."""
    cells = _collect([r for r in records if r.get("task") == task], {task: metric})
    for variant in (a, b):
        if (variant, task) not in cells:
            raise UserError(f"no results for variant {variant!r} on task {task!r}; check the names or run it")
    return _compare(cells[(a, task)], cells[(b, task)])
