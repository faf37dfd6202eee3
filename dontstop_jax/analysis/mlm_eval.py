"""Masked-LM loss of checkpoints on held-out text of each domain (the paper's Table 1 style).

Losses of different checkpoints are comparable only on identical inputs, so each corpus is masked once:
the batches are a pure function of (corpus, tokenizer, seed) built by the training loader's random-access
`batch(epoch=0, index)`, and every checkpoint that shares a tokenizer is scored on the very same masks.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from dontstop_jax.data import MLMLoader, load_tokenizer, prepare_corpus, special_ids, tokenizer_fingerprint
from dontstop_jax.data.corpus import SourceSpec
from dontstop_jax.engine import check_batch_size, compile_eval_step, make_eval_step, make_mesh, mlm_loss_sums, to_global
from dontstop_jax.engine.sharding import Rules
from dontstop_jax.errors import UserError
from dontstop_jax.fields import DEFAULT_RULES
from dontstop_jax.model import RobertaForMaskedLM
from dontstop_jax.train.source import ModelSource, place, resolve

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class MaskingSpec:
    """How held-out text becomes masked batches; one spec gives every checkpoint the same batches."""

    cache_dir: str = "runs/cache/prepared"
    max_seq_length: int = 128
    batch_size: int = 16
    max_batches: int = 20
    seed: int = 0
    mask_prob: float = 0.15


def fixed_batches(sources: Sequence[SourceSpec], tokenizer_dir: str, spec: MaskingSpec) -> list[Batch]:
    """Up to `max_batches` masked batches of the corpus (a seed-fixed random subset of its blocks). Every process
    calls it: `prepare_corpus` is a collective in which each prepares its share (or all find the cache ready)."""
    corpus = prepare_corpus(sources, tokenizer_dir, spec.cache_dir, max_seq_length=spec.max_seq_length)
    tokenizer = load_tokenizer(tokenizer_dir)
    loader = MLMLoader(
        corpus,
        spec.batch_size,
        spec.seed,
        special_ids(tokenizer),
        vocab_size=len(tokenizer),
        mask_prob=spec.mask_prob,
        drop_remainder=False,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return [loader.batch(0, i) for i in range(min(spec.max_batches, loader.steps_per_epoch))]


def mlm_losses(
    source: ModelSource,
    batches: Mapping[str, Sequence[Batch]],
    *,
    mesh_shape: Sequence[int] = (-1, 1, 1),
    rules: Rules = DEFAULT_RULES,
) -> dict[str, np.ndarray]:
    """{corpus: [mean loss, accuracy, masked tokens]} of `source`'s MLM head (compiled once for all corpora)."""
    rows, length = next(b for corpus in batches.values() for b in corpus)["input_ids"].shape  # one MaskingSpec
    if length > source.config.max_seq_length:
        raise UserError(
            f"{source.parent} handles {source.config.max_seq_length} positions, fewer than the "
            f"held-out blocks' {length}; lower mlm.max_seq_length"
        )
    mesh = make_mesh(mesh_shape)
    check_batch_size(rows * jax.process_count(), mesh, "mlm.batch_size")
    model = RobertaForMaskedLM(source.config)
    params, shardings = place(source, model, mesh, rules)
    step = compile_eval_step(make_eval_step(mlm_loss_sums(model)), shardings, mesh, rules)
    results = {}
    for name, corpus in batches.items():
        outs = jax.device_get([step(params, to_global(batch, mesh)) for batch in corpus])
        loss_sum, correct, weight = (sum(float(o[k]) for o in outs) for k in ("loss_sum", "correct", "weight"))
        results[name] = np.array([loss_sum / weight, correct / weight, weight])
    return results


@dataclass(frozen=True)
class MLMLossTable:
    """loss[i, j], accuracy[i, j], tokens[i, j]: checkpoint i on held-out corpus j."""

    checkpoints: tuple[str, ...]
    corpora: tuple[str, ...]
    loss: np.ndarray
    accuracy: np.ndarray
    tokens: np.ndarray

    def write_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["checkpoint", "corpus", "mlm_loss", "mlm_accuracy", "masked_tokens"])
            for i, ckpt in enumerate(self.checkpoints):
                for j, corpus in enumerate(self.corpora):
                    writer.writerow(
                        [ckpt, corpus, f"{self.loss[i, j]:.5f}", f"{self.accuracy[i, j]:.5f}", int(self.tokens[i, j])]
                    )

    def to_markdown(self) -> str:
        lines = ["| checkpoint | " + " | ".join(self.corpora) + " |", "|:--" + "|--:" * len(self.corpora) + "|"]
        lines += [
            f"| {ckpt} | " + " | ".join(f"{v:.3f}" for v in row) + " |"
            for ckpt, row in zip(self.checkpoints, self.loss)
        ]
        return "\n".join(lines) + "\n"


def mlm_loss_table(
    checkpoints: Mapping[str, str],
    corpora: Mapping[str, Sequence[SourceSpec]],
    spec: MaskingSpec,
    *,
    mesh_shape: Sequence[int] = (-1, 1, 1),
    rules: Rules = DEFAULT_RULES,
) -> MLMLossTable:
    """Score every checkpoint ({name: HF dir or phase workdir}) on every corpus ({name: sources})."""
    if not checkpoints or not corpora:
        raise UserError("the MLM evaluation needs at least one checkpoint and one corpus; list them in the config")
    batches: dict[str, dict[str, list[Batch]]] = {}  # tokenizer fingerprint -> corpus -> fixed batches
    results = np.zeros((3, len(checkpoints), len(corpora)))
    for i, path in enumerate(checkpoints.values()):
        source = resolve(path)
        tok_fp = tokenizer_fingerprint(load_tokenizer(source.tokenizer_dir))
        if tok_fp not in batches:
            batches[tok_fp] = {
                name: fixed_batches(list(sources), source.tokenizer_dir, spec) for name, sources in corpora.items()
            }
        scores = mlm_losses(source, batches[tok_fp], mesh_shape=mesh_shape, rules=rules)
        for j, name in enumerate(corpora):
            results[:, i, j] = scores[name]
    return MLMLossTable(tuple(checkpoints), tuple(corpora), *results)
