"""DER++ (Buzzega et al. 2020) as a continual DAP-training baseline: a small buffer of earlier domains' text
with the MLM logits the model gave at its masked positions. Each step adds alpha x MSE(logits on buffered
text, stored logits) + beta x MLM on buffered text (a second, independent buffer sample); defaults alpha 0.1,
beta 0.5, 200 sequences (the DER paper's smallest buffer).

The buffer holds an equal share of every past domain, with the logits of the model at the end of that
domain's stage (DER records them while it trains on the stream; the end-of-stage model is the one later
stages should keep). It lives on every device: buffer_size x masked slots x vocab values in bfloat16.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dontstop_jax.engine.sharding import Rules, activation_rules, to_global
from dontstop_jax.engine.steps import Fixed, LossSums, mlm_loss_sums

Buffer = dict[str, np.ndarray]  # an MLM batch's fields + "logits" [rows, masked slots, vocab], rows first


def record(model: nn.Module, params: Any, batches: Iterable[dict], mesh: Mesh, rules: Rules) -> Buffer:
    """`batches` with `params`'s logits at their masked positions, gathered whole on every host."""
    whole = NamedSharding(mesh, P())

    @jax.jit
    def logits(params, batch):
        out = model.apply(
            {"params": params}, batch["input_ids"], batch["attention_mask"], batch["mlm_positions"], deterministic=True
        )
        return jax.lax.with_sharding_constraint(({**batch, "logits": out.astype(jnp.bfloat16)}), whole)

    with activation_rules(mesh, rules):
        parts = [jax.device_get(logits(params, to_global(b, mesh))) for b in batches]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def fill(domains: list[Buffer], size: int) -> Buffer:
    """A buffer of `size` rows, an equal share of each domain's (the first domains take the remainder): the
    first rows of each, so a domain's share shrinks as later domains arrive but never changes its rows."""
    shares = [size // len(domains) + (i < size % len(domains)) for i in range(len(domains))]
    if short := [i for i, (d, n) in enumerate(zip(domains, shares)) if len(d["input_ids"]) < n]:
        raise ValueError(f"domains {short} recorded fewer rows than their buffer share")
    return {k: np.concatenate([d[k][:n] for d, n in zip(domains, shares)]) for k in domains[0]}


def replay_indices(rng: jax.Array, rows: int, size: int) -> jax.Array:
    """`size` buffer rows drawn uniformly with replacement, a function of `rng` alone."""
    return jax.random.randint(rng, (size,), 0, rows)


def _shards() -> int:
    """How many devices split the batch here: inside the train step's shard_map each sees its own rows."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else math.prod(mesh.shape[a] for a in mesh.manual_axes)


def derpp_loss_sums(
    model: nn.Module, alpha: float, beta: float, batch_size: int | None
) -> Callable[[Buffer, jax.Array], LossSums]:
    """(buffer, step) -> MLM sums plus (alpha x logit MSE + beta x replayed MLM) scaled by the MLM weight (so the step's
    division leaves their means). `batch_size` replayed rows per call, shared by the devices (None: as many as
    each device's micro-batch has)."""
    mlm = mlm_loss_sums(model)

    def sample(buffer, rng, size):
        rows = replay_indices(rng, buffer["input_ids"].shape[0], size)
        return {k: nn.with_logical_constraint(v[rows], ("batch",) + (None,) * (v.ndim - 1)) for k, v in buffer.items()}

    def with_buffer(buffer: Buffer, step: jax.Array) -> LossSums:
        def loss(params, batch, rng, deterministic):
            r_mlm, r_a, r_b, r_drop_a, r_drop_b = jax.random.split(rng, 5)
            total, aux = mlm(params, batch, r_mlm, deterministic)
            size = max(batch_size // _shards(), 1) if batch_size else batch["input_ids"].shape[0]
            a = sample(buffer, r_a, size)
            logits = model.apply(
                {"params": params},
                a["input_ids"],
                a["attention_mask"],
                a["mlm_positions"],
                deterministic=deterministic,
                rngs={"dropout": r_drop_a},
            )
            w = a["mlm_weights"].astype(jnp.float32)
            sq = jnp.mean(jnp.square(logits.astype(jnp.float32) - a["logits"].astype(jnp.float32)), -1)
            mse = jnp.sum(sq * w) / jnp.maximum(jnp.sum(w), 1.0)
            b = sample(buffer, r_b, size)
            ce, ce_aux = mlm(params, {k: v for k, v in b.items() if k != "logits"}, r_drop_b, deterministic)
            replayed = ce / jnp.maximum(ce_aux["weight"], 1.0)
            return total + aux["weight"] * (alpha * mse + beta * replayed), aux

        return loss

    return with_buffer


def derpp_objective(
    buffer: Callable[[Any], Buffer], alpha: float, beta: float, batch_size: int | None
) -> Callable[[nn.Module, Any], tuple]:
    """The `pretrain(objective=...)` hook. `buffer(params)` is recorded only when the phase trains; it is placed
    whole on every device of `params`'s mesh."""

    def build(model: nn.Module, params: Any):
        mesh = jax.tree_util.tree_leaves(params)[0].sharding.mesh
        placed = jax.device_put(buffer(params), NamedSharding(mesh, P()))
        return Fixed(derpp_loss_sums(model, alpha, beta, batch_size), placed), {}

    return build
