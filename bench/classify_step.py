"""Classification fine-tune step: ours vs `transformers` PyTorch, and what length bucketing buys.

1. Fixed shapes: our jitted step vs RobertaForSequenceClassification (AdamW, clipping), same config, batch,
   sequence length and threads; alternating repeats after warm-up, medians.
2. One epoch over a realistic length distribution (log-normal, median 40 tokens, capped at --max-len):
   our length-bucketed batches vs ours padded to the maximum length vs transformers with the Trainer's
   default dynamic padding (each random batch padded to its longest example). Reported as useful
   (non-padding) tokens per second.
3. `--breakdown`: where the fixed-shape difference comes from, both sides without dropout, alternating:
   forward only, forward + backward, and the optimizer update alone.

    python -m bench.classify_step
    python -m bench.classify_step --breakdown
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from bench.common import markdown_table, time_alternating, write_json
from bench.mlm_step import MODELS, TOTAL_STEPS, hf_optimizer, hf_update
from dontstop_jax.data import ClassificationBatches
from dontstop_jax.engine import (
    DEFAULT_RULES,
    StepSpec,
    classification_loss_sums,
    compile_train_step,
    create_train_state,
    default_optim_config,
    make_mesh,
    make_optimizer,
    to_global,
)
from dontstop_jax.model import ModelConfig, RobertaForSequenceClassification

NUM_LABELS = 4


def lengths_like_a_task(n: int, max_len: int, seed: int = 0) -> np.ndarray:
    """Token counts of short-text classification data: log-normal, median 40, long tail, within [8, max_len]."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(40), 0.7, n)), 8, max_len).astype(int)


def examples(cfg: ModelConfig, lengths: np.ndarray, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = [np.concatenate([[0], rng.integers(4, cfg.vocab_size, n - 2), [2]]).astype(np.int32) for n in lengths]
    return tokens, rng.integers(0, NUM_LABELS, len(lengths)).astype(np.int32)


class OurClassifierStep:
    def __init__(self, cfg: ModelConfig):
        self.mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
        self.model = model = RobertaForSequenceClassification(cfg, NUM_LABELS)
        self.tx, schedule = make_optimizer(default_optim_config(), TOTAL_STEPS)
        self.state, shardings = create_train_state(model, self.tx, self.mesh, DEFAULT_RULES, seed=0)
        self.step = compile_train_step(
            StepSpec(classification_loss_sums(model), self.tx, schedule=schedule),
            shardings,
            self.mesh,
            DEFAULT_RULES,
        )

    def run(self, batches: list[dict[str, np.ndarray]]) -> None:
        metrics = None
        for batch in batches:
            self.state, metrics = self.step(self.state, to_global(batch, self.mesh))
        jax.block_until_ready((self.state, metrics))

    def parts(self, batch: dict[str, np.ndarray]) -> dict[str, Callable[[int], None]]:
        """forward, forward + backward (no dropout) and the optimizer update alone, each run n times."""
        model, params = self.model, self.state.params
        loss = classification_loss_sums(model)
        device_batch = to_global(batch, self.mesh)
        key = jax.random.key(0)
        forward = jax.jit(lambda p, b: loss(p, b, key, True)[0])
        grads = jax.jit(jax.grad(lambda p, b: loss(p, b, key, True)[0]))
        update = jax.jit(lambda g, o, p: self.tx.update(g, o, p))
        g = grads(params, device_batch)
        run = lambda f, *a: lambda n: jax.block_until_ready([f(*a) for _ in range(n)])
        return {
            "forward": run(forward, params, device_batch),
            "forward + backward": run(grads, params, device_batch),
            "optimizer update": run(update, g, self.state.opt_state, params),
        }


class HFClassifierStep:
    def __init__(self, cfg: ModelConfig, device: str):
        import torch
        import transformers

        torch.manual_seed(0)
        self.torch, self.device = torch, device
        hf_cfg = transformers.RobertaConfig(**cfg.to_hf_dict(), num_labels=NUM_LABELS)
        self.model = transformers.RobertaForSequenceClassification(hf_cfg).to(device).train()
        self.optimizer, self.scheduler = hf_optimizer(self.model)
        self.autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    def run(self, batches: list[dict[str, np.ndarray]]) -> None:
        """bf16 configs run under autocast (the usual PyTorch mixed-precision recipe), as in bench/mlm_step.py."""
        torch = self.torch
        for batch in batches:
            with self.autocast:
                loss = self.model(
                    input_ids=torch.from_numpy(batch["input_ids"].astype(np.int64)).to(self.device),
                    attention_mask=torch.from_numpy(batch["attention_mask"].astype(np.int64)).to(self.device),
                    labels=torch.from_numpy(batch["labels"].astype(np.int64)).to(self.device),
                ).loss
            hf_update(self.model, self.optimizer, self.scheduler, loss)
        loss.item()

    def parts(self, batch: dict[str, np.ndarray]) -> dict[str, Callable[[int], None]]:
        torch, model = self.torch, self.model
        inputs = {
            k: torch.from_numpy(batch[k].astype(np.int64)).to(self.device)
            for k in ("input_ids", "attention_mask", "labels")
        }

        def forward(n):
            model.eval()
            with torch.no_grad():
                losses = [model(**inputs).loss for _ in range(n)]
            losses[-1].item()

        def backward(n):
            model.eval()  # no dropout, as on our side
            for _ in range(n):
                model.zero_grad(set_to_none=True)
                model(**inputs).loss.backward()
            model.train()

        def update(n):
            for p in model.parameters():
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
            for _ in range(n):
                self.optimizer.step()

        return {"forward": forward, "forward + backward": backward, "optimizer update": update}


def padded_to_longest(tokens: list[np.ndarray], labels: np.ndarray, batch_size: int, seed: int) -> list[dict]:
    """transformers' Trainer default: random batches, each padded to its longest example."""
    order = np.random.default_rng(seed).permutation(len(tokens))
    out = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(tokens[r]) for r in rows)
        ids = np.full((len(rows), width), 1, np.int32)
        for i, r in enumerate(rows):
            ids[i, : len(tokens[r])] = tokens[r]
        out.append(
            {
                "input_ids": ids,
                "attention_mask": (ids != 1).astype(np.int32),
                "labels": labels[rows],
                "example_weights": np.ones(len(rows), np.float32),
            }
        )
    return out


