"""Continual DAP-training: one model adapted to a sequence of domains, every seen end task scored after each.

Methods (`METHODS`): `das` (Ke et al. 2023: soft-masked gradients + contrastive integration) and its ablations; the
continual-learning baselines `ewc` (Fisher-weighted penalty, das/ewc.py), `derpp` (replay of past domains' text with
their logits, das/replay.py) and `hat` (hard attention to the task, the parameter-isolation reference, das/hat.py);
`demix` (DEMix domain experts: an FFN expert per domain); `ncl` (plain sequential DAPT, the naive continual
learner); `one` and `adapter_one` (an independent full / adapter DAPT per domain from the base: no forgetting by
construction, one model per domain) and `base` (no adaptation). A method is one `Method`: how a stage trains (a
`Continual` stage method), where each stage starts, which stage's model a task is fine-tuned from and the phase
fields it sets; the objectives and the state that carries from stage to stage (importance, Fisher, replay buffer,
HAT masks) are built here, the training loop is always `pretrain`.

DAS stage t: the accumulated importance of the earlier stages (stage 1: general knowledge, measured on the
base model with the KL proxy on domain 1's text) soft-masks training on domain t; afterwards the domain's
own importance (MLM loss) is max-accumulated and saved as `importance.npz` in the stage's workdir (and,
without the general knowledge, as `domain_importance.npz`), which the next stage reads. EWC and DER++
measure their state from the earlier stages' models when a stage trains. Phases are fingerprinted and
reused as in the grid (a regularised method's first stage, with nothing to regularise, is `ncl`'s).

HAT stage t trains domain t's unit embeddings with the model (`HatMaskedLM`) and saves the domain's mask
(`hat_domain_mask.npz`) and its max with the past domains' (`hat_mask.npz`), which blocks stage t + 1's
gradients. A task is fine-tuned from the end model and trained and scored under its domain's mask (finetune's
`unit_gates` = that stage's `hat_domain_mask.npz`), as HAT scores task t with mask t: the units its domain used,
which later domains could not change, and none of those the later domains took. Its forward-transfer fine-tune
(from the model before its domain's stage, which has no mask for it yet) is ungated.

DEMix (Gururangan et al. 2022, adding a domain's expert): stage t trains only the FFNs (the `intermediate`
and `output` dense layers of every layer), starting from domain t - 1's expert (the base's FFNs for the
first); everything else is held fixed, so every stage's model is the shared (base) weights plus its domain's
expert. Each stage's checkpoint stores its whole model (shared weights bit-identical to the base's) rather
than the expert alone beside one shared copy, and no router mixes experts: a task is fine-tuned from its
domain's model (the DEMix paper's known-domain setting).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from dontstop_jax import config_loader, files
from dontstop_jax.analysis.continual import ContinualTable
from dontstop_jax.analysis.metrics import check_metric
from dontstop_jax.das import ewc, hat, importance, replay
from dontstop_jax.das.contrastive import das_objective
from dontstop_jax.das.ewc import ewc_objective
from dontstop_jax.das.replay import derpp_objective
from dontstop_jax.data import MLMLoader, load_tokenizer, special_ids
from dontstop_jax.distributed import decide, on_first_process
from dontstop_jax.engine import check_batch_size, compile_eval_step, make_eval_step, make_mesh, mlm_loss_sums, to_global
from dontstop_jax.errors import UserError
from dontstop_jax.fields import CONTINUAL_METHODS, registry
from dontstop_jax.files import write_json, write_text
from dontstop_jax.model import ModelConfig, RobertaForMaskedLM
from dontstop_jax.phases.defaults import das_config, derpp_config, ewc_config, hat_config
from dontstop_jax.phases.finetune import finetune
from dontstop_jax.phases.grid import base_model, phase_config
from dontstop_jax.phases.pretrain import mlm, prepare, pretrain
from dontstop_jax.train import source as sources

GENERAL = "general_importance.npz"  # in the first DAS stage's workdir: what the base model knows
ACCUMULATED = "importance.npz"  # in every DAS stage's workdir: max over general and domains so far
DOMAINS = "domain_importance.npz"  # ... max over the domains so far only (what `das.contrast="past"` gates)
HAT_DOMAIN = "hat_domain_mask.npz"  # in every HAT stage's workdir: the units its domain used (mask at s_max)
HAT_MASKS = "hat_mask.npz"  # ... max over the domains so far: what the next stage may not change
# Everything but the FFNs (roberta/layers/intermediate, roberta/layers/output): what a DEMix stage holds fixed
EXPERT_SHARED = (
    "roberta/embeddings",
    "lm_head",
    *(
        f"roberta/layers/{m}"
        for m in ("query", "key", "value", "attention_output", "attention_LayerNorm", "output_LayerNorm")
    ),
)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a method: train on `domain`, the sequence's `index`th, from `parent` (a model); `earlier`:
    the method's models after the stages before (on `earlier_domains`); `sections`: the recipe's `das` and
    `dapt` with the method's fields set."""

    parent: str
    domain: str
    index: int
    earlier: tuple[str, ...]
    earlier_domains: tuple[str, ...]
    sections: ConfigDict


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


