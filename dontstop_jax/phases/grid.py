"""The paper's experiment grid: variants x tasks x seeds, one results table.

Variants: baseline (fine-tune the base model), dapt (base -> domain MLM -> fine-tune), tapt (base ->
task-text MLM -> fine-tune), dapt_tapt (dapt -> tapt -> fine-tune) and not_dapt (DAPT on an irrelevant
domain, the paper's control); on request transfer_tapt (the paper's Transfer-TAPT, Table 10: fine-tune task B
from the TAPT phase of task A = `tasks.<B>.transfer_from`, another task of B's domain: that very phase,
shared with A's own tapt row). Every phase lives in a directory named by a fingerprint of its config and
of its parent's, so a phase that finished is reused (a domain's DAPT serves all tasks of that domain) and
rerunning the grid only runs what is missing.

Data-selection variants (the paper's Table 8), all from the base model: knn_tapt_{50,150,500} (TAPT on the
task text plus the k domain documents nearest each task example, see phases/select.py), rand_tapt and
dsir_tapt (as many documents as knn_tapt_50 kept, drawn at random / by DSIR: the paper's RAND-TAPT
control samples 50 per task example).

Behavioural fine-tuning variants (phases/behavioral.py): intermediate (STILTs: fine-tune on task
`tasks.<B>.intermediate_from` first, then on B with a new head; dapt_intermediate / tapt_intermediate start
that first fine-tune from B's DAPT / TAPT) and multitask / dapt_multitask (fine-tune with an auxiliary MLM loss
on the task's text, `finetune.multitask`, the alternative to tapt / dapt_tapt).

Low-resource learning curves: `train_sizes` (default ["all"]) lists train-set sizes; each fine-tune of a
numbered size trains on the stratified draw of its seed (finetune's task.train_size; TAPT still reads all of
the task's text, which is unlabeled). Records of a numbered size carry `train_size`; every size gets its table
(results-n<size>.md/.csv/.json; results.* is the largest size's) and learning_curve.json/.md the curves
(analysis/curve.py; the plot: `dontstop analyze`).

Few-shot (LM-BFF's setting): `shots` (e.g. [16, 32, 64]; default [] = off) replaces the numbered train sizes: a
fine-tune of k shots trains on k examples per class and selects on a dev set of k per class, both drawn by its
seed (finetune's task.shots); its records carry `train_size` k and `shots` k, so the tables and the learning
curve are by shots (results-k16.*; the curve's column shows the examples in all in brackets). `heads` (default
[] = finetune.head) crosses the rows with the fine-tuning head: "classifier" or "prompt" (engine/prompt.py;
rows "<variant>/prompt"), so `heads=["classifier", "prompt"]` with `shots=[16, 32, 64]` is the head-vs-prompt
comparison in one table.

Each task also gets its reference scores (analysis/reference.py: majority class, bag-of-words LR, LR on the
base model's averaged input embeddings; no contextual model), per train size and draw,
kept in records.json beside the per-seed records, so the table can be rebuilt from that file alone. They are
computed once per task and reused, like a phase, from GRID/references/ (fitting the bag-of-words model on
180K sentences, RCT's size, takes about 1.5 minutes on 2 CPU cores). A record is flagged `dev_at_majority` by the rule
fine-tuning uses, from its best dev score and the task's majority-class dev score (so phases finished before
the flag existed get it too).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

from ml_collections import ConfigDict

from dontstop_jax import config_loader, files
from dontstop_jax.analysis import reference
from dontstop_jax.analysis.curve import ALL, Size, by_size, learning_curves, size_order, write_learning_curves
from dontstop_jax.analysis.metrics import check_metric
from dontstop_jax.data import load_task, load_tokenizer
from dontstop_jax.data.tasks import require_splits, with_shots, with_train_size
from dontstop_jax.data.tokenizer import encode_plain
from dontstop_jax.distributed import decide, on_first_process
from dontstop_jax.engine.peft import METHODS, check_method
from dontstop_jax.errors import UserError
from dontstop_jax.fields import GRID_VARIANTS, HEADS, registry
from dontstop_jax.files import read_json, write_json
from dontstop_jax.phases.behavioral import (
    intermediate_label,
    intermediate_source,
)
from dontstop_jax.phases.finetune import finetune
from dontstop_jax.phases.pretrain import pretrain
from dontstop_jax.phases.select import select, selected_corpus
from dontstop_jax.train.source import resolve
from dontstop_jax.train.workdir import digest, phase_directory, place_identity


def phase_config(template: ConfigDict, root: files.Path, label: str, **fields: Any) -> ConfigDict:
    """A copy of `template` named `label` with the dotted `fields` set (a misspelled one is an error, never a new
    field), in a directory named by its fingerprint under `root` (GRID/pretrain, GRID/finetune, ...; process 0's
    choice: hosts may hold the data under other paths). Pretraining phases without a data.cache_dir share
    GRID/cache, so the run writes nothing outside GRID."""
    cfg = config_loader.set_fields(copy.deepcopy(template), {**fields, "name": label})
    cfg.workdir = decide(f"place the phase {label}", lambda: str(phase_directory(cfg, root, label)), timeout=600)
    if "data" in cfg and "cache_dir" in cfg.data and cfg.data.cache_dir is None:
        cfg.data.cache_dir = str(root.parent / "cache")
    return cfg


def _row(variant: str, method: str, head: str) -> str:
    """A results row: the variant, then its PEFT method and head where not the defaults ("dapt/lora/prompt")."""
    return "/".join([variant, *([method] if method != "full" else []), *([head] if head != "classifier" else [])])


def base_model(cfg: ConfigDict, root: files.Path) -> str:
    """The base model: a Hugging Face directory, or (synthetic default) a model pretrained from scratch."""
    if cfg.base_pretrain.init != "scratch":
        return cfg.base
    phase = phase_config(cfg.base_pretrain, root / "pretrain", "base")
    pretrain(phase)
    return phase.workdir


class Grid:
    """Plans and runs the phases of a grid config (see configs/grid.py and configs/synthetic.py)."""

    def __init__(self, cfg: ConfigDict):
        self.cfg = cfg
        self.root = files.path(cfg.workdir)
        if unknown := set(cfg.variants) - set(VARIANTS):
            raise UserError(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
        chosen = [VARIANTS[v] for v in cfg.variants]
        if any(v.selection for v in chosen) and "select" not in cfg:
            raise UserError("selection variants need a `select` section in the grid config (see configs/grid.py)")
        for name, task in cfg.tasks.items():
            check_metric(task.metric, f"tasks.{name}.metric")
            if task.domain not in cfg.domains:
                raise UserError(
                    f"task {name} names domain {task.domain!r}, which is not in grid.domains "
                    f"{sorted(cfg.domains)}; add its corpus or fix the name"
                )
        links = {v.link for v in chosen}
        for name, task in cfg.tasks.items():
            for link, check in (
                ("transfer_from", self.transfer_source),
                ("intermediate_from", lambda t: intermediate_source(cfg.tasks, t)),
            ):
                if link in links or task.get(link):
                    check(name)
        self._embeds: dict[str, reference.Embed] = {}

    def transfer_source(self, task: str) -> str:
        """Transfer-TAPT's task A for task B=`task`: tasks.<B>.transfer_from, another task of B's domain."""
        spec, source = self.cfg.tasks[task], self.cfg.tasks[task].get("transfer_from") or ""
        if source == task or source not in self.cfg.tasks or self.cfg.tasks[source].domain != spec.domain:
            others = sorted(t for t, s in self.cfg.tasks.items() if s.domain == spec.domain and t != task)
            raise UserError(
                f"tasks.{task}.transfer_from={source!r}: transfer_tapt needs another task of {task}'s "
                f"domain {spec.domain!r}; set it to one of {others}"
                if others
                else f"tasks.{task}.transfer_from={source!r}: transfer_tapt needs another task of {task}'s "
                f"domain {spec.domain!r}, and the grid has none; add one or drop transfer_tapt"
            )
        return source

    def train_sizes(self) -> list[Size]:
        """The grid's train sizes, smallest first ("all", the whole train split, is the only one by default); in a
        few-shot grid its shots (examples per class)."""
        if shots := list(self.cfg.get("shots") or []):
            if [s for s in self.cfg.get("train_sizes") or [] if s != ALL]:
                raise UserError("shots and numbered train_sizes are two kinds of learning curve; set one of them")
            return sorted(shots)
        return sorted(self.cfg.get("train_sizes") or [ALL], key=size_order)

    def heads(self) -> list[str]:
        """The grid's fine-tuning heads (classifier, prompt); default: finetune.head."""
        heads = list(self.cfg.get("heads") or [self.cfg.finetune.head])
        if unknown := set(heads) - set(HEADS):
            raise UserError(f"heads {sorted(unknown)} are unknown; use {', '.join(HEADS)}")
        return heads

    def base(self) -> str:
        return base_model(self.cfg, self.root)

    def dapt(self, parent: str, domain: str) -> str:
        phase = phase_config(
            self.cfg.dapt,
            self.root / "pretrain",
            f"dapt-{domain}",
            init=parent,
            **{"data.sources": list(self.cfg.domains[domain])},
        )
        pretrain(phase)
        return phase.workdir

    def tapt(self, parent: str, task: str, selection: str | None = None) -> str:
        """TAPT on the task's unlabeled text, plus the documents of a selection variant if one is named."""
        spec = self.cfg.tasks[task]
        sources = [
            s.path for s in load_task(spec.path, text_field=spec.text_field, label_field=spec.label_field).tapt_sources
        ]
        if selection:
            sources.append(selected_corpus(self.selection(task, selection)))
        phase = phase_config(
            self.cfg.tapt,
            self.root / "pretrain",
            "-".join(filter(None, ["tapt", task, selection])),
            init=parent,
            **{"data.sources": sources},
            **self.task_overrides(task, "tapt"),
        )
        pretrain(phase)
        return phase.workdir

    def selection(self, task: str, variant: str) -> str:
        """The workdir of the task's `select` phase for a selection variant (run if missing)."""
        spec, plan = self.cfg.tasks[task], VARIANTS[variant].selection
        assert plan is not None, f"{variant} is not a selection variant"
        size = {"k": plan["k"]} if "k" in plan else {"n_from": self.selection(task, plan["size_of"])}
        phase = phase_config(
            self.cfg.select,
            self.root / "select",
            f"select-{task}-{variant}",
            method=plan["method"],
            sources=list(self.cfg.domains[spec.domain]),
            **size,
            **{"task.path": spec.path, "task.text_field": spec.text_field, "task.label_field": spec.label_field},
        )
        select(phase)
        return phase.workdir

    def start_point(self, variant: str, task: str, base: str) -> str:
        """The model `variant`'s rows of `task` fine-tune from (its phases run if missing)."""
        return VARIANTS[variant].start(self, task, base)

    def domain_dapt(self, task: str, base: str) -> str:
        return self.dapt(base, self.cfg.tasks[task].domain)

    def not_dapt(self, task: str, base: str) -> str:
        """DAPT on the task's irrelevant domain (the paper's control)."""
        other = self.cfg.tasks[task].irrelevant_domain
        if other not in self.cfg.domains or other == self.cfg.tasks[task].domain:
            raise UserError(
                f"not_dapt for task {task} needs tasks.{task}.irrelevant_domain to name another "
                f"domain of {sorted(self.cfg.domains)}"
            )
        return self.dapt(base, other)

    def intermediate(self, task: str, start: str, base: str) -> str:
        """The workdir of the intermediate task's fine-tune for target `task` (phases/behavioral.py): fully
        fine-tuned on all its train set from `start`'s start point of the target, with the grid's first seed."""
        source = intermediate_source(self.cfg.tasks, task)
        phase = self.finetune_phase(
            source, intermediate_label(start, task), self.start_point(start, task, base), self.cfg.seeds[0]
        )
        finetune(phase)
        return phase.workdir

    def finetune_phase(
        self,
        task: str,
        variant: str,
        init: str,
        seed: int,
        size: Size = ALL,
        method: str = "full",
        head: str = "classifier",
        early: list[float] | None = None,
        fields: tuple[tuple[str, Any], ...] = (),
    ) -> ConfigDict:
        """The fine-tuning phase of one grid row (task, variant, train size or shots, method, head) and seed;
        `early`: the early dev scores of the row's seeds run before it (seed discarding); `fields`: the
        variant's own (`Variant.fields`)."""
        spec, shots = self.cfg.tasks[task], bool(self.cfg.get("shots"))
        per_task = {
            "task.path": spec.path,
            "train.metric": spec.metric,
            "task.text_field": spec.text_field,
            "task.label_field": spec.label_field,
        }
        if spec.get("epochs"):
            per_task["train.epochs"] = spec.epochs
        draw = {"task.shots": size} if shots and size != ALL else {"task.train_size": 0 if size == ALL else size}
        name = "-".join(
            [
                task,
                _row(variant, method, head).replace("/", "-"),
                *([] if size == ALL else [f"{'k' if shots else 'n'}{size}"]),
                f"s{seed}",
            ]
        )
        return phase_config(
            self.cfg.finetune,
            self.root / "finetune",
            name,
            init=init,
            seed=seed,
            **{
                **per_task,
                **draw,
                "head": head,
                **self.task_overrides(task, "finetune"),
                **self.method_overrides(method),
                "peft.method": self.peft_method(method),
                **self.discard(early or []),
                **dict(fields),
            },
        )

    def methods(self) -> list[str]:
        """The grid's `methods` dimension; default: finetune.peft's. An entry is a PEFT method (full, lora, ...)
        or a name of your own for a fine-tuning setup that `method_overrides` defines (e.g. "r3f" with
        {"regularizer": {"method": "r3f"}}), so that setups are rows of one table."""
        names = list(self.cfg.get("methods") or [self.cfg.finetune.peft.method])
        overrides = self.cfg.get("method_overrides") or {}
        for name in names:
            if name not in overrides:
                check_method(name)
        if len(set(names)) < len(names):
            raise UserError(f"methods {names} lists a name twice; each is one row of the table")
        return names

    def peft_method(self, method: str) -> str:
        """The PEFT method a `methods` entry fine-tunes with: itself, or (a named setup) its override's
        peft.method, else finetune.peft.method."""
        if method in METHODS:
            return method
        return check_method(self.method_overrides(method).get("peft.method", self.cfg.finetune.peft.method))

    def method_overrides(self, method: str) -> dict[str, Any]:
        """Fine-tuning fields set for one method only, as dotted keys: `method_overrides` maps a method to a
        part of the fine-tuning config, e.g. {"lora": {"optim": {"learning_rate": 1e-3}, "train": {"epochs": 20}}}
        (parameter-efficient methods usually want a larger learning rate and more epochs than full
        fine-tuning). Unknown methods or fields are errors, not silently new config fields."""
        overrides = self.cfg.get("method_overrides") or {}
        if unknown := set(overrides) - set(self.methods()):
            raise UserError(f"method_overrides names {sorted(unknown)}, which are not in methods {self.methods()}")

        def flatten(part: Any, template: Any, prefix: str) -> dict[str, Any]:
            fields = {}
            for key, value in part.items():
                if not isinstance(template, ConfigDict) or key not in template:
                    raise UserError(
                        f"method_overrides.{method} sets {prefix + key!r}, which is not a fine-tuning "
                        "config field (see configs/finetune.py)"
                    )
                if isinstance(value, (dict, ConfigDict)) and isinstance(template[key], ConfigDict):
                    fields.update(flatten(value, template[key], f"{prefix}{key}."))
                else:
                    fields[prefix + key] = value
            return fields

        return flatten(overrides.get(method) or {}, self.cfg.finetune, "")

    def task_overrides(self, task: str, phase: str) -> dict[str, Any]:
        """The fields `tasks.<task>.overrides.<phase>` sets on that task's TAPT or fine-tuning phases (checked
        when the config loads), e.g. more TAPT epochs for a small task, a step cap per epoch for a large one."""
        part = (self.cfg.tasks[task].get("overrides") or {}).get(phase) or {}
        return part.to_dict() if isinstance(part, ConfigDict) else dict(part)

    def discard(self, early: list[float]) -> dict[str, Any]:
        """Dodge et al. 2020, run seed by seed: after `seed_discard.fraction` of training, stop a seed whose dev
        score is below the `keep`-th best early score of the seeds run before it (the first `keep` always run)."""
        rule = self.cfg.get("seed_discard")
        if not rule or not rule.fraction:
            return {}
        best = sorted(early, reverse=True)
        return {
            "train.discard_fraction": rule.fraction,
            "train.discard_below": best[rule.keep - 1] if len(best) >= rule.keep else None,
        }

    def static_vectors(self, base: str) -> reference.Embed:
        """The base model's input embeddings averaged over a text's tokens (the static word vectors reference)."""
        if base not in self._embeds:
            source = resolve(base)
            table = source.params["roberta"]["embeddings"]["word_embeddings"]["embedding"]
            tokenizer = load_tokenizer(source.tokenizer_dir)
            self._embeds[base] = reference.mean_embeddings(table, lambda texts: encode_plain(tokenizer, texts))
        return self._embeds[base]

    def references(self, task: str, base: str, size: Size = ALL, draw: int | None = None) -> list[dict[str, Any]]:
        """The task's reference records, {"task", "reference", "train_examples", "dev": metrics, "test": metrics}
        each (plus "train_size" and "draw" on the stratified draw `draw` of a numbered `size`): computed once,
        then read from a file named by a fingerprint of the task's files, the base model, the train set and the
        references' settings."""
        spec, shots = self.cfg.tasks[task], bool(self.cfg.get("shots"))
        sized = {} if size == ALL else {"train_size": size, "draw": draw, **({"shots": size} if shots else {})}
        key = {
            "path": spec.path,
            "text_field": spec.text_field,
            "label_field": spec.label_field,
            "max_words": reference.MAX_WORDS,
            "steps": reference.STEPS,
            "base": base,
            **sized,
        }
        where, found = decide(
            f"look for the references of {task}", lambda: self._references_file(task, key), timeout=600
        )  # every host computes them, or none
        path = files.path(where)
        if found:
            return read_json(path)["references"]
        data = load_task(spec.path, text_field=spec.text_field, label_field=spec.label_field)
        require_splits(data, "scoring the references")
        if size != ALL:
            assert isinstance(size, int) and draw is not None  # a numbered size has its draw
            data = (with_shots if shots else with_train_size)(data, size, draw)
        references = [
            {"task": task, **sized, "train_examples": len(data.splits["train"][0]), **ref}
            for ref in reference.task_references(data.splits, len(data.label_names), self.static_vectors(base))
        ]
        on_first_process(f"write {path}", lambda: write_json(path, {"references": references}))
        return references

    def _references_file(self, task: str, key: dict[str, Any]) -> tuple[str, bool]:
        """(the file of the references `key` names, whether it is there): named by what the task's files and the
        base model hold, or (an older version's, in place) by their paths."""
        held = {**key, "path": place_identity(key["path"]), "base": place_identity(key["base"])}
        new = self.root / "references" / f"{task}-{digest(held)}.json"
        legacy = self.root / "references" / f"{task}-{digest(key)}.json"
        found = next((p for p in (new, legacy) if p.exists()), None)
        return str(found or new), found is not None

    def run(self) -> Any:
        """Run what is missing; returns the results table of the largest train size (raw per-seed records in
        `self.records`)."""
        base = self.base()
        records: list[dict[str, Any]] = []
        self.records = records
        references, sizes, shots = [], self.train_sizes(), bool(self.cfg.get("shots"))
        for task, spec in self.cfg.tasks.items():
            # (size, draw) -> the task's references; the majority class's dev score flags a fine-tune of that draw
            task_refs = {
                (size, draw): self.references(task, base, size, draw)
                for size in sizes
                for draw in ([None] if size == ALL else self.cfg.seeds)
            }
            references += [ref for refs in task_refs.values() for ref in refs]
            majority_dev = {
                k: next(r for r in refs if r["reference"] == reference.MAJORITY)["dev"][spec.metric]
                for k, refs in task_refs.items()
            }
            for variant in self.cfg.variants:
                init = self.start_point(variant, task, base)
                for size, method, head in ((s, m, h) for s in sizes for m in self.methods() for h in self.heads()):
                    label = _row(variant, method, head)
                    early: list[float] = []
                    sized = {} if size == ALL else {"train_size": size, **({"shots": size} if shots else {})}
                    for seed in self.cfg.seeds:
                        result = finetune(
                            self.finetune_phase(
                                task, variant, init, seed, size, method, head, early, VARIANTS[variant].fields
                            )
                        )
                        if result.get("early_dev") is not None:
                            early.append(result["early_dev"])
                        records.append(
                            {
                                "task": task,
                                "variant": label,
                                **sized,
                                "seed": seed,
                                "metrics": result["test"],
                                "discarded": result.get("discarded", False),
                                "dev_at_majority": reference.at_majority_level(
                                    result["dev"][spec.metric], majority_dev[(size, None if size == ALL else seed)]
                                ),
                                "extras": {
                                    k: result[k]
                                    for k in ("trainable_params", "seconds_per_epoch")
                                    if result.get(k) is not None
                                },
                            }
                        )
        order = [_row(v, m, h) for v in self.cfg.variants for m in self.methods() for h in self.heads()]
        metric_by_task = {t: s.metric for t, s in self.cfg.tasks.items()}
        tables = by_size(records, references, metric_by_task, order, sizes)
        on_first_process("write the results", lambda: self.write(tables, records, references, order))
        return tables[sizes[-1]]

    def write(self, tables: dict[Size, Any], records: list[dict], references: list[dict], order: list[str]) -> None:
        """The results tables (one per train size), the learning curves and the raw records, in GRID."""
        sizes, shots = self.train_sizes(), bool(self.cfg.get("shots"))
        for size, table in tables.items():
            if size != ALL:
                table.write_all(self.root, stem=f"results-{'k' if shots else 'n'}{size}")
        tables[sizes[-1]].write_all(self.root)
        if sizes != [ALL]:
            metric_by_task = {t: s.metric for t, s in self.cfg.tasks.items()}
            write_learning_curves(self.root, learning_curves(records, references, metric_by_task, order))
        write_json(self.root / "records.json", {"records": records, "references": references})