def breakdown(ours: OurClassifierStep, theirs: HFClassifierStep, batch: dict, args) -> dict:
    sides = {"ours": ours.parts(batch), "transformers": theirs.parts(batch)}
    parts = list(sides["ours"])
    times = time_alternating(
        {f"{side} {part}": fns[part] for part in parts for side, fns in sides.items()}, args.steps, args.repeats
    )
    rows = [
        [
            part,
            *(f"{1e3 * times[f'{side} {part}']['median_s']:.1f}" for side in sides),
            f"{times['transformers ' + part]['median_s'] / times['ours ' + part]['median_s']:.2f}x",
        ]
        for part in parts
    ]
    print(f"\nclassification step parts, {args.model}, seq {args.seq}, batch {args.batch}, no dropout")
    print(markdown_table(["part", "ours ms", "transformers ms", "transformers time / ours"], rows))
    payload = {"bench": "classify_breakdown", "args": vars(args), "parts": {n: t["median_s"] for n, t in times.items()}}
    print(f"written: {write_json(f'classify_breakdown_{args.model}', payload)}", file=sys.stderr)
    return payload


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--seq", type=int, default=128, help="fixed-shape comparison length")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--examples", type=int, default=512, help="epoch size of the bucketing comparison")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--breakdown", action="store_true", help="time forward, backward and update separately")
    args = p.parse_args(argv)
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    if device == "cpu":
        import os

        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
    cfg = MODELS[args.model]
    ours, theirs = OurClassifierStep(cfg), HFClassifierStep(cfg, device)

    fixed_tokens, fixed_labels = examples(cfg, np.full(args.batch, args.seq))
    fixed = padded_to_longest(fixed_tokens, fixed_labels, args.batch, seed=0)
    times = time_alternating(
        {"ours": lambda n: ours.run(fixed * n), "transformers (PyTorch eager)": lambda n: theirs.run(fixed * n)},
        args.steps,
        args.repeats,
    )
    step_rows = [
        [
            name,
            f"{1e3 * t['median_s']:.1f}",
            f"{args.batch * args.seq / t['median_s']:,.0f}",
            f"{t['median_s'] / times['ours']['median_s']:.2f}x",
        ]
        for name, t in times.items()
    ]
    if args.breakdown:
        return breakdown(ours, theirs, fixed[0], args)

    lengths = lengths_like_a_task(args.examples, args.max_len)
    tokens, labels = examples(cfg, lengths)
    useful = int(lengths.sum())
    bucketed = ClassificationBatches(tokens, labels, args.batch, 0, pad_id=1, max_seq_length=args.max_len)
    fixed_len = ClassificationBatches(
        tokens, labels, args.batch, 0, pad_id=1, max_seq_length=args.max_len, bucket_lengths=(args.max_len,)
    )
    epochs: dict[str, tuple[Any, list]] = {
        "ours, length buckets (default)": (ours, list(bucketed.epoch(0))),
        "ours, padded to max length": (ours, list(fixed_len.epoch(0))),
        "transformers, padded to longest in batch": (theirs, padded_to_longest(tokens, labels, args.batch, 0)),
    }
    for runner, batches in epochs.values():  # compile every bucket shape before timing
        runner.run(list({b["input_ids"].shape: b for b in batches}.values()))

    def epochs_of(runner: Any, batches: list) -> Callable[[int], None]:
        return lambda n: runner.run(batches * n)

    epoch_times = time_alternating(
        {name: epochs_of(r, b) for name, (r, b) in epochs.items()}, steps=1, repeats=args.repeats, warmup=0
    )
    epoch_rows = []
    for name, t in epoch_times.items():
        cells = sum(b["input_ids"].size for b in epochs[name][1])
        epoch_rows.append(
            [
                name,
                f"{t['median_s']:.1f}",
                f"{useful / cells:.0%}",
                f"{useful / t['median_s']:,.0f}",
                f"{t['median_s'] / epoch_times['ours, length buckets (default)']['median_s']:.2f}x",
            ]
        )

    print(f"\nclassification step, {args.model}, seq {args.seq}, batch {args.batch}, {device}")
    print(markdown_table(["step", "ms/step", "tokens/s", "time / ours"], step_rows))
    print(
        f"\none epoch of {args.examples} examples (median length {int(np.median(lengths))}, max {args.max_len}), "
        f"batch {args.batch}"
    )
    print(markdown_table(["batching", "s/epoch", "real tokens / cells", "useful tokens/s", "time / ours"], epoch_rows))
    payload = {
        "bench": "classify_step",
        "args": vars(args),
        "step": {n: t["median_s"] for n, t in times.items()},
        "epoch": {n: t["median_s"] for n, t in epoch_times.items()},
        "useful_tokens": useful,
    }
    print(f"written: {write_json(f'classify_{args.model}_{device}', payload)}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