def _like(tree: Any, params: Any) -> Any:
    """`tree` (shaped like `params`) placed with `params`'s shardings: what the train step expects."""
    return jax.tree_util.tree_map(lambda x, p: jax.device_put(x, p.sharding), tree, params)


class Continual:
    """Plans and runs a continual recipe (see configs/continual.py)."""

    def __init__(self, cfg: ConfigDict):
        self.cfg = cfg
        self.root = files.path(cfg.workdir)
        if unknown := [m for m in cfg.methods if m not in METHODS]:
            raise UserError(f"unknown continual methods {unknown}; choose from {list(METHODS)}")
        for field, names in (("methods", list(cfg.methods)), ("sequence", list(cfg.sequence))):
            if not names or len(set(names)) < len(names):
                raise UserError(
                    f"{field}={names} must list distinct names, at least one (a method is a row of the "
                    "table; a domain is visited once)"
                )
        if missing := [d for d in cfg.sequence if d not in cfg.domains]:
            raise UserError(f"sequence names domains {missing} that are not in domains {sorted(cfg.domains)}")
        for name, task in cfg.tasks.items():
            check_metric(task.metric, f"tasks.{name}.metric")
            if task.domain not in cfg.sequence:
                raise UserError(
                    f"task {name} is in domain {task.domain!r}, which the sequence {list(cfg.sequence)} "
                    "never visits; add the domain or drop the task"
                )

    def base(self) -> str:
        return base_model(self.cfg, self.root)

    def sections(self, method: str) -> ConfigDict:
        """The recipe's `das` and `dapt` sections with `method`'s fields set (e.g. a DAS ablation's)."""
        sections = ConfigDict({"das": copy.deepcopy(self.cfg.das), "dapt": copy.deepcopy(self.cfg.dapt)})
        return config_loader.set_fields(sections, dict(METHODS[method].fields), context=f"method {method}: ")

    def _adapt_phase(
        self, label: str, parent: str, domain: str, template: ConfigDict | None = None, **fields
    ) -> ConfigDict:
        """The dapt phase (or `template`) on `domain` from `parent`. `frozen` (held fixed by the Trainer) and a
        stage's objective and its section (`das=`, `ewc=`, ...) are set on it so that the fingerprint tells them."""
        fields = {"frozen": list(self.cfg.frozen), "data.sources": list(self.cfg.domains[domain]), **fields}
        return phase_config(
            template or self.cfg.dapt, self.root / "pretrain", f"{label}-{domain}", init=parent, **fields
        )

    def dapt_stage(self, stage: Stage) -> str:
        """Plain DAPT on the stage's domain (with the method's `dapt` fields, e.g. adapter_one's adapters)."""
        dapt = stage.sections.dapt
        return self._dapt(stage.parent, stage.domain, dapt, "adapter" if dapt.peft.method != "full" else "dapt")

    def expert_stage(self, stage: Stage) -> str:
        """DEMix: DAPT of the FFNs only, everything else (`EXPERT_SHARED`) held fixed."""
        return self._dapt(
            stage.parent, stage.domain, stage.sections.dapt, "demix", frozen=[*self.cfg.frozen, *EXPERT_SHARED]
        )

    def das_stage(self, stage: Stage) -> str:
        """Train on the domain under the importance accumulated so far; then add this domain's importance.
        The stage's `das` (the recipe's, or an ablation's): with `general`, stage 1 protects the base model's
        general knowledge; `contrast` "past" gates the contrastive negative with the domains' importance only;
        `random` permutes every measured importance within its layer."""
        das, parent, index = stage.sections.das, stage.parent, stage.index
        phase = self._adapt_phase("das", parent, stage.domain, objective="das", das=das)
        workdir = files.path(phase.workdir)
        shuffle = (
            (lambda imp, k: importance.shuffled(imp, (phase.seed, index, k))) if das.random else (lambda imp, k: imp)
        )
        past: importance.Importance | None
        domains: importance.Importance | None
        if index > 0:
            past, domains = (importance.load(files.path(parent) / name) for name in (ACCUMULATED, DOMAINS))
        else:
            domains = None
            general = lambda: shuffle(
                self.importance(parent, phase, importance.kl_loss, dropout=self.cfg.das.importance_dropout), 0
            )
            past = self._importance_file(workdir / GENERAL, general) if das.general else None
        contrast = past if das.contrast == "all" else domains
        pretrain(phase, objective=das_objective(past, contrast, das.contrastive_weight, das.temperature))
        own = functools.cache(lambda: shuffle(self.importance(phase.workdir, phase, importance.mlm_loss), 1))
        self._importance_file(workdir / DOMAINS, lambda: importance.accumulate(domains, own()))
        self._importance_file(workdir / ACCUMULATED, lambda: importance.accumulate(past, own()))
        return phase.workdir

    def _regularised(self, stage: Stage, objective: str) -> tuple[ConfigDict, Callable[[], Iterator]]:
        """The stage's phase under `objective` (with the recipe's section of that name), and (when called) each
        earlier stage's model loaded beside a probe phase on its domain's text."""
        phase = self._adapt_phase(
            objective,
            stage.parent,
            stage.domain,
            objective=objective,
            das=stage.sections.das,
            **{objective: self.cfg[objective]},
        )
        return phase, lambda: (
            (self._load(m, phase), self._adapt_phase("probe", m, d))
            for m, d in zip(stage.earlier, stage.earlier_domains)
        )

    def ewc_stage(self, stage: Stage) -> str:
        """EWC: the penalty's Fisher is measured from the earlier stages' models on their domains' text
        (das.importance_batches batches), when it trains. The first stage, with nothing to regularise, is ncl's."""
        if stage.index == 0:
            return self.dapt_stage(stage)
        phase, models = self._regularised(stage, "ewc")

        def past(params):
            fishers = [
                ewc.fisher(m.model, m.params, self._sample(m, probe, phase.seed), m.mesh, m.rules)
                for m, probe in models()
            ]
            return _like(self._load(stage.parent, phase).params, params), _like(ewc.mean(fishers), params)

        pretrain(phase, objective=ewc_objective(past, self.cfg.ewc.lam))
        return phase.workdir

    def derpp_stage(self, stage: Stage) -> str:
        """DER++: the replay buffer is recorded from the earlier stages' models on their domains' text, when it
        trains. The first stage, with nothing to replay, is ncl's."""
        if stage.index == 0:
            return self.dapt_stage(stage)
        phase, models = self._regularised(stage, "derpp")
        section = self.cfg.derpp
        if section.batch_size is not None:
            check_batch_size(
                section.batch_size, make_mesh(phase.mesh.shape, dcn_shape=phase.mesh.dcn_shape), "derpp.batch_size"
            )
        batches = math.ceil(section.buffer_size / stage.sections.das.importance_batch_size)

        def buffer(params):
            return replay.fill(
                [
                    replay.record(m.model, m.params, self._sample(m, probe, phase.seed, batches), m.mesh, m.rules)
                    for m, probe in models()
                ],
                section.buffer_size,
            )

        pretrain(phase, objective=derpp_objective(buffer, section.alpha, section.beta, section.batch_size))
        return phase.workdir

    def hat_stage(self, stage: Stage) -> str:
        """Train on the domain with its HAT embeddings, blocked where the past domains' masks (the parent's
        `HAT_MASKS`) are on; then save its own mask and the accumulated one."""
        section, index = self.cfg.hat, stage.index
        phase = self._adapt_phase("hat", stage.parent, stage.domain, objective="hat", hat=section)
        if phase.train.steps is None:
            raise UserError(
                "hat anneals its gate slope over a stage's steps, so it needs dapt.train.steps (a number "
                "of steps rather than epochs); set --config.dapt.train.steps"
            )
        past = importance.load(files.path(stage.parent) / HAT_MASKS) if index > 0 else None
        pretrain(
            phase,
            objective=hat.hat_objective(index, past, section.c, section.s_max, phase.train.steps),
            module=functools.partial(hat.HatMaskedLM, domain=index),
        )
        workdir = files.path(phase.workdir)
        own = functools.cache(lambda: hat.final_masks(sources.resolve(phase.workdir).params, index, section.s_max))
        self._importance_file(workdir / HAT_DOMAIN, own)
        self._importance_file(workdir / HAT_MASKS, lambda: importance.accumulate(past, own()))
        return phase.workdir

    @staticmethod
    def _importance_file(path: files.Path, compute) -> importance.Importance:
        """The importance saved at `path`, or `compute()`d now (every process) and saved (by the first; the
        others wait for the file, which the next stage reads)."""
        if decide(f"look for {path}", path.exists, timeout=600):  # every host computes, or none
            return importance.load(path)
        value = compute()

        def save():
            path.parent.mkdir(parents=True, exist_ok=True)
            importance.save(path, value)

        on_first_process(f"importance {path}", save)
        return value

    def stages(self, method: str, base: str) -> list[str]:
        """The model (a workdir) after each stage of the sequence."""
        spec, sections, seq = METHODS[method], self.sections(method), list(self.cfg.sequence)
        if spec.train is None:
            return [base] * len(seq)
        models: list[str] = []
        for i, domain in enumerate(seq):
            parent = models[-1] if models and spec.chained else base
            models.append(spec.train(self, Stage(parent, domain, i, tuple(models), tuple(seq[:i]), sections)))
        return models

    def _dapt(self, parent: str, domain: str, template: ConfigDict, label: str, **fields) -> str:
        phase = self._adapt_phase(label, parent, domain, template, **fields)
        pretrain(phase, objective=mlm)
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

    def _sample(self, loaded: _Loaded, phase: ConfigDict, seed: int, batches: int | None = None):
        """`batches` (default das.importance_batches) MLM batches of `phase`'s corpus."""
        tokenizer = load_tokenizer(loaded.source.tokenizer_dir)
        loader = MLMLoader(
            prepare(phase, loaded.source),
            self.cfg.das.importance_batch_size,
            seed,
            special_ids(tokenizer),
            vocab_size=len(tokenizer),
            mask_prob=phase.data.mask_prob,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            prefetch=0,
        )
        return itertools.islice(loader, batches or self.cfg.das.importance_batches)

    def importance(
        self, init: str, phase: ConfigDict, proxy: Callable[[nn.Module], Callable], dropout: float | None = None
    ) -> importance.Importance:
        """Normalised importance of `init`'s units on `phase`'s corpus by `proxy`: importance.kl_loss (general
        knowledge, with `dropout`) or importance.mlm_loss (the domain's)."""
        loaded = self._load(init, phase, dropout)
        loss = proxy(loaded.model)
        raw = importance.measure(
            loss,
            loaded.config,
            loaded.params,
            self._sample(loaded, phase, phase.seed),
            loaded.mesh,
            loaded.rules,
            seed=phase.seed,
        )
        return importance.normalize(raw)

    def domain_losses(self, inits: list[str], domains: list[str]) -> np.ndarray:
        """[init, domain] MLM loss on das.importance_batches batches of each domain's corpus (a forgetting probe;
        every init must share one architecture)."""
        step, losses = None, np.zeros((len(inits), len(domains)))
        for i, init in enumerate(inits):
            loaded = self._load(init, self.cfg.dapt)
            if step is None:
                step = compile_eval_step(
                    make_eval_step(mlm_loss_sums(loaded.model)), loaded.param_shardings, loaded.mesh, loaded.rules
                )
            for j, domain in enumerate(domains):
                batches = self._sample(loaded, self._adapt_phase("probe", init, domain), seed=12345)
                sums = [jax.device_get(step(loaded.params, to_global(b, loaded.mesh))) for b in batches]
                losses[i, j] = sum(s["loss_sum"] for s in sums) / max(sum(s["weight"] for s in sums), 1.0)
        return losses

    def run(self) -> ContinualTable:
        """Run what is missing; after every stage, fine-tune and score every task seen so far. For forward
        transfer, also each task from the model its domain's stage starts from, and from the base model."""
        base, seq = self.base(), list(self.cfg.sequence)
        records = []
        for method in self.cfg.methods:
            how, models = METHODS[method], self.stages(method, base)
            before = [base] + models[:-1] if how.chained else [base] * len(seq)
            for stage in range(len(seq)):
                for task, spec in self.cfg.tasks.items():
                    k = seq.index(spec.domain)
                    if stage >= k:
                        records += self._scores(
                            method,
                            stage,
                            task,
                            models[k if how.own else stage],
                            unit_gates=f"{models[k]}/{how.gates}" if how.gates else "",
                        )
                    if stage == k - 1:
                        records += self._scores(method, stage, task, before[k], when="before")
        for task in self.cfg.tasks:
            records += self._scores("base", -1, task, base, when="base")
        table = ContinualTable.from_records(records, self.cfg.methods, seq, list(self.cfg.tasks))

        def write() -> None:
            write_text(self.root / "continual.md", table.to_markdown())
            write_json(self.root / "continual.json", {**table.to_json(), "records": records})

        on_first_process("write continual.json", write)
        return table

    def _scores(
        self, method: str, stage: int, task: str, init: str, when: str = "after", unit_gates: str = ""
    ) -> list[dict]:
        """One record per seed: `task` fine-tuned from `init` (under `unit_gates`, a HAT domain's mask) and scored
        on its test split. when: "after" (the stage learned the task's domain or an earlier one), "before" (the
        task's domain is next) or "base"."""
        spec, records = self.cfg.tasks[task], []
        for seed in self.cfg.seeds:
            result = finetune(
                phase_config(
                    self.cfg.finetune,
                    self.root / "finetune",
                    f"{task}-s{seed}",
                    init=init,
                    seed=seed,
                    unit_gates=unit_gates,
                    **{
                        "task.path": spec.path,
                        "train.metric": spec.metric,
                        "task.text_field": spec.text_field,
                        "task.label_field": spec.label_field,
                    },
                )
            )
            records.append(
                {
                    "method": method,
                    "stage": stage,
                    "task": task,
                    "seed": seed,
                    "when": when,
                    "score": result["test"][spec.metric],
                }
            )
        return records


