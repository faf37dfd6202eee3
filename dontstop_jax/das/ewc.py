"""EWC (Kirkpatrick et al. 2017) as a continual DAP-training baseline: after each domain, the diagonal Fisher
of the MLM loss on a sample of that domain's text; later stages add lam/2 * sum F (theta - theta*)^2, theta*
the weights after the previous domain. Over several domains F is the mean of the domains' Fishers, and lam
defaults to 5000: Serra et al. 2018's EWC baseline, which DAS's baselines reuse.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dontstop_jax.engine.sharding import Rules, activation_rules, to_global
from dontstop_jax.engine.steps import Fixed, LossSums, mlm_loss_sums
from dontstop_jax.errors import UserError


def fisher(model: nn.Module, params: Any, batches: Iterable[dict], mesh: Mesh, rules: Rules) -> Any:
    """Diagonal empirical Fisher, placed like `params`: the mean over batches of the squared gradient of the
    batch's mean MLM loss (no dropout: the trained model's sensitivity, not its noise)."""
    sums = mlm_loss_sums(model)

    def mean_loss(p, batch):
        total, aux = sums(p, batch, jax.random.key(0), True)
        return total / jnp.maximum(aux["weight"], 1.0)

    squared = jax.jit(
        lambda p, b: jax.tree_util.tree_map(jnp.square, jax.grad(mean_loss)(p, b)),
        out_shardings=jax.tree_util.tree_map(lambda x: x.sharding, params),
    )
    total, count = None, 0
    with activation_rules(mesh, rules):
        for batch in batches:
            sq = squared(params, to_global(batch, mesh))
            total = sq if total is None else jax.tree_util.tree_map(jnp.add, total, sq)
            count += 1
    if not count:
        raise UserError("ewc: no batches to measure the Fisher on; give das.importance_batches > 0")
    return jax.tree_util.tree_map(lambda x: x / count, total)


def mean(fishers: list[Any]) -> Any:
    """The domains' Fishers averaged: every past domain weighs the same, however long ago it was learned."""
    return jax.tree_util.tree_map(lambda *fs: sum(fs) / len(fs), *fishers)


def penalty(params: Any, anchor: Any, fisher_: Any) -> jax.Array:
    """sum F (theta - theta*)^2 over every parameter, in float32."""
    terms = jax.tree_util.tree_map(
        lambda p, a, f: jnp.sum(f.astype(jnp.float32) * jnp.square(p.astype(jnp.float32) - a.astype(jnp.float32))),
        params,
        anchor,
        fisher_,
    )
    return sum(jax.tree_util.tree_leaves(terms), jnp.zeros((), jnp.float32))


def ewc_loss_sums(model: nn.Module, lam: float) -> Callable[[dict, jax.Array], LossSums]:
    """({"anchor", "fisher"}, step) -> MLM sums plus lam/2 x penalty (scaled by the MLM weight, so the step's division
    leaves the mean loss plus the penalty)."""
    mlm = mlm_loss_sums(model)

    def with_arrays(arrays: dict, step: jax.Array) -> LossSums:
        def loss(params, batch, rng, deterministic):
            total, aux = mlm(params, batch, rng, deterministic)
            return total + aux["weight"] * lam / 2 * penalty(params, arrays["anchor"], arrays["fisher"]), aux

        return loss

    return with_arrays


def ewc_objective(past: Callable[[Any], tuple[Any, Any]], lam: float) -> Callable[[nn.Module, Any], tuple]:
    """The `pretrain(objective=...)` hook. `past(params)` -> (anchor, Fisher) placed like `params`: measured only
    when the phase trains (a finished phase is reused without it)."""

    def build(model: nn.Module, params: Any):
        anchor, fisher_ = past(params)
        return Fixed(ewc_loss_sums(model, lam), {"anchor": anchor, "fisher": fisher_}), {}

    return build
