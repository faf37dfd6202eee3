"""The continual-learning table: per-task scores after each stage, their average, forgetting and transfer.

Forgetting (as in the continual-learning literature, e.g. Chaudhry et al. 2018 and DAS's tables): for every
task learned before the last stage, the best score it had at an earlier stage minus its final score,
averaged over those tasks. Higher = more forgotten; the last stage's task cannot be forgotten yet.
Backward transfer (BWT, Lopez-Paz & Ranzato 2017): for the same tasks, final score minus the score right
after its domain's stage (negative = forgetting). Forward transfer (FWT): for every task whose domain is not
the first, its score from the model before its domain's stage (after the previous domains) minus its score
from the base model: what the earlier domains gave it.

Over seeds (`spread`): each seed's own table (its fine-tunes only) gives each of those numbers, reported as
mean ± sample std over the seeds: the spread of one seed's result. The main table's numbers come from the
seed-mean scores, so its forgetting (a max) can differ from the mean of the seeds' forgetting.

`python -m dontstop_jax.analysis.continual WORKDIR/continual.json` prints the tables again from its records.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# {"method", "stage" (index), "task", "seed", "score", "when"}; when: "after" (the stage learned the task's
# domain or an earlier one: the table), "before" (the task's domain is the next stage's) or "base" (the base model)
Record = Mapping[str, Any]
SUMMARY = ("final avg", "forgetting", "BWT", "FWT")


def forgetting(curve: Mapping[str, Sequence[float | None]]) -> float | None:
    """Mean over tasks of max(scores before the last stage) - final score; None without an earlier score."""
    drops = [
        max(s for s in scores[:-1] if s is not None) - final
        for scores in curve.values()
        if any(s is not None for s in scores[:-1]) and (final := scores[-1]) is not None
    ]
    return float(np.mean(drops)) if drops else None


def backward_transfer(curve: Mapping[str, Sequence[float | None]]) -> float | None:
    """Mean over tasks learned before the last stage of final score - score at the stage that learned it."""
    changes = [
        final - next(s for s in scores if s is not None)
        for scores in curve.values()
        if any(s is not None for s in scores[:-1]) and (final := scores[-1]) is not None
    ]
    return float(np.mean(changes)) if changes else None


def forward_transfer(before: Mapping[str, float | None], base: Mapping[str, float | None]) -> float | None:
    """Mean over tasks with a score before their domain's stage of that score - the base model's."""
    gains = [score - b for t, score in before.items() if score is not None and (b := base.get(t)) is not None]
    return float(np.mean(gains)) if gains else None


def _mean_scores(records: Sequence[Record], when: str) -> dict[tuple, float]:
    """(method, task, stage) -> the seeds' mean score of the records taken `when`."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        if r.get("when", "after") == when:
            groups.setdefault((r["method"], r["task"], r["stage"]), []).append(r["score"])
    return {key: float(np.mean(v)) for key, v in groups.items()}


