"""GPU rows of bench/RESULTS.md: bf16 MFU of our MLM and classification train steps at roberta-base, sequence 512,
with cuDNN flash attention, against transformers' PyTorch eager models (bf16 autocast, AdamW) on the same GPU.

Both sides run in one process, alternating repeat by repeat after warm-up (medians), on the same batch; attention
dropout is 0 on both sides (cuDNN's fused kernel is only taken without it; RoBERTa's 0.1 forces the explicit
softmax path, timed as a lever row). MFU is the same model FLOPs (masked-slot logits for MLM) over the measured
time, against the GPU's datasheet bf16 peak and against a bf16 matmul measured in the same run. The section between
the markers in RESULTS.md (bench/common.py's GPU_BEGIN/GPU_END) is replaced; the rest is left alone.

    bash bench/gpu.sh              # a fresh GPU machine: installs what is missing, then runs this (< 8 minutes)
    python -m bench.gpu            # an environment where JAX sees the GPU and PyTorch sees CUDA
    python -m bench.gpu --smoke    # any machine, tiny shapes, seconds: the whole chain, written to --results
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")  # JAX and PyTorch share one GPU

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from bench import classify_step, mlm_step
from bench.common import (
    BENCH_DIR,
    GPU_BEGIN,
    GPU_END,
    classification_train_flops,
    machine,
    markdown_table,
    matmul_peak,
    mlm_train_flops,
    time_alternating,
    with_gpu_section,
)
from dontstop_jax.model import ModelConfig

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from NVIDIA's datasheets, by jax's device_kind.
DATASHEET_BF16 = {
    "H200": 989.4e12,
    "H100 80GB HBM3": 989.4e12,
    "H100 SXM": 989.4e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "A100": 312e12,
}
SMOKE = ModelConfig(
    vocab_size=1000,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=66,
)


def datasheet_peak(kind: str) -> float | None:
    return next((v for k, v in DATASHEET_BF16.items() if k.lower() in kind.lower()), None)


def classification_batch(cfg: ModelConfig, batch: int, seq: int) -> list[dict[str, np.ndarray]]:
    tokens, labels = classify_step.examples(cfg, np.full(batch, seq))
    return classify_step.padded_to_longest(tokens, labels, batch, seed=0)


def measure(cfg: ModelConfig, batch: int, seq: int, steps: int, repeats: int, warmup: int, device: str) -> dict:
    """{row name: seconds per step} for every row, plus the FLOPs each row's step does."""
    mlm_batch = mlm_step.make_batch(cfg, batch, seq)
    mlm: dict[str, Callable[[int], None]] = {"MLM: ours": mlm_step.OurStep(cfg, mlm_batch)}
    if cfg.attention_impl == "cudnn":
        mlm["MLM: ours, XLA attention (lever)"] = mlm_step.OurStep(cfg.replace(attention_impl=None), mlm_batch)
        mlm["MLM: ours, attention dropout 0.1 (lever)"] = mlm_step.OurStep(
            cfg.replace(attention_probs_dropout_prob=0.1), mlm_batch
        )
    mlm["MLM: transformers (PyTorch eager)"] = mlm_step.huggingface(cfg, mlm_batch, device)
    times = time_alternating(mlm, steps, repeats, warmup)
    del mlm  # free the MLM states before the classifiers take their memory

    fixed = classification_batch(cfg, batch, seq)
    ours, theirs = classify_step.OurClassifierStep(cfg), classify_step.HFClassifierStep(cfg, device)
    times.update(
        time_alternating(
            {
                "classification: ours": lambda n: ours.run(fixed * n),
                "classification: transformers (PyTorch eager)": lambda n: theirs.run(fixed * n),
            },
            steps,
            repeats,
            warmup,
        )
    )
    flops = {
        "MLM": mlm_train_flops(cfg, batch, seq, mlm_batch["mlm_positions"].shape[1]),
        "classification": classification_train_flops(cfg, batch, seq),
    }
    return {
        "seconds": {name: t["median_s"] for name, t in times.items()},
        "all_s": {name: t["all_s"] for name, t in times.items()},
        "flops": flops,
    }


