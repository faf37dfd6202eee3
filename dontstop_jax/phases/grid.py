"""The paper's experiment grid: variants x tasks x seeds, one results table.

Variants: baseline (fine-tune the base model), dapt (base -> domain MLM -> fine-tune), tapt (base ->
task-text MLM -> fine-tune), dapt_tapt (dapt -> tapt -> fine-tune) and not_dapt (DAPT on an irrelevant
domain, the paper's control). Every phase lives in a directory named by a fingerprint of its config and
of its parent's, so a phase that finished is reused (a domain's DAPT serves all tasks of that domain) and
rerunning the grid only runs what is missing.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
from ml_collections import ConfigDict

from dontstop_jax.analysis import results_table
from dontstop_jax.data import load_task
from dontstop_jax.errors import UserError
from dontstop_jax.phases.finetune import finetune
from dontstop_jax.phases.pretrain import pretrain, write_json_atomic

VARIANTS = ("baseline", "dapt", "tapt", "dapt_tapt", "not_dapt")


def fingerprint(cfg: ConfigDict) -> str:
    """Hash of what determines a phase's result (not where it is written or what it is called)."""
    d = json.loads(cfg.to_json_best_effort())
    for key in ("workdir", "name"):
        d.pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def _phase(template: ConfigDict, root: Path, label: str, **fields: Any) -> ConfigDict:
    cfg = copy.deepcopy(template)
    with cfg.unlocked():
        for key, value in fields.items():
            node = cfg
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    cfg.name = label
    cfg.workdir = str(root / f"{label}-{fingerprint(cfg)}")
    return cfg


def base_model(cfg: ConfigDict, root: Path) -> str:
    """The base model: a Hugging Face directory, or (synthetic default) a model pretrained from scratch."""
    if cfg.base_pretrain.init != "scratch":
        return cfg.base
    phase = _phase(cfg.base_pretrain, root / "pretrain", "base")
    pretrain(phase)
    return phase.workdir


class Grid:
    """Plans and runs the phases of a grid config (see configs/grid.py and configs/synthetic.py)."""

    def __init__(self, cfg: ConfigDict):
        self.cfg = cfg
        self.root = Path(cfg.workdir)
        unknown = set(cfg.variants) - set(VARIANTS)
        if unknown:
            raise UserError(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
        for name, task in cfg.tasks.items():
            if task.domain not in cfg.domains:
                raise UserError(f"task {name} names domain {task.domain!r}, which is not in grid.domains "
                                f"{sorted(cfg.domains)}; add its corpus or fix the name")

    def base(self) -> str:
        return base_model(self.cfg, self.root)

    def dapt(self, parent: str, domain: str) -> str:
        phase = _phase(self.cfg.dapt, self.root / "pretrain", f"dapt-{domain}", init=parent,
                       **{"data.sources": list(self.cfg.domains[domain])})
        pretrain(phase)
        return phase.workdir

    def tapt(self, parent: str, task: str) -> str:
        spec = self.cfg.tasks[task]
        sources = [s.path for s in load_task(spec.path, text_field=spec.text_field,
                                             label_field=spec.label_field).tapt_sources]
        phase = _phase(self.cfg.tapt, self.root / "pretrain", f"tapt-{task}", init=parent,
                       **{"data.sources": sources})
        pretrain(phase)
        return phase.workdir

    def start_point(self, variant: str, task: str, base: str) -> str:
        domain = self.cfg.tasks[task].domain
        if variant == "baseline":
            return base
        if variant == "dapt":
            return self.dapt(base, domain)
        if variant == "tapt":
            return self.tapt(base, task)
        if variant == "dapt_tapt":
            return self.tapt(self.dapt(base, domain), task)
        other = self.cfg.tasks[task].irrelevant_domain
        if other not in self.cfg.domains or other == domain:
            raise UserError(f"not_dapt for task {task} needs tasks.{task}.irrelevant_domain to name another "
                            f"domain of {sorted(self.cfg.domains)}")
        return self.dapt(base, other)

    def run(self) -> Any:
        """Run what is missing; returns the results table (raw per-seed records in `self.records`)."""
        base = self.base()
        self.records = records = []
        for task, spec in self.cfg.tasks.items():
            for variant in self.cfg.variants:
                init = self.start_point(variant, task, base)
                per_task = {"task.path": spec.path, "train.metric": spec.metric, "task.text_field": spec.text_field,
                            "task.label_field": spec.label_field}
                if spec.get("epochs"):
                    per_task["train.epochs"] = spec.epochs
                for seed in self.cfg.seeds:
                    phase = _phase(self.cfg.finetune, self.root / "finetune", f"{task}-{variant}-s{seed}",
                                   init=init, seed=seed, **per_task)
                    result = finetune(phase)
                    records.append({"task": task, "variant": variant, "seed": seed, "metrics": result["test"]})
        table = results_table(records, {t: s.metric for t, s in self.cfg.tasks.items()},
                              variant_order=list(self.cfg.variants))
        if jax.process_index() == 0:
            table.write_all(self.root)
            write_json_atomic(self.root / "records.json", {"records": records})
        return table
