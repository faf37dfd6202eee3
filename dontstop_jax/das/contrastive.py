"""DAS's training objective: MLM + weight x contrastive integration loss, with soft-masked gradients.

Integration contrasts the full network with its importance-gated version (the past-knowledge network,
gates = accumulated importance): two dropout views of the full network are positives; the gated views and
the other in-batch samples are negatives, so the full network's representation is pushed away from what
the past-knowledge units alone already encode (the complementary knowledge the paper integrates).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dontstop_jax.das import softmask
from dontstop_jax.das.importance import Importance
from dontstop_jax.engine.steps import Fixed, Hooks, LossSums, mlm_loss_sums


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """[batch, length, embed] -> [batch, embed], averaging over real (non-padding) tokens only."""
    m = attention_mask.astype(jnp.float32)[..., None]
    return jnp.sum(hidden.astype(jnp.float32) * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)


def info_nce(anchor: jax.Array, positive: jax.Array, negative: jax.Array, temperature: float) -> jax.Array:
    """Mean over the batch of -log softmax at the positive; candidates: all positives (in-batch), all negatives."""
    unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-8)
    a, candidates = unit(anchor), unit(jnp.concatenate([positive, negative], 0))
    logp = jax.nn.log_softmax(a @ candidates.T / temperature, axis=-1)  # [batch, 2 x batch]
    return -jnp.mean(jnp.diagonal(logp))


def _encode(module: nn.Module, input_ids, attention_mask, **kwargs):
    return module.roberta(input_ids, attention_mask, **kwargs)


def das_loss_sums(model: nn.Module, past: Importance, weight: float, temperature: float) -> LossSums:
    """MLM sums plus weight x InfoNCE (scaled by the MLM weight, so the step's division leaves the mean)."""
    mlm = mlm_loss_sums(model)
    gates = {k: jnp.asarray(v) for k, v in past.items()}

    def loss(params, batch, rng, deterministic):
        r_mlm, r1, r2, r3 = jax.random.split(rng, 4)
        total, aux = mlm(params, batch, r_mlm, deterministic)

        def view(r, g=None):
            h = model.apply(
                {"params": params},
                batch["input_ids"],
                batch["attention_mask"],
                deterministic=deterministic,
                gates=g,
                rngs={"dropout": r},
                method=_encode,
            )
            return mean_pool(h, batch["attention_mask"])

        contrast = info_nce(view(r1), view(r2), view(r3, gates), temperature)
        return total + weight * contrast * aux["weight"], aux

    return loss


def das_objective(
    mask: Importance | None, contrast: Importance | None, weight: float, temperature: float
) -> Callable[[nn.Module, Any], tuple]:
    """The `pretrain(objective=...)` hook: DAS loss; gradients soft-masked by the accumulated importance `mask`.
    `contrast` gates the past-knowledge network of the integration loss (usually `mask`; DAS's ablations
    contrast with past domains only, or not at all: None or weight 0 leaves plain MLM). No `mask`: no masking.

    The mask scales the gradient (as in the paper: it also shrinks the unit's share of global-norm clipping)
    and again the optimizer's update: Adam divides each gradient by its running RMS, so a constant scale on
    the gradient alone would leave the unit's steps almost unchanged. Both importances reach the step as its
    `Fixed` arrays, not constants: every stage of a sequence runs one compiled program.
    """

    def build(model: nn.Module, params: Any):
        arrays: dict[str, Any] = {}
        if mask is not None:
            arrays["mask"] = softmask.shard_masks(softmask.unit_masks(mask, params), params)
        if contrast is not None and weight:
            arrays["contrast"] = {k: np.asarray(v, np.float32) for k, v in contrast.items()}
        if not arrays:
            return mlm_loss_sums(model), {}

        def loss(fixed: dict[str, Any], step: jax.Array) -> LossSums:
            if "contrast" not in fixed:
                return mlm_loss_sums(model)
            return das_loss_sums(model, fixed["contrast"], weight, temperature)

        def hooks(fixed: dict[str, Any]) -> Hooks:
            if "mask" not in fixed:
                return {}
            scale = lambda tree: softmask.apply(tree, fixed["mask"])
            return {"grad_transform": scale, "update_transform": scale}

        return Fixed(loss, arrays, hooks), {}

    return build