@dataclasses.dataclass(frozen=True)
class Variant:
    """A grid variant, a kind of row. `start(grid, task, base)`: the model its rows of `task` fine-tune from (its
    phases run if missing); `fields`: the fine-tuning fields it sets on its rows; `selection`: a selection
    variant's `select` phase, its method and k or (rand/dsir) the variant whose size it matches; `link`: the task
    field naming another task it needs (checked for every task when it is chosen)."""

    start: Callable[[Grid, str, str], str]
    fields: tuple[tuple[str, Any], ...] = ()
    selection: dict[str, Any] | None = None
    link: str = ""


def _selection(variant: str, **plan: Any) -> Variant:
    """TAPT on the task text plus the documents the `select` phase `plan` keeps for it (phases/select.py)."""
    return Variant(lambda grid, task, base: grid.tapt(base, task, variant), selection=plan)


def _intermediate(start: str) -> Variant:
    """STILTs from `start`'s start point (phases/behavioral.py): the target fine-tuned with a fresh head."""
    return Variant(
        lambda grid, task, base: grid.intermediate(task, start, base),
        (("train.fresh_head", True),),
        link="intermediate_from",
    )


def _multitask(start: str) -> Variant:
    """`start`'s start point fine-tuned with the auxiliary MLM loss on the task's text (phases/behavioral.py)."""
    return Variant(lambda grid, task, base: grid.start_point(start, task, base), (("multitask.method", "mlm"),))


