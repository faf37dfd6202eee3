"""Unit importance: |d loss / d gate| for a virtual gate of ones on every attention head, FFN intermediate
unit and FFN output unit, summed over a sample of batches and divided by its real-token count.

Losses: `kl_loss` is the paper's proxy for general knowledge (no general corpus needed): the KL divergence
between two dropout views of one input. Its gradient is zero when both views are equal, so the model given
to it must have dropout > 0. `mlm_loss` measures a domain's knowledge after training on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dontstop_jax import files
from dontstop_jax.engine.sharding import Rules, activation_rules, to_global
from dontstop_jax.engine.steps import mlm_loss_sums
from dontstop_jax.errors import UserError
from dontstop_jax.files import publishing
from dontstop_jax.model.config import ModelConfig

UNITS = ("head", "intermediate", "output")
Importance = dict[str, np.ndarray]  # unit kind -> [layers, units]
# (params, gates, batch, dropout rng) -> scalar loss of one batch
GateLoss = Callable[[Any, dict, dict, jax.Array], jax.Array]


def ones_gates(cfg: ModelConfig) -> dict[str, jax.Array]:
    """The identity gates, one per unit: [layers, heads], [layers, mlp], [layers, embed]."""
    layers = cfg.num_hidden_layers
    return {
        "head": jnp.ones((layers, cfg.num_attention_heads)),
        "intermediate": jnp.ones((layers, cfg.intermediate_size)),
        "output": jnp.ones((layers, cfg.hidden_size)),
    }


def mlm_loss(model: nn.Module) -> GateLoss:
    """Mean masked-LM cross-entropy of the batch (no dropout: the domain's knowledge, not its noise)."""

    def loss(params, gates, batch, rng):
        total, aux = mlm_loss_sums(model, gates)(params, batch, rng, True)
        return total / jnp.maximum(aux["weight"], 1.0)

    return loss


def kl_loss(model: nn.Module) -> GateLoss:
    """KL(view 1 || view 2) of the vocabulary distributions at the masked slots, two dropout masks."""

    def loss(params, gates, batch, rng):
        def view(r):
            logits = model.apply(
                {"params": params},
                batch["input_ids"],
                batch["attention_mask"],
                batch["mlm_positions"],
                deterministic=False,
                gates=gates,
                rngs={"dropout": r},
            )
            return jax.nn.log_softmax(logits, axis=-1)

        a, b = (view(r) for r in jax.random.split(rng))
        w = batch["mlm_weights"].astype(jnp.float32)
        return jnp.sum(jnp.sum(jnp.exp(a) * (a - b), -1) * w) / jnp.maximum(jnp.sum(w), 1.0)

    return loss


def measure(
    loss: GateLoss, cfg: ModelConfig, params: Any, batches: Iterable[dict], mesh: Mesh, rules: Rules, seed: int = 0
) -> Importance:
    """Raw importance: sum over batches of |d loss / d gates|, divided by the number of real tokens."""

    @jax.jit
    def gate_grads(params, gates, batch, rng):
        grads = jax.grad(loss, argnums=1)(params, gates, batch, rng)
        return jax.tree_util.tree_map(jnp.abs, grads), jnp.sum(batch["attention_mask"])

    gates = ones_gates(cfg)
    total = jax.tree_util.tree_map(jnp.zeros_like, gates)
    tokens = 0
    with activation_rules(mesh, rules):
        for i, batch in enumerate(batches):
            grads, n = gate_grads(params, gates, to_global(batch, mesh), jax.random.fold_in(jax.random.key(seed), i))
            total = jax.tree_util.tree_map(jnp.add, total, grads)
            tokens += n
    if not tokens:
        raise UserError("importance: no batches to measure on; give das.importance_batches > 0")
    return {k: np.asarray(v, np.float64) / float(tokens) for k, v in jax.device_get(total).items()}


def normalize(raw: Importance) -> Importance:
    """Per layer: standardise over its units, tanh, absolute value -> values in [0, 1)."""

    def one(x):
        std = x.std(axis=1, keepdims=True)
        z = (x - x.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)
        return np.abs(np.tanh(z)).astype(np.float32)

    return {k: one(v) for k, v in raw.items()}


def accumulate(past: Importance | None, new: Importance) -> Importance:
    """Element-wise max: a unit important to any earlier domain (or to general knowledge) stays protected."""
    return dict(new) if past is None else {k: np.maximum(past[k], new[k]) for k in UNITS}


def shuffled(importance: Importance, seed: int | Sequence[int]) -> Importance:
    """DAS's random-importance ablation: each layer's values permuted over its units (seeded), so protection
    has the measured sparsity and distribution but falls on arbitrary units."""
    rng = np.random.default_rng(seed)
    return {k: rng.permuted(importance[k], axis=1) for k in UNITS}


def save(path: str | os.PathLike, importance: Importance) -> None:
    with publishing(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **importance)  # type: ignore[arg-type]  # numpy's stub: a ** dict might name allow_pickle


def load(path: str | os.PathLike) -> Importance:
    with files.path(path).open("rb") as raw, np.load(raw) as f:
        if missing := set(UNITS) - set(f.files):
            raise UserError(f"{path} lacks importances {sorted(missing)}; delete it to measure again")
        return {k: f[k] for k in UNITS}
