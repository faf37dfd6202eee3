"""MLM train-step throughput: our jitted step vs Hugging Face `transformers` PyTorch RobertaForMaskedLM.

Same model config, batch, sequence length, dtype and thread count; AdamW with the same settings and global-norm
clipping on both sides; one process, alternating repeats after warm-up, medians. Also reports MFU: analytic
model FLOPs of our step over its time, against a matmul peak measured in the same run. `--levers` times our
step with one speed lever changed at a time (the rows of bench/RESULTS.md's lever table).

    python bench/mlm_step.py --model small --seq 128 --batch 32            # CPU goal: ratio >= 1.5
    python bench/mlm_step.py --model base --seq 512 --batch 64 --dtype bfloat16 --levers   # GPU
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import jax
import numpy as np

from bench.common import markdown_table, matmul_peak, mlm_train_flops, time_alternating, write_json
from dontstop_jax.engine import (
    DEFAULT_RULES,
    StepSpec,
    compile_train_step,
    create_train_state,
    default_optim_config,
    make_mesh,
    make_optimizer,
    mlm_loss_sums,
    to_global,
)
from dontstop_jax.model import ModelConfig, RobertaForMaskedLM

MODELS = {
    "small": ModelConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": ModelConfig(),
}
TOTAL_STEPS = 10_000  # only shapes the learning-rate schedule
MASK_PROB = 0.15


def make_batch(cfg: ModelConfig, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Full rows of random non-special tokens with 15% of positions masked, in our loader's layout."""
    rng = np.random.default_rng(seed)
    slots = math.ceil(MASK_PROB * seq)
    ids = rng.integers(4, cfg.vocab_size, (batch, seq), dtype=np.int32)
    positions = np.sort(np.stack([rng.choice(np.arange(1, seq - 1), slots, replace=False) for _ in range(batch)]), 1)
    targets = np.take_along_axis(ids, positions, 1)
    np.put_along_axis(ids, positions, 3, 1)  # <mask>
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "mlm_positions": positions.astype(np.int32),
        "mlm_ids": targets,
        "mlm_weights": np.ones(positions.shape, np.float32),
    }


