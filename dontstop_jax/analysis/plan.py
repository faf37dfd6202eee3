"""Ahead-of-time cost of a phase's real train step on a device set it never runs on (a TPU slice described by
libtpu on a CPU machine): XLA's own memory and FLOP accounting, the collectives in the compiled program, and a
roofline estimate of the step time. No data, tokenizer or weights are read; inputs are abstract.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from ml_collections import ConfigDict

from dontstop_jax import files
from dontstop_jax.analysis.hlo import collectives, count
from dontstop_jax.engine import (
    StepSpec,
    abstract_state,
    batch_sharding,
    classification_loss_sums,
    compile_predict_step,
    compile_train_step,
    make_mesh,
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
        return ModelConfig.recorded(
            Checkpointer(init / "checkpoints", read_only=True).meta()["model_config"], **runtime
        )
    return ModelConfig(**fields)


def batch_shapes(cfg: ConfigDict, model: ModelConfig, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch a phase's loader builds, as shapes on the mesh's batch sharding."""
    seq = min(cfg.data.max_seq_length, model.max_seq_length)
    if "task" in cfg:
        cols = [
            ("input_ids", seq, "int32"),
            ("attention_mask", seq, "int32"),
            ("labels", None, "int32"),
            ("example_weights", None, "float32"),
        ]
    else:
        slots = math.ceil(cfg.data.mask_prob * seq)
        cols = [
            ("input_ids", seq, "int32"),
            ("attention_mask", seq, "int32"),
            ("mlm_positions", slots, "int32"),
            ("mlm_ids", slots, "int32"),
            ("mlm_weights", slots, "float32"),
        ]
    rows = batch_sharding(mesh)
    return {
        k: jax.ShapeDtypeStruct((cfg.train.batch_size,) + ((n,) if n else ()), d, sharding=rows) for k, n, d in cols
    }


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
    step = compile_train_step(spec, shardings, mesh, rules)
    state, batch = abstract_state(shardings, model, tx), batch_shapes(cfg, arch, mesh)
    with activation_rules(mesh, rules):
        train = _cost(step.__wrapped__.lower(state, batch, spec.arguments))  # type: ignore[attr-defined]  # set by functools.wraps
        predict = None
        if finetune:
            predict = _cost(
                compile_predict_step(model, shardings.params, mesh, rules).__wrapped__.lower(  # type: ignore[attr-defined]
                    state.params, batch
                )
            )
    params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(state.params))
    return train, predict, params


def _cost(lowered: Any) -> StepCost:
    """XLA's memory accounting of the compiled program; FLOPs, HBM bytes and collectives (per chip) counted with
    every loop's trip count (analysis/hlo.py)."""
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    text = compiled.as_text()
    return StepCost(
        m.argument_size_in_bytes,
        m.temp_size_in_bytes,
        total,
        _flops(lowered, compiled),
        count(text).bytes_accessed,
        collectives(text),
    )


def _flops(lowered: Any, compiled: Any) -> float:
    """Per chip: XLA's count for the compiled program (each loop body once; TPU dots are convolutions there) times
    how much the loops multiply the program's dots (counted on the program before partitioning, where they are
    dots; shard_map bodies have per-device shapes there, other dots global ones, and the ratio is the same)."""
    xla = compiled.cost_analysis()
    xla = float((xla[0] if isinstance(xla, list) else xla).get("flops", 0.0))
    dots = count(lowered.as_text(dialect="hlo"))
    return xla * dots.flops / dots.flops_once if dots.flops_once else xla


def between(lo: tuple[int, StepCost], hi: tuple[int, StepCost], accum: int) -> StepCost:
    """The step's cost at `accum` micro-batches, estimated from two compiles of the same step (same global batch) at
    accumulation counts lo < hi (interpolated between them, or extrapolated below lo). Per step, FLOPs, HBM traffic
    and collectives are affine in the count (the tokens are the same; every micro-batch reads the weights again,
    and gathers them where they are sharded), and the temporaries affine in its inverse (they hold one
    micro-batch's activations)."""
    (a, x), (b, y) = lo, hi

    def line(u: float, v: float, at: float, p: float, q: float) -> float:
        return max(u + (v - u) * (at - p) / (q - p), 0.0)

    temp = round(line(x.temp_bytes, y.temp_bytes, 1 / accum, 1 / a, 1 / b))
    kinds = set(x.collectives) | set(y.collectives)
    return StepCost(
        y.argument_bytes,
        temp,
        y.total_bytes + temp - y.temp_bytes,
        line(x.flops, y.flops, accum, a, b),
        line(x.bytes_accessed, y.bytes_accessed, accum, a, b),
        {
            k: (pair[0], pair[1])
            for k in kinds
            for pair in [
                [
                    round(line(x.collectives.get(k, (0, 0))[i], y.collectives.get(k, (0, 0))[i], accum, a, b))
                    for i in (0, 1)
                ]
            ]
        },
    )
