"""`dontstop plan`: will this phase fit, and how long will it take, on a TPU slice nobody has paid for yet?

Compiles the phase's real step for the slice (analysis/plan.py) and prints per-chip memory, FLOPs, HBM bytes and
collectives (loops counted as often as they run), a roofline step time, tokens/s and an MFU estimate. Then it
tries the levers and ranks the plans that fit by estimated throughput: accumulation (every smaller count,
estimated from two compiles per layout; doubled until it fits), FSDP over the data axis (with
`train.gather_params_once` where the config has it), full remat (only when nothing without it fits) and, when
nothing else fits, a smaller batch. It prints the top three with their flags and the fastest one's plan, and,
where that plan trains with attention dropout (RoBERTa's recipe: 0.1, the explicit attention path), the same plan
with dropout 0 and the fused kernel, so the cost of the recipe's choice is on the page.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any

import jax
from ml_collections import ConfigDict

from dontstop_jax.analysis import roofline as rl
from dontstop_jax.analysis.plan import between, compile_phase, model_config
from dontstop_jax.config_loader import accelerator_defaults, set_fields
from dontstop_jax.engine import data_parallel_size, make_mesh, topology
from dontstop_jax.engine.peft import plan as peft_plan


@dataclasses.dataclass
class Plan:
    flags: dict  # the overrides that make it, {} for the configured step
    fits: bool
    tokens_per_s: float  # 0 when it does not compile
    step_ms: float
    text: str
    cost: tuple | None = None  # (train, predict, parameters): compiled, or estimated; None: the compiler refused it
    compiled: bool = True  # False: estimated from its layout's compiles at other accumulation counts

    @property
    def command(self) -> str:
        return (
            " ".join(
                f"--config.{k}='{v}'" if isinstance(v, tuple) else f"--config.{k}={v}" for k, v in self.flags.items()
            )
            or "as configured"
        )


def plan(
    cfg: ConfigDict, name: str, slices: int = 1, tokens: int | None = None, levers: bool = True
) -> tuple[bool, str]:
    """(fits as configured, report). The report ends with the fitting plans ranked by throughput and the fastest
    one's plan when it is not the configured one (always compiled: an estimate that leads is compiled, and
    replaced by its exact numbers, until a compiled plan leads); `levers=False` plans the configured step only.
    Where the chosen plan trains with attention dropout, its twin without (the fused kernel) follows."""
    jax.config.update("jax_enable_compilation_cache", False)  # compile-only executables cannot be cached
    cfg = accelerator_defaults(copy.deepcopy(cfg), "tpu")  # what a run on the slice would compute in
    chip, devices = topology.devices(name, slices)
    one = functools.partial(_one, cfg, chip=chip, devices=devices, name=name, tokens=tokens)
    configured = one({})
    plans = [configured] + (list(_levers(cfg, configured, one, devices)) if levers else [])
    while (ranked := _ranked(plans)) and not ranked[0].compiled:
        plans[plans.index(ranked[0])] = one(ranked[0].flags)
    text = configured.text if configured.fits else f"{configured.text}\ndoes not fit"
    if not ranked:
        return False, f"{text}, and no lever (accumulation, fsdp, remat, batch) makes it fit"
    lines = [
        f"  {i}. {p.tokens_per_s:,.0f} tokens/s, {p.step_ms:.1f} ms{'' if p.compiled else ' (estimated)'}  {p.command}"
        for i, p in enumerate(ranked[:3], 1)
    ]
    text += (
        f"\nfitting plans, fastest first ({len(ranked)} of {len(plans)} fit; "
        f"{sum(p.compiled for p in plans)} compiled, the others estimated):\n" + "\n".join(lines)
    )
    best = ranked[0]
    text += f"\nchosen: {best.command}" + (f"\n{best.text}" if best is not configured else "")
    if fused := _fused_attention(cfg, best.flags, devices):
        twin = one({**best.flags, **fused})
        text += (
            "\nwith fused attention (attention dropout 0: faster, and a change from RoBERTa's recipe): "
            f"{twin.command}\n{twin.text}" + ("" if twin.fits else "\ndoes not fit")
        )
    return configured.fits, text


def _fused_attention(cfg: ConfigDict, flags: dict, devices: list) -> dict:
    """The flags that turn `flags`' plan's attention dropout off, and with it the explicit attention path, for
    the fused kernel (splash on TPUs, as a config loaded for a TPU gets); {} where it is off already."""
    changed = set_fields(copy.deepcopy(cfg), flags)
    if not model_config(changed).attention_probs_dropout_prob:
        return {}
    fused: dict[str, Any] = {"model.attention_probs_dropout_prob": 0.0}
    if changed.model.get("attention_impl") is None and devices[0].platform == "tpu":
        fused["model.attention_impl"] = "splash"
    return fused


def _ranked(plans: list[Plan]) -> list[Plan]:
    return sorted((p for p in plans if p.fits), key=lambda p: -p.tokens_per_s)


def _levers(cfg: ConfigDict, configured: Plan, one, devices: list) -> Iterator[Plan]:
    mesh = make_mesh(cfg.mesh.shape, devices, dcn_shape=cfg.mesh.dcn_shape).shape
    layouts: list[dict[str, Any]] = [{}]
    if mesh["data"] > 1 and cfg.mesh.dcn_shape is None:
        layouts.append({"mesh.shape": (1, mesh["data"] * mesh["fsdp"], mesh["tensor"])})
        if "gather_params_once" in cfg.train:  # the FSDP trade-off: memory for one gather per step
            layouts.append({**layouts[-1], "train.gather_params_once": not cfg.train.gather_params_once})
    found = configured.fits
    remats: list[dict[str, Any]] = [{}] + ([{"model.remat": "full"}] if cfg.model.remat != "full" else [])
    for remat in remats:
        if remat and found:
            break  # recomputing the forward pass only makes a step that fits without it slower
        for layout in layouts:
            for p in _accumulation(cfg, {**layout, **remat}, configured, one, devices):
                found |= p.fits
                yield p
    if not found:
        yield from _smaller_batches(cfg, one, devices)


def _accumulation(cfg: ConfigDict, flags: dict, configured: Plan, one, devices: list) -> Iterator[Plan]:
    """`flags` at the configured accumulation count; if that does not fit, doubled until it fits (each compiled).
    Else every smaller count, from two compiles: the configured count, and the fewest whose temporaries, taken as
    proportional to the micro-batch (an overestimate: some are not), still fit (the next larger where the compiler
    refuses it). The other counts are estimated from the two nearest compiled ones (analysis/plan.py `between`)."""
    if "accum_steps" not in cfg.train:
        if flags:
            yield one(flags)
        return
    changed = set_fields(copy.deepcopy(cfg), flags)
    dp = data_parallel_size(make_mesh(changed.mesh.shape, devices, dcn_shape=changed.mesh.dcn_shape))
    batch, accum = cfg.train.batch_size, cfg.train.accum_steps
    at = {accum: configured if not flags else one(flags)}
    if flags:
        yield at[accum]

    def compiled(a: int) -> Plan:
        at[a] = one({**flags, "train.accum_steps": a})
        return at[a]

    if not at[accum].fits:
        for a in (accum << k for k in range(1, 30)):
            if batch % (a * dp):
                return
            yield compiled(a)
            if at[a].fits:
                return
        return
    fewer = sorted(
        accum >> k for k in range(1, accum.bit_length()) if accum % (1 << k) == 0 and batch % ((accum >> k) * dp) == 0
    )
    fitting = at[accum].cost
    assert fitting is not None  # it fits, so it compiled
    train, hbm = fitting[0], one.keywords["chip"].hbm_bytes
    for a in (a for a in fewer if train.total_bytes + train.temp_bytes * (accum / a - 1) <= hbm):
        if compiled(a).cost:
            break
    for a in fewer:
        if a in at:
            yield at[a]
            continue
        known = sorted(b for b in at if at[b].cost)
        if len(known) < 2 or any(b > a and at[b].cost is None for b in at):
            continue  # nothing to estimate it from, or fewer micro-batches than one the compiler refused
        lo, hi = (
            (known[0], known[1]) if a < known[0] else (max(b for b in known if b < a), min(b for b in known if b > a))
        )
        low, high = at[lo].cost, at[hi].cost
        assert low is not None and high is not None  # both among `known`
        yield one({**flags, "train.accum_steps": a}, estimate=(between((lo, low[0]), (hi, high[0]), a), *high[1:]))


def _smaller_batches(cfg: ConfigDict, one, devices: list) -> Iterator[Plan]:
    """The last resort (it changes the recipe): FSDP, full remat and halved batches until one fits."""
    flags: dict[str, Any] = {"model.remat": "full"}
    mesh = make_mesh(cfg.mesh.shape, devices, dcn_shape=cfg.mesh.dcn_shape).shape
    if mesh["data"] > 1 and cfg.mesh.dcn_shape is None:
        flags["mesh.shape"] = (1, mesh["data"] * mesh["fsdp"], mesh["tensor"])
    changed = set_fields(copy.deepcopy(cfg), flags)
    dp = data_parallel_size(make_mesh(changed.mesh.shape, devices, dcn_shape=changed.mesh.dcn_shape))
    batch, accum = cfg.train.batch_size, cfg.train.get("accum_steps", 1)
    while batch % (2 * accum * dp) == 0:
        batch //= 2
        p = one({**flags, "train.batch_size": batch})
        yield p
        if p.fits:
            return


def _one(
    cfg: ConfigDict,
    flags: dict,
    chip: topology.Chip,
    devices: list,
    name: str,
    tokens: int | None,
    estimate: tuple | None = None,
) -> Plan:
    """The plan of `cfg` with `flags`: compiled, or from `estimate` (train cost, predict cost, parameters)."""
    cfg = set_fields(copy.deepcopy(cfg), flags)
    arch, _ = peft_plan(cfg, model_config(cfg))
    seq = min(cfg.data.max_seq_length, arch.max_seq_length)
    batch, accum = cfg.train.batch_size, cfg.train.get("accum_steps", 1)
    mesh = make_mesh(cfg.mesh.shape, devices, dcn_shape=cfg.mesh.dcn_shape)
    hosts = len({d.process_index for d in devices})
    attention = (
        "explicit" if (arch.attention_probs_dropout_prob or 0) > 0 else f"fused ({arch.attention_impl or 'xla'})"
    )
    head = (
        f"{cfg.name} on {name}: {len(devices)} {chip.kind} chips, {hosts} host{'s' * (hosts != 1)}; mesh "
        f"{' '.join(f'{k}={v}' for k, v in mesh.shape.items())}; batch {batch} x {seq} tokens, accum {accum}, "
        f"{arch.dtype}, remat {arch.remat}, attention {attention}"
    )
    try:
        train, predict, params = estimate or compile_phase(cfg, devices)
    except jax.errors.JaxRuntimeError as e:
        # The TPU compiler itself refuses a program whose temporaries exceed HBM: that step does not fit either.
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return Plan(
            flags, False, 0.0, 0.0, f"{head}\n  HBM per chip:   does not compile: {str(e).strip().splitlines()[0]}"
        )
    predicted = 0 if "task" in cfg else math.ceil(cfg.data.mask_prob * seq)
    flops = rl.model_flops(arch, params, batch, seq, predicted)
    # XLA's count misses part of a Pallas kernel's FLOPs (splash attention): compute takes at least the model's
    unseen = train.flops < flops / len(devices)
    est = rl.roofline(dataclasses.replace(train, flops=flops / len(devices)) if unseen else train, chip)
    rate = batch * seq / est.step_s
    lines = [
        f"{head}, {params / 1e6:.1f}M parameters"
        + (
            ""
            if estimate is None
            else "\n  (estimated from two compiles of this layout at other accumulation counts, not compiled)"
        ),
        f"  HBM per chip:   {rl.memory_line(train, chip)}",
        f"  per chip per step (loops counted): {train.flops:.3g} FLOPs (model {flops / len(devices):.3g}"
        f"{', which the roofline takes: a kernel XLA cannot count' if unseen else ''}), "
        f"{train.bytes_accessed / rl.GIB:.2f} GiB HBM traffic",
        f"  collectives per chip per step: {rl.collectives_line(train)}",
        f"  roofline step:  {est.step_s * 1e3:.1f} ms, {est.bound}-bound (compute {est.compute_s * 1e3:.1f} ms, "
        f"HBM >= {est.hbm_s * 1e3:.1f} ms, ICI {est.ici_s * 1e3:.1f} ms)",
        f"  throughput:     {rate:,.0f} tokens/s, {rate / len(devices):,.0f} per chip, {rate / hosts:,.0f} per host; "
        f"MFU {rl.mfu(flops, est.step_s, chip, len(devices)):.0%} at this estimate",
        f"  wall clock:     {_hours(cfg, est.step_s, batch * seq, tokens)}",
    ]
    if predict is not None:
        lines.append(f"  predict step:   {rl.memory_line(predict, chip)}")
    worst = max(train.total_bytes, predict.total_bytes if predict else 0)
    return Plan(
        flags,
        worst <= chip.hbm_bytes,
        rate,
        est.step_s * 1e3,
        "\n".join(lines),
        (train, predict, params),
        estimate is None,
    )


def _hours(cfg: ConfigDict, step_s: float, tokens_per_step: int, tokens: int | None) -> str:
    steps = cfg.train.get("steps")
    if steps is None and tokens:
        steps = cfg.train.epochs * math.ceil(tokens / tokens_per_step)
    per_1k = f"{step_s * 1000 / 3600:.2f} h per 1K steps"
    return (
        f"{steps * step_s / 3600:.2f} h for {steps} steps ({per_1k})"
        if steps
        else f"{per_1k} (train.steps is None: pass --tokens N, the corpus size, for the total)"
    )
