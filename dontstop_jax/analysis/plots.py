"""PNG figures of the analysis: annotated heatmaps, training curves, the results bar chart and learning curves.

matplotlib is an optional dependency (`pip install dontstop-jax[analysis]`): it is imported when a figure
is drawn, with the non-interactive Agg backend so it works on headless machines.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dontstop_jax import files
from dontstop_jax.errors import UserError

CURVES = (("loss", "MLM loss"), ("learning_rate", "learning rate"), ("tokens_per_s", "tokens / s"))


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or a UserError that names the install."""
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            "plots need matplotlib; pip install 'dontstop-jax[analysis]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | files.Path, dpi: int) -> files.Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return files.path(path)


def heatmap(
    matrix: np.ndarray,
    rows: Sequence[str],
    cols: Sequence[str],
    path: str | files.Path,
    *,
    title: str,
    label: str,
    xlabel: str = "",
    ylabel: str = "",
    fmt: str = "{:.1f}",
    cmap: str = "viridis",
    dpi: int = 80,
) -> files.Path:
    """Matrix as colored cells, each annotated with its value (row i = rows[i])."""
    plt = pyplot()
    matrix = np.asarray(matrix, dtype=float)
    margin = 0.08 * max(map(len, rows))  # inches for the row labels
    fig, ax = plt.subplots(figsize=(2.2 + margin + 0.9 * len(cols), 1.4 + 0.5 * len(rows)))
    image = ax.imshow(matrix, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for (i, j), value in np.ndenumerate(matrix):
        r, g, b, _ = image.cmap(image.norm(value))
        ax.text(
            j,
            i,
            fmt.format(value),
            ha="center",
            va="center",
            fontsize=9,
            color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white",
        )  # legible on any cell
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(title, fontsize=10)
    return _save(fig, path, dpi)


def read_metrics(path: str | files.Path, phase: str = "train/") -> list[dict[str, float]]:
    """The lines of a MetricsWriter's metrics.jsonl logged under `phase` (see train/logging.py)."""
    path = files.path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; point the analysis at a phase workdir that has trained")
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [line for line in lines if line.get("phase", phase) == phase]


def training_curves(runs: Mapping[str, str | files.Path], path: str | files.Path, *, dpi: int = 80) -> files.Path:
    """Loss, learning rate and throughput over steps, one line per run ({name: metrics.jsonl path})."""
    plt = pyplot()
    logs = {name: read_metrics(p) for name, p in runs.items()}
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.0 * len(CURVES), 3.2))
    for ax, (key, title) in zip(axes, CURVES):
        for name, lines in logs.items():
            points = [(m["step"], m[key]) for m in lines if key in m]
            if points:
                ax.plot(*zip(*points), label=name, marker="." if len(points) < 20 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    return _save(fig, path, dpi)


def results_bars(results_json: str | files.Path, path: str | files.Path, *, dpi: int = 80) -> files.Path:
    """The grid's results (results.json of analysis/table.py): one bar group per task, mean ± std over seeds."""
    plt = pyplot()
    results_json = files.path(results_json)
    if not results_json.is_file():
        raise UserError(f"{results_json} does not exist; run the grid first (dontstop grid / dontstop demo)")
    table = json.loads(results_json.read_text(encoding="utf-8"))
    cells = {(c["variant"], c["task"]): c for c in table["cells"]}
    variants, tasks = table["variants"], table["tasks"]
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(2.5 + 0.5 * len(tasks) * len(variants), 3.4))
    for k, variant in enumerate(variants):
        found = [(i, cells[variant, t]) for i, t in enumerate(tasks) if (variant, t) in cells]
        if not found:
            continue
        xs = [i - 0.4 + (k + 0.5) * width for i, _ in found]
        means = [100 * c["mean"] for _, c in found]
        errors = [100 * c["std"] if c["std"] is not None else math.nan for _, c in found]
        ax.bar(xs, means, width, yerr=errors, capsize=3, label=variant)
    ax.set_xticks(range(len(tasks)), labels=[f"{t} ({table['metric_by_task'][t]})" for t in tasks])
    ax.set_ylabel("test score (%)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("mean ± std over seeds", fontsize=10)
    return _save(fig, path, dpi)


def learning_curves(curve_json: str | files.Path, path: str | files.Path, *, dpi: int = 80) -> files.Path:
    """A grid's learning curves (learning_curve.json of analysis/curve.py): test score against labeled train
    examples (log scale), one panel per task, one line per variant with its seed spread (mean ± std) shaded;
    references dashed, their spread over draws shaded too."""
    plt = pyplot()
    curves = json.loads(files.path(curve_json).read_text(encoding="utf-8"))
    tasks = list(curves["metric_by_task"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks) + 2.0, 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for line in (line for line in curves["lines"] if line["task"] == task):
            x = [p["examples"] for p in line["points"]]
            mean = np.array([100 * p["mean"] for p in line["points"]])
            std = np.array([100 * (p["std"] or 0.0) for p in line["points"]])
            (drawn,) = ax.plot(
                x,
                mean,
                "--" if line["reference"] else "-",
                marker="o",
                markersize=3,
                label=line["name"] + (" (reference)" if line["reference"] else ""),
            )
            ax.fill_between(x, mean - std, mean + std, color=drawn.get_color(), alpha=0.15, linewidth=0)
        ax.set_xscale("log")
        sizes = sorted({p["examples"] for line in curves["lines"] if line["task"] == task for p in line["points"]})
        ax.set_xticks(sizes, [str(n) for n in sizes])  # the sizes themselves, not 2x10^1-style minor labels
        ax.minorticks_off()
        ax.set_xlabel("labeled train examples")
        ax.set_ylabel(f"test {curves['metric_by_task'][task]} (%)")
        ax.set_title(task, fontsize=10)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path, dpi)
