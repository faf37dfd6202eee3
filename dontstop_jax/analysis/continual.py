"""The continual-learning table: per-task scores after each stage, their average, and forgetting.

Forgetting (as in the continual-learning literature, e.g. Chaudhry et al. 2018 and DAS's tables): for every
task learned before the last stage, the best score it had at an earlier stage minus its final score,
averaged over those tasks. Higher = more forgotten; the last stage's task cannot be forgotten yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

# {"method", "stage" (index), "task", "seed", "score"}
Record = Mapping[str, object]


def forgetting(curve: Mapping[str, Sequence[float | None]]) -> float | None:
    """Mean over tasks of max(scores before the last stage) - final score; None without an earlier score."""
    drops = [max(s for s in scores[:-1] if s is not None) - scores[-1]
             for scores in curve.values() if any(s is not None for s in scores[:-1])]
    return float(np.mean(drops)) if drops else None


@dataclass(frozen=True)
class ContinualTable:
    methods: tuple[str, ...]
    stages: tuple[str, ...]  # the domain learned at each stage
    tasks: tuple[str, ...]
    scores: Mapping[str, Mapping[str, list[float | None]]]  # method -> task -> score after each stage (seed mean)

    @classmethod
    def from_records(cls, records: Sequence[Record], methods: Sequence[str], stages: Sequence[str],
                     tasks: Sequence[str]) -> "ContinualTable":
        scores = {m: {t: [None] * len(stages) for t in tasks} for m in methods}
        for (m, t, s) in {(r["method"], r["task"], r["stage"]) for r in records}:
            scores[m][t][s] = float(np.mean([r["score"] for r in records
                                             if (r["method"], r["task"], r["stage"]) == (m, t, s)]))
        return cls(tuple(methods), tuple(stages), tuple(tasks), scores)

    def average(self, method: str, stage: int) -> float | None:
        seen = [c[stage] for c in self.scores[method].values() if c[stage] is not None]
        return float(np.mean(seen)) if seen else None

    def forgetting(self, method: str) -> float | None:
        return forgetting(self.scores[method])

    def to_markdown(self) -> str:
        fmt = lambda x: "" if x is None else f"{100 * x:.1f}"
        head = ["method", "after"] + list(self.tasks) + ["avg"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in self.methods:
            for i, domain in enumerate(self.stages):
                row = [m, f"{i + 1}: {domain}"] + [fmt(self.scores[m][t][i]) for t in self.tasks]
                lines.append("| " + " | ".join(row + [fmt(self.average(m, i))]) + " |")
        lines += ["", "| method | final avg | forgetting |", "|---|---|---|"]
        lines += [f"| {m} | {fmt(self.average(m, len(self.stages) - 1))} | {fmt(self.forgetting(m))} |"
                  for m in self.methods]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return {"stages": list(self.stages), "tasks": list(self.tasks), "scores": self.scores,
                "average": {m: [self.average(m, i) for i in range(len(self.stages))] for m in self.methods},
                "forgetting": {m: self.forgetting(m) for m in self.methods}}