def section(p: dict) -> str:
    """The marked Markdown section of RESULTS.md for one run's payload."""
    a, info = p["args"], p["machine"]
    peak, measured = p["datasheet_peak_flops"], p["matmul_peak_flops"]
    rows, mfu = [], {}
    for name, t in p["seconds"].items():
        task, side = name.split(": ", 1)
        ours = p["seconds"][f"{task}: ours"]
        util = p["flops"][task] / t
        if side == "ours":
            mfu[task] = util / peak if peak else None
        rows.append(
            [
                name,
                f"{1e3 * t:.1f}",
                f"{a['batch'] * a['seq'] / t:,.0f}",
                f"{t / ours:.2f}x",
                f"{100 * util / peak:.1f}%" if peak else "-",
                f"{100 * util / measured:.1f}%",
            ]
        )
    speedup = {
        task: p["seconds"][f"{task}: transformers (PyTorch eager)"] / p["seconds"][f"{task}: ours"]
        for task in p["flops"]
    }
    fmt = lambda x: f"{100 * x:.1f}%" if x is not None else "no datasheet peak for this GPU"
    goals = markdown_table(
        ["goal (issue 5)", "MLM", "classification"],
        [
            ["bf16 MFU >= 50% (datasheet peak)", fmt(mfu["MLM"]), fmt(mfu["classification"])],
            [">= 2x PyTorch eager tokens/s", f"{speedup['MLM']:.2f}x", f"{speedup['classification']:.2f}x"],
        ],
    )
    cfg = p["model"]
    return "\n".join(
        [
            GPU_BEGIN,
            f"### GPU: {a['model']}, seq {a['seq']}, batch {a['batch']}, {cfg['dtype']}, attention "
            f"{cfg['attention_impl'] or 'XLA'}{' (--smoke shapes)' if a['smoke'] else ''}",
            "",
            f"Measured on {p['date']}: {info['device']} ({info['backend']}), {info['cores']} CPU cores; jax "
            f"{info['jax']}, torch {info.get('torch', '-')}, transformers {info.get('transformers', '-')}. Datasheet "
            f"bf16 peak {peak / 1e12:.0f} TFLOP/s; a bf16 matmul measured {measured / 1e12:.0f} TFLOP/s in this run. "
            "Attention dropout 0 on both sides except the lever row; PyTorch computes MLM logits at every position "
            "(its model), MFU counts the masked slots' only (the same useful FLOPs for every row of a task)."
            if peak
            else f"Measured on {p['date']}: {info['device']} ({info['backend']}); jax {info['jax']}, torch "
            f"{info.get('torch', '-')}. No datasheet peak for this device; a matmul measured "
            f"{measured / 1e12:.3f} TFLOP/s in this run.",
            "",
            goals,
            "",
            markdown_table(
                ["step", "ms/step", "tokens/s", "time vs ours", "MFU (datasheet)", "MFU (measured matmul)"], rows
            ),
            GPU_END,
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model and shapes on any backend (checks the chain)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 32; smoke 4)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 512; smoke 32)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed repeat (default 10; smoke 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default 5; smoke 1)")
    p.add_argument(
        "--results",
        type=Path,
        default=BENCH_DIR / "RESULTS.md",
        help="Markdown file whose GPU section is replaced (default bench/RESULTS.md)",
    )
    p.add_argument("--json", type=Path, default=None, help="payload file (default bench/results/gpu_<device>.json)")
    args = p.parse_args(argv)
    gpu = jax.default_backend() == "gpu"
    if not gpu and not args.smoke:
        raise SystemExit(
            f"bench.gpu: JAX sees no GPU (backend {jax.default_backend()}); run bench/gpu.sh on a GPU "
            "machine, or pass --smoke"
        )
    device = "cuda" if gpu else "cpu"
    if gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(
                "bench.gpu: PyTorch sees no CUDA device; install a CUDA build of torch (bench/gpu.sh does)"
            )
    base = SMOKE if args.smoke else ModelConfig()
    cfg = base.replace(dtype="bfloat16", attention_probs_dropout_prob=0.0, attention_impl="cudnn" if gpu else None)
    batch, seq = args.batch or (4 if args.smoke else 32), args.seq or (32 if args.smoke else 512)
    steps, repeats = args.steps or (1 if args.smoke else 10), args.repeats or (1 if args.smoke else 5)

    t0 = time.time()
    payload = measure(cfg, batch, seq, steps, repeats, warmup=1 if args.smoke else 2, device=device)
    info = machine()
    payload.update(
        bench="gpu",
        date=time.strftime("%Y-%m-%d"),
        machine=info,
        seconds_total=time.time() - t0,
        args={
            "model": "smoke" if args.smoke else "roberta-base",
            "batch": batch,
            "seq": seq,
            "steps": steps,
            "repeats": repeats,
            "smoke": args.smoke,
        },
        model={"dtype": cfg.dtype, "attention_impl": cfg.attention_impl},
        matmul_peak_flops=matmul_peak("bfloat16", 8192 if gpu else 256),
        datasheet_peak_flops=datasheet_peak(info["device"]) if gpu else None,
    )
    text = section(payload)
    print(text)
    results = args.results
    results.write_text(with_gpu_section(results.read_text() if results.exists() else "", text))
    out = args.json or BENCH_DIR / "results" / f"gpu_{info['device'].replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    print(f"written: {results}, {out}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