@dataclasses.dataclass(frozen=True)
class Method:
    """A continual method, a row of the table. `train(run, stage)` trains one stage and returns its model (a
    `Continual` stage method; None: no adaptation, every stage is the base model); `chained`: a stage starts
    from the previous stage's model, else from the base; `own`: a task is fine-tuned from its domain's stage
    whatever came after, else from the latest; `gates`: the file in that stage's workdir a task is fine-tuned
    and scored under (`unit_gates`); `fields`: what it changes in the recipe's `das` and `dapt` sections."""

    train: Callable[[Continual, Stage], str] | None
    chained: bool = True
    own: bool = False
    gates: str = ""
    fields: tuple[tuple[str, Any], ...] = ()


METHODS: dict[str, Method] = registry(
    CONTINUAL_METHODS,
    {
        "das": Method(Continual.das_stage),
        "ewc": Method(Continual.ewc_stage),
        "derpp": Method(Continual.derpp_stage),
        "das_no_general": Method(Continual.das_stage, fields=(("das.general", False),)),
        "das_no_contrast": Method(Continual.das_stage, fields=(("das.contrastive_weight", 0.0),)),
        "das_past_contrast": Method(Continual.das_stage, fields=(("das.contrast", "past"),)),
        "das_random": Method(Continual.das_stage, fields=(("das.random", True),)),
        "hat": Method(Continual.hat_stage, gates=HAT_DOMAIN),
        "demix": Method(Continual.expert_stage, own=True),
        "ncl": Method(Continual.dapt_stage),
        "one": Method(Continual.dapt_stage, chained=False, own=True),
        # Houlsby adapters, as in DAS's Adapter-ONE baseline (an adapter per domain on a frozen base)
        "adapter_one": Method(Continual.dapt_stage, chained=False, own=True, fields=(("dapt.peft.method", "houlsby"),)),
        "base": Method(None),
    },
)


