"""Continual DAP-training: one model adapted to a sequence of domains, every seen end task scored after each.

Methods, in one table: `das` (Ke et al. 2023: soft-masked gradients + contrastive integration), `ncl`
(plain sequential DAPT, the naive continual learner), `one` (an independent DAPT per domain from the base:
no forgetting by construction, but one model per domain) and `base` (no adaptation).

DAS stage t: the accumulated importance of the earlier stages (stage 1: general knowledge, measured on the
base model with the KL proxy on domain 1's text) soft-masks training on domain t; afterwards the domain's
own importance (MLM loss) is max-accumulated and saved as `importance.npz` in the stage's workdir, which the
next stage reads. Phases are fingerprinted and reused as in the grid.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from dontstop_jax import files
from dontstop_jax.analysis.continual import ContinualTable
from dontstop_jax.analysis.metrics import check_metric
from dontstop_jax.das import importance
from dontstop_jax.das.contrastive import das_objective
from dontstop_jax.distributed import on_first_process
from dontstop_jax.data import MLMLoader, load_tokenizer, special_ids
from dontstop_jax.engine import (check_batch_size, compile_eval_step, make_eval_step, make_mesh, mlm_loss_sums,
                                 to_global)
from dontstop_jax.errors import UserError
from dontstop_jax.files import write_json, write_text
from dontstop_jax.model import ModelConfig, RobertaForMaskedLM
from dontstop_jax.phases.defaults import das_config
from dontstop_jax.phases.finetune import finetune
from dontstop_jax.phases.grid import _phase, base_model
from dontstop_jax.phases.pretrain import mlm, prepare, pretrain
from dontstop_jax.train import source as sources
from dontstop_jax.train.trainer import Objective

METHODS = ("das", "ncl", "one", "base")
GENERAL = "general_importance.npz"  # in the first DAS stage's workdir: what the base model knows
ACCUMULATED = "importance.npz"  # in every DAS stage's workdir: max over general and domains so far


@dataclasses.dataclass
class _Loaded:
    """A masked-LM model of a phase, placed on a mesh for measuring (importance, probe losses)."""
    source: sources.ModelSource
    config: ModelConfig
    model: RobertaForMaskedLM
    params: Any
    param_shardings: Any
    mesh: Mesh
    rules: tuple


class Continual:
    """Plans and runs a continual recipe (see configs/continual.py)."""

    def __init__(self, cfg: ConfigDict):
        self.cfg = cfg
        self.root = files.path(cfg.workdir)
        if unknown := set(cfg.methods) - set(METHODS):
            raise UserError(f"unknown continual methods {sorted(unknown)}; choose from {list(METHODS)}")
        if missing := [d for d in cfg.sequence if d not in cfg.domains]:
            raise UserError(f"sequence names domains {missing} that are not in domains {sorted(cfg.domains)}")
        for name, task in cfg.tasks.items():
            check_metric(task.metric, f"tasks.{name}.metric")
            if task.domain not in cfg.sequence:
                raise UserError(f"task {name} is in domain {task.domain!r}, which the sequence {list(cfg.sequence)} "
                                "never visits; add the domain or drop the task")

    def base(self) -> str:
        return base_model(self.cfg, self.root)

    def _adapt_phase(self, label: str, parent: str, domain: str, **fields) -> ConfigDict:
        """The dapt phase on `domain` from `parent`. `frozen` (held fixed by the Trainer) and, for a DAS stage,
        which passes `das=`, the objective are set on it so that the fingerprint tells them."""
        if "das" in fields:
            fields["objective"] = "das"
        return _phase(self.cfg.dapt, self.root / "pretrain", f"{label}-{domain}", init=parent,
                      frozen=list(self.cfg.frozen), **{"data.sources": list(self.cfg.domains[domain])}, **fields)

    def _objective(self, past: importance.Importance | None) -> Objective:
        """DAS's objective when `past` is given, else plain MLM (`frozen` is held fixed by the Trainer)."""
        return mlm if past is None else das_objective(past, self.cfg.das.contrastive_weight, self.cfg.das.temperature)

    def das_stage(self, parent: str, domain: str, first: bool) -> str:
        """Train on `domain` under the importance accumulated so far; then add this domain's importance."""
        phase = self._adapt_phase("das", parent, domain, das=self.cfg.das)
        workdir = files.path(phase.workdir)
        if first:
            past = self._importance_file(workdir / GENERAL, lambda: self.importance(parent, phase, "kl"))
        else:
            past = importance.load(files.path(parent) / ACCUMULATED)
        pretrain(phase, objective=self._objective(past))
        self._importance_file(workdir / ACCUMULATED, lambda: importance.accumulate(
            past, self.importance(phase.workdir, phase, "mlm")))
        return phase.workdir

    @staticmethod
    def _importance_file(path: files.Path, compute) -> importance.Importance:
        """The importance saved at `path`, or `compute()`d now (every process) and saved (by the first; the
        others wait for the file, which the next stage reads)."""
        if path.exists():
            return importance.load(path)
        value = compute()

        def save():
            path.parent.mkdir(parents=True, exist_ok=True)
            importance.save(path, value)
        on_first_process(f"importance {path}", save)
        return value

    def stages(self, method: str, base: str) -> list[str]:
        """The model (a workdir) after each stage of the sequence."""
        if method == "base":
            return [base] * len(self.cfg.sequence)
        if method == "one":
            return [self._dapt(base, d) for d in self.cfg.sequence]
        models, parent = [], base
        for i, domain in enumerate(self.cfg.sequence):
            if method == "ncl":
                parent = self._dapt(parent, domain)
            else:
                parent = self.das_stage(parent, domain, first=i == 0)
            models.append(parent)
        return models

    def _dapt(self, parent: str, domain: str) -> str:
        phase = self._adapt_phase("dapt", parent, domain)
        pretrain(phase, objective=self._objective(None))
        return phase.workdir

    def _load(self, init: str, phase: ConfigDict, dropout: float | None = None) -> _Loaded:
        source = sources.resolve(init, model=phase.model)
        cfg = source.config
        if dropout is not None:  # the KL proxy needs dropout even where training runs without it
            cfg = cfg.replace(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        model = RobertaForMaskedLM(cfg)
        mesh = make_mesh(phase.mesh.shape, dcn_shape=phase.mesh.dcn_shape)
        rules = tuple(tuple(r) for r in phase.mesh.rules)
        check_batch_size(self.cfg.das.importance_batch_size, mesh, "das.importance_batch_size")
        params, shardings = sources.place(source, model, mesh, rules)
        return _Loaded(source, cfg, model, params, shardings, mesh, rules)

    def _sample(self, loaded: _Loaded, phase: ConfigDict, seed: int):
        """das.importance_batches MLM batches of `phase`'s corpus."""
        tokenizer = load_tokenizer(loaded.source.tokenizer_dir)
        loader = MLMLoader(prepare(phase, loaded.source), self.cfg.das.importance_batch_size, seed,
                           special_ids(tokenizer), vocab_size=len(tokenizer), mask_prob=phase.data.mask_prob,
                           process_index=jax.process_index(), process_count=jax.process_count(), prefetch=0)
        return itertools.islice(loader, self.cfg.das.importance_batches)

    def importance(self, init: str, phase: ConfigDict, kind: str) -> importance.Importance:
        """Normalised importance of `init`'s units on `phase`'s corpus: kind "kl" (general) or "mlm" (domain)."""
        loaded = self._load(init, phase, self.cfg.das.importance_dropout if kind == "kl" else None)
        loss = (importance.kl_loss if kind == "kl" else importance.mlm_loss)(loaded.model)
        raw = importance.measure(loss, loaded.config, loaded.params, self._sample(loaded, phase, phase.seed),
                                 loaded.mesh, loaded.rules, seed=phase.seed)
        return importance.normalize(raw)

    def domain_losses(self, inits: list[str], domains: list[str]) -> np.ndarray:
        """[init, domain] MLM loss on das.importance_batches batches of each domain's corpus (a forgetting probe;
        every init must share one architecture)."""
        step, losses = None, np.zeros((len(inits), len(domains)))
        for i, init in enumerate(inits):
            loaded = self._load(init, self.cfg.dapt)
            if step is None:
                step = compile_eval_step(make_eval_step(mlm_loss_sums(loaded.model)), loaded.param_shardings,
                                         loaded.mesh, loaded.rules)
            for j, domain in enumerate(domains):
                batches = self._sample(loaded, self._adapt_phase("probe", init, domain), seed=12345)
                sums = [jax.device_get(step(loaded.params, to_global(b, loaded.mesh))) for b in batches]
                losses[i, j] = sum(s["loss_sum"] for s in sums) / max(sum(s["weight"] for s in sums), 1.0)
        return losses

    def run(self) -> ContinualTable:
        """Run what is missing; after every stage, fine-tune and score every task seen so far."""
        base, seq = self.base(), list(self.cfg.sequence)
        records = []
        for method in self.cfg.methods:
            models = self.stages(method, base)
            for stage in range(len(seq)):
                for task, spec in self.cfg.tasks.items():
                    if spec.domain not in seq[:stage + 1]:
                        continue
                    init = models[seq.index(spec.domain)] if method == "one" else models[stage]
                    for seed in self.cfg.seeds:
                        result = finetune(_phase(self.cfg.finetune, self.root / "finetune", f"{task}-s{seed}",
                                                 init=init, seed=seed, **{
                                                     "task.path": spec.path, "train.metric": spec.metric,
                                                     "task.text_field": spec.text_field,
                                                     "task.label_field": spec.label_field}))
                        records.append({"method": method, "stage": stage, "task": task, "seed": seed,
                                        "score": result["test"][spec.metric]})
        table = ContinualTable.from_records(records, self.cfg.methods, seq, list(self.cfg.tasks))
        if jax.process_index() == 0:
            write_text(self.root / "continual.md", table.to_markdown())
            write_json(self.root / "continual.json", {**table.to_json(), "records": records})
        return table


def synthetic_config(scale: str = "default") -> ConfigDict:
    """The synthetic demo's models and schedules (phases/synthetic.py) over three domains, one task each."""
    from dontstop_jax.phases.synthetic import get_config
    demo, run, domains = get_config(scale), f"runs/continual-{scale}", ("bio", "cs", "news")
    cfg = ConfigDict(dict(
        workdir=run, base="", seeds=demo.seeds[:1] if scale == "tiny" else list(demo.seeds),
        synthetic=demo.synthetic, domains={}, tasks={}, sequence=list(domains), methods=list(METHODS),
        base_pretrain=demo.base_pretrain, dapt=demo.dapt, finetune=demo.finetune,
        # Parameter paths held fixed in every adaptation stage (e.g. ["lm_head", "roberta/embeddings"], which DAS
        # does not mask), so that forgetting happens where DAS acts.
        frozen=[],
        das=das_config()))
    cfg.synthetic.update(domains=domains, task_domains=domains)  # the benchmark goes to WORKDIR/benchmark
    if scale == "tiny":
        cfg.das.importance_batches = 4
    return cfg.lock()