@dataclass(frozen=True)
class ContinualTable:
    methods: tuple[str, ...]
    stages: tuple[str, ...]  # the domain learned at each stage
    tasks: tuple[str, ...]
    scores: Mapping[str, Mapping[str, list[float | None]]]  # method -> task -> score after each stage (seed mean)
    # method -> task -> the score before its domain
    before: Mapping[str, Mapping[str, float | None]] = field(default_factory=dict)
    base: Mapping[str, float | None] = field(default_factory=dict)  # task -> the base model's score
    # method -> SUMMARY name -> [mean, sample std (None for n = 1), n] over the seeds' own tables
    # (None where a seed has none)
    spread: Mapping[str, Mapping[str, list | None]] = field(default_factory=dict)

    @classmethod
    def from_records(
        cls,
        records: Sequence[Record],
        methods: Sequence[str],
        stages: Sequence[str],
        tasks: Sequence[str],
        spread: bool = True,
    ) -> ContinualTable:
        scores: dict[str, dict[str, list[float | None]]] = {
            m: {t: [None] * len(stages) for t in tasks} for m in methods
        }
        for (m, t, s), score in _mean_scores(records, "after").items():
            scores[m][t][s] = score
        before: dict[str, dict[str, float | None]] = {m: {t: None for t in tasks} for m in methods}
        for (m, t, _), score in _mean_scores(records, "before").items():
            before[m][t] = score
        base = {t: score for (_, t, _), score in _mean_scores(records, "base").items()}
        per_seed = (
            [
                cls.from_records([r for r in records if r["seed"] == seed], methods, stages, tasks, spread=False)
                for seed in sorted({r["seed"] for r in records})
            ]
            if spread
            else []
        )
        over = (
            {m: {name: _mean_std([t.summary(m)[name] for t in per_seed]) for name in SUMMARY} for m in methods}
            if per_seed
            else {}
        )
        return cls(tuple(methods), tuple(stages), tuple(tasks), scores, before, base, over)

    def summary(self, method: str) -> dict[str, float | None]:
        return dict(
            zip(
                SUMMARY,
                (
                    self.average(method, len(self.stages) - 1),
                    self.forgetting(method),
                    self.backward_transfer(method),
                    self.forward_transfer(method),
                ),
            )
        )

    def average(self, method: str, stage: int) -> float | None:
        seen = [v for c in self.scores[method].values() if (v := c[stage]) is not None]
        return float(np.mean(seen)) if seen else None

    def forgetting(self, method: str) -> float | None:
        return forgetting(self.scores[method])

    def backward_transfer(self, method: str) -> float | None:
        return backward_transfer(self.scores[method])

    def forward_transfer(self, method: str) -> float | None:
        return forward_transfer(self.before.get(method, {}), self.base)

    def to_markdown(self) -> str:
        fmt = lambda x: "" if x is None else f"{100 * x:.1f}"
        head = ["method", "after"] + list(self.tasks) + ["avg"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in self.methods:
            for i, domain in enumerate(self.stages):
                row = [m, f"{i + 1}: {domain}"] + [fmt(self.scores[m][t][i]) for t in self.tasks]
                lines.append("| " + " | ".join(row + [fmt(self.average(m, i))]) + " |")
        lines += ["", "| method | " + " | ".join(SUMMARY) + " |", "|---|" + "---|" * len(SUMMARY)]
        lines += [f"| {m} | " + " | ".join(fmt(v) for v in self.summary(m).values()) + " |" for m in self.methods]
        if self.spread:
            spread = lambda v: (
                "" if v is None else f"{100 * v[0]:.1f} ± " + ("n/a" if v[1] is None else f"{100 * v[1]:.1f}")
            )
            lines += [
                "",
                "Over seeds: each seed's own table, mean ± sample std (n = "
                f"{max(v[2] for m in self.methods for v in self.spread[m].values() if v)} seeds):",
                "",
                "| method | " + " | ".join(SUMMARY) + " |",
                "|---|" + "---|" * len(SUMMARY),
            ]
            lines += [f"| {m} | " + " | ".join(spread(self.spread[m][k]) for k in SUMMARY) + " |" for m in self.methods]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return {
            "methods": list(self.methods),
            "stages": list(self.stages),
            "tasks": list(self.tasks),
            "scores": self.scores,
            "average": {m: [self.average(m, i) for i in range(len(self.stages))] for m in self.methods},
            "forgetting": {m: self.forgetting(m) for m in self.methods},
            "bwt": {m: self.backward_transfer(m) for m in self.methods},
            "fwt": {m: self.forward_transfer(m) for m in self.methods},
            "before": self.before,
            "base": self.base,
            "spread": self.spread,
        }


def _mean_std(values: Sequence[float | None]) -> list | None:
    """[mean, sample std (None for one value), n] of the values that are not None; None if there are none."""
    kept = [v for v in values if v is not None]
    return [float(np.mean(kept)), float(np.std(kept, ddof=1)) if len(kept) > 1 else None, len(kept)] if kept else None


def from_json(path: str) -> ContinualTable:
    """The table of a continual run's `continual.json`, rebuilt from its records."""
    with open(path) as f:
        saved = json.load(f)
    methods = saved.get("methods", list(saved["scores"]))  # runs before "methods" was saved: sorted names
    return ContinualTable.from_records(saved["records"], methods, saved["stages"], saved["tasks"])


if __name__ == "__main__":
    print(from_json(sys.argv[1]).to_markdown(), end="")