def all_positions(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same batch with every position projected onto the vocabulary (weights only at the masked ones):
    what an MLM head without masked-position gathering computes."""
    b, t = batch["input_ids"].shape
    ids, weights = np.zeros((b, t), np.int32), np.zeros((b, t), np.float32)
    np.put_along_axis(ids, batch["mlm_positions"], batch["mlm_ids"], 1)
    np.put_along_axis(weights, batch["mlm_positions"], 1.0, 1)
    return {
        **batch,
        "mlm_positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
        "mlm_ids": ids,
        "mlm_weights": weights,
    }


class OurStep:
    """Our jitted train step on one device. Calling it runs n steps on a fixed batch and blocks at the end;
    `sync_every_step` fetches the loss after every step instead (the host-sync lever)."""

    def __init__(
        self, cfg: ModelConfig, batch: dict[str, np.ndarray], *, donate: bool = True, sync_every_step: bool = False
    ):
        self.mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
        model = RobertaForMaskedLM(cfg)
        tx, schedule = make_optimizer(default_optim_config(), TOTAL_STEPS)
        self.state, shardings = create_train_state(model, tx, self.mesh, DEFAULT_RULES, seed=0)
        self.step = compile_train_step(
            StepSpec(mlm_loss_sums(model), tx, schedule=schedule),
            shardings,
            self.mesh,
            DEFAULT_RULES,
            donate=donate,
        )
        self.batch = to_global(batch, self.mesh)
        self.sync_every_step = sync_every_step
        self.metrics: dict[str, jax.Array] = {}

    def step_with(self, batch: dict[str, jax.Array]) -> None:
        self.state, self.metrics = self.step(self.state, batch)

    def sync(self) -> None:
        jax.block_until_ready((self.state, self.metrics))

    def __call__(self, n: int) -> None:
        for _ in range(n):
            self.step_with(self.batch)
            if self.sync_every_step:
                float(self.metrics["loss"])
        self.sync()


def hf_optimizer(model):
    """torch AdamW + linear warm-up/decay with our settings (no decay on biases and LayerNorms)."""
    import torch
    import transformers

    opt = default_optim_config()
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias") and "LayerNorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opt.learning_rate,
        betas=(opt.b1, opt.b2),
        eps=opt.eps,
    )
    return optimizer, transformers.get_linear_schedule_with_warmup(optimizer, int(0.06 * TOTAL_STEPS), TOTAL_STEPS)


def hf_update(model, optimizer, scheduler, loss) -> None:
    """Backward, clip, AdamW step, schedule step: the PyTorch side of every comparison."""
    import torch

    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), default_optim_config().max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def huggingface(cfg: ModelConfig, batch: dict[str, np.ndarray], device: str):
    """The same step in PyTorch eager: transformers' RobertaForMaskedLM (SDPA attention), AdamW, clipping,
    linear warm-up schedule; bf16 via autocast, the usual mixed-precision recipe."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.RobertaForMaskedLM(transformers.RobertaConfig(**cfg.to_hf_dict())).to(device).train()
    optimizer, scheduler = hf_optimizer(model)
    labels = np.full(batch["input_ids"].shape, -100, np.int64)
    np.put_along_axis(labels, batch["mlm_positions"], batch["mlm_ids"], 1)
    inputs = {
        "input_ids": torch.from_numpy(batch["input_ids"].astype(np.int64)).to(device),
        "attention_mask": torch.from_numpy(batch["attention_mask"].astype(np.int64)).to(device),
        "labels": torch.from_numpy(labels).to(device),
    }
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    def run(n: int) -> None:
        for _ in range(n):
            with autocast:
                loss = model(**inputs).loss
            hf_update(model, optimizer, scheduler, loss)
        if device == "cuda":
            torch.cuda.synchronize()
        else:
            loss.item()

    return run


def lever_variants(cfg: ModelConfig, batch: dict[str, np.ndarray]) -> dict:
    """Our step with one lever switched relative to the shipped default (first row)."""
    other_dtype = "float32" if cfg.dtype == "bfloat16" else "bfloat16"
    return {
        "ours (default)": OurStep(cfg, batch),
        "logits at all positions": OurStep(cfg, all_positions(batch)),
        "no attention dropout (fused dot_product_attention)": OurStep(
            cfg.replace(attention_probs_dropout_prob=0.0), batch
        ),
        "no donation": OurStep(cfg, batch, donate=False),
        "host sync every step": OurStep(cfg, batch, sync_every_step=True),
        f"{other_dtype} compute": OurStep(cfg.replace(dtype=other_dtype), batch),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--attention-dropout", type=float, default=None, help="override (default: RoBERTa's 0.1)")
    p.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--levers", action="store_true", help="also time our step with each lever switched")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers side")
    p.add_argument("--tag", default=None, help="JSON name under bench/results/ (default from the arguments)")
    args = p.parse_args(argv)

    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    if device == "cpu" and not args.no_hf:
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))  # the same cores XLA's CPU client uses
    cfg = MODELS[args.model].replace(dtype=args.dtype)
    if args.attention_dropout is not None:
        cfg = cfg.replace(attention_probs_dropout_prob=args.attention_dropout)
    batch = make_batch(cfg, args.batch, args.seq)
    fns = lever_variants(cfg, batch) if args.levers else {"ours (default)": OurStep(cfg, batch)}
    if not args.no_hf:
        fns["transformers (PyTorch eager)"] = huggingface(cfg, batch, device)
    times = time_alternating(fns, args.steps, args.repeats)

    tokens = args.batch * args.seq
    flops = mlm_train_flops(cfg, args.batch, args.seq, batch["mlm_positions"].shape[1])
    peak = matmul_peak(args.dtype, 8192 if device == "cuda" else 2048)
    base = times["ours (default)"]["median_s"]
    rows, results = [], []
    for name, t in times.items():
        r = {
            "name": name,
            "median_s": t["median_s"],
            "tokens_per_s": tokens / t["median_s"],
            "ours_speedup": t["median_s"] / base,
            "all_s": t["all_s"],
        }
        if name.startswith("ours (default)"):
            r["mfu"] = flops / t["median_s"] / peak
        results.append(r)
        rows.append(
            [
                name,
                f"{r['median_s'] * 1e3:.1f}",
                f"{r['tokens_per_s']:,.0f}",
                f"{r['ours_speedup']:.2f}x",
                f"{100 * r['mfu']:.1f}%" if "mfu" in r else "",
            ]
        )
    tag = args.tag or f"mlm_{args.model}_seq{args.seq}_b{args.batch}_{args.dtype}_{device}"
    print(
        f"\nMLM step, {args.model} (L={cfg.num_hidden_layers}, D={cfg.hidden_size}), seq {args.seq}, batch "
        f"{args.batch}, {args.dtype}, attention dropout {cfg.attention_probs_dropout_prob}, {device}; "
        f"matmul peak {peak / 1e12:.2f} TFLOP/s; model FLOPs/step {flops / 1e12:.3f} T"
    )
    print(markdown_table(["step", "ms/step", "tokens/s", "time / ours", "MFU"], rows))
    payload = {
        "bench": "mlm_step",
        "args": vars(args),
        "model_flops_per_step": flops,
        "matmul_peak_flops": peak,
        "tokens_per_step": tokens,
        "results": results,
    }
    print(f"written: {write_json(tag, payload)}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