def synthetic_config(scale: str = "default") -> ConfigDict:
    """The synthetic demo's models and schedules (phases/synthetic.py) over three domains, one task each."""
    from dontstop_jax.phases.synthetic import get_config

    demo, run, domains = get_config(scale), f"runs/continual-{scale}", ("bio", "cs", "news")
    cfg = ConfigDict(
        dict(
            workdir=run,
            base="",
            seeds=demo.seeds[:1] if scale == "tiny" else list(demo.seeds),
            synthetic=demo.synthetic,
            domains={},
            tasks={},
            sequence=list(domains),
            methods=list(METHODS),
            base_pretrain=demo.base_pretrain,
            dapt=demo.dapt,
            finetune=demo.finetune,
            # Parameter paths held fixed in every adaptation stage (e.g. ["lm_head", "roberta/embeddings"], which DAS
            # does not mask), so that forgetting happens where DAS acts.
            frozen=[],
            das=das_config(),
            ewc=ewc_config(),
            derpp=derpp_config(),
            hat=hat_config(),
        )
    )
    cfg.synthetic.update(domains=domains, task_domains=domains)  # the benchmark goes to WORKDIR/benchmark
    if scale == "tiny":  # a smoke run: DAS and its three references (every method: --config.methods=...)
        cfg.das.importance_batches = 4
        cfg.methods = ["das", "ncl", "one", "base"]
    return cfg.lock()
