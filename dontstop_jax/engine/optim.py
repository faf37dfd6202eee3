"""AdamW with RoBERTa's settings, a warm-up + linear-decay schedule, and an optional trainable mask."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from ml_collections import ConfigDict

from dontstop_jax.fields import OPTIM, build

# Only matrices and embedding tables decay; biases and LayerNorm parameters do not (as in RoBERTa).
_DECAYED_LEAVES = ("kernel", "embedding")


def default_optim_config() -> ConfigDict:
    """RoBERTa's AdamW settings (typed and locked, like every config section)."""
    return build(OPTIM).lock()


def warmup_linear_decay(peak: float, total_steps: int, warmup_fraction: float) -> optax.Schedule:
    warmup = max(1, int(round(total_steps * warmup_fraction)))
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.linear_schedule(peak, 0.0, max(1, total_steps - warmup))],
        [warmup],
    )


def _leaf_name(path) -> str:
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return keys[-1] if keys else ""


def weight_decay_mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) in _DECAYED_LEAVES, params)


def make_optimizer(
    cfg: ConfigDict,
    total_steps: int,
    trainable: Callable[[Any], Any] | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (transformation, learning-rate schedule).

    `trainable(params) -> tree of bools` freezes the False leaves: they get zero updates and no optimizer
    state (optax.multi_transform with set_to_zero), and clipping sees only trainable gradients. Scales of
    slices of a leaf (frozen layers, layer-wise learning rates, DAS soft-masks) are train-step hooks instead
    (StepSpec's `hooks`).
    """
    schedule = warmup_linear_decay(cfg.learning_rate, total_steps, cfg.warmup_fraction)
    adamw = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm else optax.identity(),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=weight_decay_mask),
    )
    if trainable is None:
        return adamw, schedule
    labels = lambda params: jax.tree_util.tree_map(lambda t: "train" if t else "freeze", trainable(params))
    return optax.multi_transform({"train": adamw, "freeze": optax.set_to_zero()}, labels), schedule
