"""Ahead-of-time cost of a phase's real train step on a device set it never runs on (a TPU slice described by
libtpu on a CPU machine): XLA's own memory and FLOP accounting, the collectives in the compiled program, and a
roofline estimate of the step time. No data, tokenizer or weights are read; inputs are abstract.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from dontstop_jax import files
from dontstop_jax.analysis.hlo import COLLECTIVES, count, shape_bytes
from dontstop_jax.engine import (
    StepSpec,
    abstract_state,
    batch_sharding,
    classification_loss_sums,
    compile_predict_step,
    compile_train_step,
    make_mesh,
    make_train_step,
    mlm_loss_sums,
    state_shardings,
)
from dontstop_jax.engine.checkpoint import Checkpointer
from dontstop_jax.engine.peft import plan as peft_plan
from dontstop_jax.engine.sharding import activation_rules
from dontstop_jax.model import ModelConfig, RobertaForMaskedLM, RobertaForSequenceClassification, hub
from dontstop_jax.model.hf_io import read_config

_RUNTIME = ("dtype", "remat", "attention_impl", "attention_probs_dropout_prob")


@dataclasses.dataclass
class StepCost:
    """Per chip, per step: HBM bytes (arguments = state + batch), FLOPs and HBM traffic, collectives; loops
    counted as often as they run."""
    argument_bytes: int
    temp_bytes: int
    total_bytes: int
    flops: float
    bytes_accessed: float
    collectives: dict[str, tuple[int, int]]  # op -> (count per step, bytes per step)


def model_config(cfg: ConfigDict) -> ModelConfig:
    """The architecture `init` names without reading its weights: a Hugging Face directory's config.json (local,
    gs:// or a Hub id), or the model a phase workdir's checkpoint recorded; else (scratch, or an init not
    reachable from here) `model.*` over roberta-base's shape."""
    fields = {k: v for k, v in cfg.model.items() if v is not None}
    runtime = {k: v for k, v in fields.items() if k in _RUNTIME}
    if cfg.init in ("", "scratch"):
        return ModelConfig(**fields)
    if hub.looks_like_hub_id(cfg.init):
        return read_config(hub.config_only(cfg.init), **runtime)
    init = files.path(cfg.init)
    if (init / "config.json").exists():
        return read_config(files.localize(init / "config.json").parent, **runtime)
    if (init / "checkpoints").is_dir():
        return ModelConfig.recorded(Checkpointer(init / "checkpoints", read_only=True).meta()["model_config"],
                                    **runtime)
    return ModelConfig(**fields)


