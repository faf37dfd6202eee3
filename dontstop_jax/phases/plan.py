"""`dontstop plan`: will this phase fit, and how long will it take, on a TPU slice nobody has paid for yet?

Compiles the phase's real step for the slice (analysis/plan.py) and prints per-chip memory, FLOPs,
collectives and a roofline step time. A step that does not fit is re-planned with the memory levers, in
order and cumulatively, until one fits: FSDP over the data axis, full remat, more accumulation, a smaller batch.
"""

from __future__ import annotations

import math
from typing import Iterator

import jax
from ml_collections import ConfigDict

from dontstop_jax.analysis import roofline as rl
from dontstop_jax.analysis.plan import compile_phase, model_config
from dontstop_jax.engine import data_parallel_size, make_mesh, topology
from dontstop_jax.engine.peft import plan as peft_plan


def plan(cfg: ConfigDict, name: str, slices: int = 1, tokens: int | None = None) -> tuple[bool, str]:
    """(fits, report). When the configured step does not fit, the report ends with the first lever (cumulative)
    that makes it fit, and that lever's plan."""
    jax.config.update("jax_enable_compilation_cache", False)  # compile-only executables cannot be cached
    chip, devices = topology.devices(name, slices)
    fits, text = _one(cfg, chip, devices, name, tokens)
    if fits:
        return True, text
    for lever, changed in _levers(cfg, devices):
        ok, lever_text = _one(changed, chip, devices, name, tokens)
        if ok:
            return False, f"{text}\ndoes not fit; it fits with {lever}:\n{lever_text}"
    return False, f"{text}\ndoes not fit, and no lever (fsdp, remat, accumulation, batch) makes it fit"


def _levers(cfg: ConfigDict, devices: list) -> Iterator[tuple[str, ConfigDict]]:
    cfg, applied = ConfigDict(cfg.to_dict()), []
    mesh = make_mesh(cfg.mesh.shape, devices, dcn_shape=cfg.mesh.dcn_shape).shape
    if mesh["data"] > 1 and cfg.mesh.dcn_shape is None:
        cfg.mesh.shape = (1, mesh["data"] * mesh["fsdp"], mesh["tensor"])
        applied.append(f"--config.mesh.shape='{tuple(cfg.mesh.shape)}'")
        yield " ".join(applied), cfg
    if cfg.model.remat != "full":
        cfg.model.remat = "full"
        applied.append("--config.model.remat=full")
        yield " ".join(applied), cfg
    dp = data_parallel_size(make_mesh(cfg.mesh.shape, devices, dcn_shape=cfg.mesh.dcn_shape))
    accum = cfg.train.get("accum_steps", 1)
    if "accum_steps" in cfg.train:
        while cfg.train.batch_size % (accum * 2 * dp) == 0:
            accum *= 2
            cfg.train.accum_steps = accum
            yield " ".join(applied + [f"--config.train.accum_steps={accum}"]), cfg
        applied.append(f"--config.train.accum_steps={accum}")
    while cfg.train.batch_size % (2 * accum * dp) == 0:
        cfg.train.batch_size //= 2
        yield " ".join(applied + [f"--config.train.batch_size={cfg.train.batch_size}"]), cfg


def _one(cfg: ConfigDict, chip: topology.Chip, devices: list, name: str, tokens: int | None) -> tuple[bool, str]:
    arch, _ = peft_plan(cfg, model_config(cfg))
    seq = min(cfg.data.max_seq_length, arch.max_seq_length)
    batch, accum = cfg.train.batch_size, cfg.train.get("accum_steps", 1)
    mesh = make_mesh(cfg.mesh.shape, devices, dcn_shape=cfg.mesh.dcn_shape)
    hosts = len({d.process_index for d in devices})
    head = (f"{cfg.name} on {name}: {len(devices)} {chip.kind} chips, {hosts} hosts; mesh "
            f"{' '.join(f'{k}={v}' for k, v in mesh.shape.items())}; batch {batch} x {seq} tokens, accum {accum}, "
            f"{arch.dtype}, remat {arch.remat}")
    try:
        train, predict, params = compile_phase(cfg, devices)
    except jax.errors.JaxRuntimeError as e:
        # The TPU compiler itself refuses a program whose temporaries exceed HBM: that step does not fit either.
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return False, f"{head}\n  HBM per chip:   does not compile: {str(e).strip().splitlines()[0]}"
    predicted = 0 if "task" in cfg else math.ceil(cfg.data.mask_prob * seq)
    flops = rl.model_flops(arch, params, batch, seq, predicted)
    est = rl.roofline(train, chip, len(devices), flops, arch.remat == "full")
    lines = [
        f"{head}, {params / 1e6:.1f}M parameters",
        f"  HBM per chip:   {rl.memory_line(train, chip)}",
        f"  FLOPs per step: {flops:.3g} model ({flops / len(devices):.3g} per chip; XLA counts {train.flops:.3g} "
        "per chip, loop bodies once)",
        f"  collectives per chip per step: {rl.collectives_line(train)}",
        f"  roofline step:  {est.step_s * 1e3:.1f} ms, {est.bound}-bound (compute {est.compute_s * 1e3:.1f} ms, "
        f"HBM >= {est.hbm_s * 1e3:.1f} ms, ICI {est.ici_s * 1e3:.1f} ms)",
        f"  throughput:     {batch * seq / est.step_s:,.0f} tokens/s, MFU {flops / (est.step_s * chip.peak_flops * len(devices)):.0%} "
        "at this estimate",
        f"  wall clock:     {_hours(cfg, est.step_s, batch * seq, tokens)}"]
    if predict is not None:
        lines.append(f"  predict step:   {rl.memory_line(predict, chip)}")
    worst = max(train.total_bytes, predict.total_bytes if predict else 0)
    return worst <= chip.hbm_bytes, "\n".join(lines)


def _hours(cfg: ConfigDict, step_s: float, tokens_per_step: int, tokens: int | None) -> str:
    steps = cfg.train.get("steps")
    if steps is None and tokens:
        steps = cfg.train.epochs * math.ceil(tokens / tokens_per_step)
    per_1k = f"{step_s * 1000 / 3600:.2f} h per 1K steps"
    return f"{steps * step_s / 3600:.2f} h for {steps} steps ({per_1k})" if steps else \
        f"{per_1k} (train.steps is None: pass --tokens N, the corpus size, for the total)"