VARIANTS: dict[str, Variant] = registry(
    GRID_VARIANTS,
    {
        "baseline": Variant(lambda grid, task, base: base),
        "dapt": Variant(lambda grid, task, base: grid.domain_dapt(task, base)),
        "tapt": Variant(lambda grid, task, base: grid.tapt(base, task)),
        "dapt_tapt": Variant(lambda grid, task, base: grid.tapt(grid.domain_dapt(task, base), task)),
        "not_dapt": Variant(Grid.not_dapt),
        # the paper's Transfer-TAPT: needs tasks.<t>.transfer_from, so only on request
        "transfer_tapt": Variant(
            lambda grid, task, base: grid.tapt(base, grid.transfer_source(task)), link="transfer_from"
        ),
        "knn_tapt_50": _selection("knn_tapt_50", method="knn", k=50),
        "knn_tapt_150": _selection("knn_tapt_150", method="knn", k=150),
        "knn_tapt_500": _selection("knn_tapt_500", method="knn", k=500),
        "rand_tapt": _selection("rand_tapt", method="rand", size_of="knn_tapt_50"),
        "dsir_tapt": _selection("dsir_tapt", method="dsir", size_of="knn_tapt_50"),
        "intermediate": _intermediate("baseline"),
        "dapt_intermediate": _intermediate("dapt"),
        "tapt_intermediate": _intermediate("tapt"),
        "multitask": _multitask("baseline"),
        "dapt_multitask": _multitask("dapt"),
    },
)
