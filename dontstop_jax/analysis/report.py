"""`dontstop analyze`: why a domain needs adaptation, as CSV tables, PNG figures and a Markdown summary.

Sections (each drawn when its inputs are configured): vocabulary overlap of the corpora, MLM loss of each
checkpoint on each corpus' held-out text, training curves of the pretraining phases, the grid's results
as a bar chart and, when it ran several train sizes, its learning curves. A grid workdir contributes its finished
pretraining phases (as checkpoints and curves) and its results.json. Everything is written into a staging directory that
replaces `out_dir` only when complete.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from ml_collections import ConfigDict

from dontstop_jax import files
from dontstop_jax.analysis import plots
from dontstop_jax.analysis.vocab import vocab_overlap
from dontstop_jax.distributed import decide, on_first_process
from dontstop_jax.errors import UserError
from dontstop_jax.files import publishing

if TYPE_CHECKING:
    from dontstop_jax.analysis.mlm_eval import MLMLossTable

_PHASE_DIR = re.compile(r"^(?P<label>.+)-[0-9a-f]{10}$")  # phases/grid.py: <label>-<fingerprint>


def grid_phases(grid_dir: str | files.Path) -> dict[str, files.Path]:
    """{name: workdir} of a grid's finished pretraining phases; a phase that continued another non-base
    phase is named parent+label (so DAPT+TAPT's TAPT is told apart from TAPT on the base model)."""
    root = files.path(grid_dir) / "pretrain"
    labels, parents = {}, {}
    for workdir in sorted(root.glob("*")):
        match, done = _PHASE_DIR.match(workdir.name), workdir / "DONE.json"
        if match and done.is_file():
            labels[workdir.name] = match["label"]
            parent = json.loads(done.read_text())["parent"]
            parents[workdir.name] = files.path(parent.removeprefix("checkpoint:").rpartition("@")[0]).parent.name
    if not labels:
        raise UserError(f"{root} holds no finished pretraining phase; run the grid first (dontstop grid / demo)")

    def name(phase: str) -> str:
        parent = parents[phase]
        return labels[phase] if labels.get(parent, "base") == "base" else f"{name(parent)}+{labels[phase]}"

    order = sorted(labels, key=lambda p: (name(p) != "base", name(p).count("+"), name(p)))
    return {name(p): root / p for p in order}


def _synthetic_corpora(cfg: ConfigDict) -> dict[str, list[str]]:
    """Held-out samples of the synthetic benchmark's general corpus and domains (written next to it)."""
    from dontstop_jax.synthetic import load_benchmark, write_heldout

    bench = load_benchmark(cfg.synthetic.directory)
    return {name: [str(path)] for name, path in write_heldout(bench, cfg.synthetic.heldout_docs).items()}


def _inputs(cfg: ConfigDict) -> tuple[dict[str, list[str]], dict[str, str], dict[str, files.Path]]:
    """(corpora, checkpoints, curves) to analyze: the grid's finished phases are read once, on process 0, and
    handed to the others, so every host scores the same checkpoints."""
    corpora = _synthetic_corpora(cfg) if cfg.get("synthetic") else {k: list(v) for k, v in cfg.corpora.items()}
    checkpoints = dict(cfg.mlm.checkpoints)
    curves = {name: files.path(path) / "metrics.jsonl" for name, path in cfg.curves.items()}
    if cfg.grid_dir:
        phases = decide(
            f"find the finished phases of {cfg.grid_dir}",
            lambda: {k: str(v) for k, v in grid_phases(cfg.grid_dir).items()},
            timeout=600,
        )
        checkpoints = {**phases, **checkpoints}
        curves = {**{k: files.path(v) / "metrics.jsonl" for k, v in phases.items()}, **curves}
    return corpora, checkpoints, curves


def _write(
    out: files.Path,
    cfg: ConfigDict,
    corpora: dict[str, list[str]],
    table: MLMLossTable | None,
    curves: dict[str, files.Path],
) -> list[str]:
    """Every configured section into `out`; returns the Markdown summary's lines."""
    summary = ["# Domain analysis", ""]
    if corpora and cfg.vocab.top_k:
        overlap = vocab_overlap(corpora, cfg.vocab.top_k, cfg.vocab.max_docs or None)
        overlap.write_csv(out / "vocab_overlap.csv")
        plots.heatmap(
            overlap.overlap,
            overlap.names,
            overlap.names,
            out / "vocab_overlap.png",
            dpi=cfg.dpi,
            title=f"vocabulary overlap (%), top {overlap.top_k} words",
            label="overlap (%)",
            ylabel="held-out half 0",
            xlabel="held-out half 1",
        )
        summary += [
            f"## Vocabulary overlap (%, top {overlap.top_k} words, held-out halves)",
            "",
            overlap.to_markdown(),
            "![vocabulary overlap](vocab_overlap.png)",
            "",
        ]
    if table is not None:
        table.write_csv(out / "mlm_loss.csv")
        plots.heatmap(
            table.loss,
            table.checkpoints,
            table.corpora,
            out / "mlm_loss.png",
            dpi=cfg.dpi,
            fmt="{:.2f}",
            title="masked-LM loss on held-out text",
            label="MLM loss",
            cmap="viridis_r",
            ylabel="checkpoint",
            xlabel="held-out text",
        )
        summary += [
            "## Masked-LM loss on held-out text (fixed masks)",
            "",
            table.to_markdown(),
            "![MLM loss](mlm_loss.png)",
            "",
        ]
    if curves:
        plots.training_curves(curves, out / "training_curves.png", dpi=cfg.dpi)
        summary += ["## Training curves", "", "![training curves](training_curves.png)", ""]
    results = files.path(cfg.grid_dir) / "results.json" if cfg.grid_dir else None
    if results is not None and results.is_file():
        plots.results_bars(results, out / "results.png", dpi=cfg.dpi)
        summary += [
            "## Results",
            "",
            (files.path(cfg.grid_dir) / "results.md").read_text(encoding="utf-8"),
            "![results](results.png)",
            "",
        ]
    curve = files.path(cfg.grid_dir) / "learning_curve.json" if cfg.grid_dir else None
    if curve is not None and curve.is_file():
        plots.learning_curves(curve, out / "learning_curve.png", dpi=cfg.dpi)
        summary += [
            "## Learning curves",
            "",
            (curve.parent / "learning_curve.md").read_text(encoding="utf-8"),
            "![learning curves](learning_curve.png)",
            "",
        ]
    return summary


def analyze(cfg: ConfigDict) -> files.Path:
    """Write the analysis of `cfg` (see configs/analyze.py) into cfg.out_dir, replacing an older one whole. Every
    host scores its share of the MLM batches (a collective); process 0 alone then draws and publishes the report,
    and its failure is every host's."""
    plots.pyplot()  # fail on a missing matplotlib before minutes of evaluation, not after
    corpora, checkpoints, curves = _inputs(cfg)
    if not ((corpora and (cfg.vocab.top_k or checkpoints)) or curves):  # a grid_dir brings its phases' curves
        raise UserError("nothing to analyze: configure corpora, mlm.checkpoints, curves or grid_dir")
    table = None
    if corpora and checkpoints:
        from dontstop_jax.analysis.mlm_eval import MaskingSpec, mlm_loss_table  # imports the model: only when needed

        spec = MaskingSpec(**{k: v for k, v in cfg.mlm.items() if k not in ("checkpoints", "mesh_shape")})
        table = mlm_loss_table(checkpoints, corpora, spec, mesh_shape=cfg.mlm.mesh_shape)
    out = files.path(cfg.out_dir)

    def publish() -> None:
        with publishing(out) as stage:
            stage.mkdir()
            summary = _write(stage, cfg, corpora, table, curves)
            (stage / "summary.md").write_text("\n".join(summary), encoding="utf-8")

    on_first_process(f"write the analysis {out}", publish)
    return out