def batch_shapes(cfg: ConfigDict, model: ModelConfig, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch a phase's loader builds, as shapes on the mesh's batch sharding."""
    seq = min(cfg.data.max_seq_length, model.max_seq_length)
    if "task" in cfg:
        cols = [("input_ids", seq, "int32"), ("attention_mask", seq, "int32"), ("labels", None, "int32"),
                ("example_weights", None, "float32")]
    else:
        slots = math.ceil(cfg.data.mask_prob * seq)
        cols = [("input_ids", seq, "int32"), ("attention_mask", seq, "int32"), ("mlm_positions", slots, "int32"),
                ("mlm_ids", slots, "int32"), ("mlm_weights", slots, "float32")]
    rows = batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct((cfg.train.batch_size,) + ((n,) if n else ()), d, sharding=rows)
            for k, n, d in cols}


def compile_phase(cfg: ConfigDict, devices: list, num_labels: int = 2) -> tuple[StepCost, StepCost | None, int]:
    """Compile the phase's train step (and, for fine-tuning, its predict step) for `devices` with the Trainer's
    own builders; returns (train cost, predict cost or None, parameter count)."""
    mesh = make_mesh(cfg.mesh.shape, devices, dcn_shape=cfg.mesh.dcn_shape)
    rules = tuple(tuple(r) for r in cfg.mesh.rules)
    arch, adaptation = peft_plan(cfg, model_config(cfg))
    finetune = "task" in cfg
    model = RobertaForSequenceClassification(arch, num_labels) if finetune else RobertaForMaskedLM(arch)
    tx, schedule = adaptation.optimizer(cfg.optim, cfg.train.get("steps") or 1000)  # fine-tuning has no steps
    shardings = state_shardings(model, tx, mesh, rules, allow_replicated=cfg.mesh.get("allow_replicated", False))
    loss = classification_loss_sums(model) if finetune else mlm_loss_sums(model)
    spec = StepSpec.for_phase(cfg, loss, tx, schedule, devices[0].platform, adaptation.hooks())
    step = compile_train_step(make_train_step(spec), shardings, mesh, rules)
    state, batch = abstract_state(shardings, model, tx), batch_shapes(cfg, arch, mesh)
    with activation_rules(mesh, rules):
        train = _cost(step.__wrapped__.lower(state, batch))  # type: ignore[attr-defined]  # set by functools.wraps
        predict = None
        if finetune:
            predict = _cost(compile_predict_step(model, shardings.params, mesh, rules).__wrapped__.lower(  # type: ignore[attr-defined]
                state.params, batch))
    params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(state.params))
    return train, predict, params


def _cost(lowered: Any) -> StepCost:
    """XLA's memory accounting of the compiled program; FLOPs, HBM bytes and collectives (per chip) counted with
    every loop's trip count (analysis/hlo.py)."""
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    text = compiled.as_text()
    return StepCost(m.argument_size_in_bytes, m.temp_size_in_bytes, total, _flops(lowered, compiled),
                    count(text).bytes_accessed, collectives(text))


def _flops(lowered: Any, compiled: Any) -> float:
    """Per chip: XLA's count for the compiled program (each loop body once; TPU dots are convolutions there) times
    how much the loops multiply the program's dots (counted on the program before partitioning, where they are
    dots; shard_map bodies have per-device shapes there, other dots global ones, and the ratio is the same)."""
    xla = compiled.cost_analysis()
    xla = float((xla[0] if isinstance(xla, list) else xla).get("flops", 0.0))
    dots = count(lowered.as_text(dialect="hlo"))
    return xla * dots.flops / dots.flops_once if dots.flops_once else xla


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op of a compiled program: result bytes, executions per step (while-loop trip counts
    multiplied), whether it sits in a while loop's body, and its device groups (indices into the compile's
    device assignment, i.e. the mesh's devices in order; () = all devices)."""
    kind: str
    nbytes: int
    times: int
    in_loop: bool
    groups: tuple[tuple[int, ...], ...]


def collective_ops(hlo: str) -> list[Collective]:
    """Every collective of one execution of an HLO module, repeating those in while loops (the layer scan,
    accumulation) by their trip count: the constant their condition compares the counter with (compiled TPU
    HLO carries no known_trip_count)."""
    bodies: dict[str, list] = {}
    calls: dict[str, list] = {}
    bounds: dict[str, int] = {}
    current = None
    for line in hlo.splitlines():
        if line[:1] not in ("", " ", "}") and line.rstrip().endswith("{"):
            current = "ENTRY" if line.startswith("ENTRY") else line.split()[0].lstrip("%")
            bodies[current], calls[current] = [], []
            continue
        if current is None:
            continue
        if (bound := re.search(r"s32\[\]\S* constant\((\d+)\)", line)) and current not in bounds:
            bounds[current] = int(bound.group(1))
        if op := re.search(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(", line):
            bodies[current].append((op.group(2), shape_bytes(op.group(1), largest=bool(op.group(3))),
                                    _replica_groups(line)))
        if loop := re.search(r"condition=%?([\w.\-]+), body=%?([\w.\-]+)", line):
            calls[current].append((loop.group(2), loop.group(1)))
        for callee in re.findall(r"(?:calls|to_apply|branch_computations)=\{?%?([\w.\-]+)", line):
            calls[current].append((callee, None))
    found: list[Collective] = []

    def walk(name: str, times: int, in_loop: bool) -> None:
        found.extend(Collective(kind, nbytes, times, in_loop, groups) for kind, nbytes, groups in bodies.get(name, []))
        for callee, condition in calls.get(name, []):
            walk(callee, times * (bounds.get(condition, 1) if condition else 1), in_loop or condition is not None)
    walk("ENTRY", 1, False)
    return found


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
    """(count, bytes) per collective kind in one execution of an HLO module (see collective_ops)."""
    totals: dict[str, list[int]] = {}
    for op in collective_ops(hlo):
        entry = totals.setdefault(op.kind, [0, 0])
        entry[0] += op.times
        entry[1] += op.times * op.nbytes
    return {k: (c, b) for k, (c, b) in totals.items()}


def _iota(dims: str, perm: str | None) -> np.ndarray:
    """An HLO iota device list: arange over `dims`, transposed by `perm`."""
    shape = [int(d) for d in dims.split(",")]
    ids = np.arange(math.prod(shape)).reshape(shape)
    return ids.transpose([int(p) for p in perm.split(",")]) if perm else ids


def _replica_groups(line: str) -> tuple[tuple[int, ...], ...]:
    """The device groups of a collective in any of XLA's three spellings: explicit lists ({{0,1},{2,3}}), an
    iota ([2,4]<=[4,2]T(1,0)), or mesh axes (mesh['a'=2,'b'=4], device_ids=([8]) {'b'})."""
    if m := re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line):
        return tuple(tuple(int(i) for i in g.split(",") if i) for g in re.findall(r"\{([\d,]*)\}", m.group(1)))
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line):
        return tuple(map(tuple, _iota(m.group(3), m.group(4)).reshape(int(m.group(1)), int(m.group(2))).tolist()))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\], device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\) "
                      r"\{([^}]*)\}", line):
        axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        grouped = re.findall(r"'(\w+)'", m.group(4))
        ids = _iota(m.group(2), m.group(3)).reshape([int(n) for _, n in axes])
        order = [i for i, (a, _) in enumerate(axes) if a not in grouped] + \
            [i for i, (a, _) in enumerate(axes) if a in grouped]
        size = math.prod(int(n) for a, n in axes if a in grouped)
        return tuple(map(tuple, ids.transpose(order).reshape(-1, size).tolist()))
    return ()

