"""Shared pieces of the benchmarks: machine facts, side-by-side timing, FLOP counts, matmul peak, JSON output.

Every benchmark times "ours" and its alternative in the same process, alternating repeat by repeat after
warm-up, and reports medians, so a noisy neighbour slows both sides alike instead of biasing the ratio.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from dontstop_jax.model import ModelConfig

BENCH_DIR = Path(__file__).parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """What the numbers were measured on (goes into every JSON and RESULTS.md)."""
    info = {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
    }
    for name in ("torch", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    return info


def time_alternating(
    fns: dict[str, Callable[[int], None]],
    steps: int,
    repeats: int,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Seconds per step of each `fn(steps)` (which must block until its work is done), alternating.

    Returns {name: {"median_s": ..., "min_s": ..., "all_s": [...]}} with per-step times. `clock`: wall time by
    default; `time.thread_time` counts only the CPU time of the calling thread (work on one core, whatever else
    shares the machine).
    """
    for fn in fns.values():
        if warmup:
            fn(warmup)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = clock()
            fn(steps)
            times[name].append((clock() - t) / steps)
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "all_s": ts} for name, ts in times.items()}


def encoder_flops_per_seq(cfg: ModelConfig, seq: int) -> float:
    """Forward FLOPs of the encoder for one sequence: the dense layers (2 x weights per token) + attention."""
    d, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    dense = 2 * seq * (4 * d * d + 2 * d * i)
    attention = 2 * 2 * seq * seq * d  # QK^T and PV
    return layers * (dense + attention)


def mlm_train_flops(cfg: ModelConfig, batch: int, seq: int, predicted: int) -> float:
    """Training FLOPs (forward + backward = 3 x forward) of one MLM step that projects `predicted` rows per
    sequence onto the vocabulary (the LM head's dense + decoder); embedding lookups are free."""
    d, v = cfg.hidden_size, cfg.vocab_size
    head = 2 * predicted * (d * d + d * v)
    return 3 * batch * (encoder_flops_per_seq(cfg, seq) + head)


def classification_train_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    return 3 * batch * encoder_flops_per_seq(cfg, seq)


def matmul_peak(dtype: str, n: int, repeats: int = 10) -> float:
    """Measured FLOP/s of a large square matmul on the default device, as the MFU denominator."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a, b).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(ts)


def write_json(name: str, payload: dict) -> Path:
    path = BENCH_DIR / "results" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), **payload}, indent=2))
    os.replace(tmp, path)
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|:--|" + "--:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# The GPU rows (bench/gpu.py) live between these markers in RESULTS.md; run_all.py keeps them when it rewrites.
GPU_BEGIN = "<!-- gpu rows: written by bench/gpu.sh (python -m bench.gpu); replaced up to the end marker -->"
GPU_END = "<!-- end of gpu rows -->"


def gpu_section(text: str) -> str:
    """The marked GPU section of a RESULTS.md text (markers included), or ""."""
    start, end = text.find(GPU_BEGIN), text.find(GPU_END)
    return text[start : end + len(GPU_END)] if 0 <= start < end else ""


def with_gpu_section(text: str, section: str) -> str:
    """`text` with its marked GPU section replaced by `section` (markers included), or `section` appended."""
    old = gpu_section(text)
    if old:
        return text.replace(old, section)
    return text.rstrip("\n") + "\n\n" + section + "\n"
