"""AdamW with RoBERTa's settings, a warm-up + linear-decay schedule, and an optional trainable mask."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from dontstop_jax.fields import OPTIM, build

# Only matrices and embedding tables decay; biases and LayerNorm parameters do not (as in RoBERTa).
_DECAYED_LEAVES = ("kernel", "embedding")


def default_optim_config() -> ConfigDict:
    """RoBERTa's AdamW settings (typed and locked, like every config section)."""
    return build(OPTIM).lock()


def _linear(start: Any, end: Any, steps: Any, inverse: Any, count: jax.Array) -> jax.Array:
    """optax.linear_schedule from `start` to `end` over `steps`, for numbers that may be traced. It multiplies by
    `inverse` (float32 1 / steps) where optax divides by `steps`: XLA compiles a division by a constant into that
    product, so the rates are the same bits whether the numbers are constants or arguments."""
    return (start - end) * (1 - jnp.clip(count, 0, steps) * inverse) + end


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Linear warm-up from 0 to `peak` over `warmup` steps, then linear decay to 0 over `decay` more.

    Its numbers are data (`values`): the train step takes them as an argument (StepSpec.arguments) instead of
    baking them into its program, so phases that differ only in them (base, DAPT and TAPT pretraining, fine-tunes
    of other lengths) share one compiled step, in memory and in the persistent compilation cache."""

    peak: float
    warmup: int
    decay: int

    @property
    def values(self) -> dict[str, Any]:
        one = np.float32(1)
        return {
            "peak": np.float32(self.peak),
            "warmup": np.int32(self.warmup),
            "decay": np.int32(self.decay),
            "inverse_warmup": one / np.float32(self.warmup),
            "inverse_decay": one / np.float32(self.decay),
        }

    def __call__(self, count: jax.Array, values: Mapping[str, Any] | None = None) -> jax.Array:
        """The learning rate at step `count`; `values` (traced) replace the numbers, else they are constants."""
        v = self.values if values is None else values
        warm = _linear(0.0, v["peak"], v["warmup"], v["inverse_warmup"], count)
        decay = _linear(v["peak"], 0.0, v["decay"], v["inverse_decay"], count - v["warmup"])
        return jnp.where(count < v["warmup"], warm, decay)


def warmup_linear_decay(peak: float, total_steps: int, warmup_fraction: float) -> Schedule:
    warmup = max(1, int(round(total_steps * warmup_fraction)))
    return Schedule(peak, warmup, max(1, total_steps - warmup))


def _leaf_name(path) -> str:
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return keys[-1] if keys else ""


def weight_decay_mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) in _DECAYED_LEAVES, params)


def make_optimizer(
    cfg: ConfigDict,
    total_steps: int,
    trainable: Callable[[Any], Any] | None = None,
) -> tuple[optax.GradientTransformationExtraArgs, Schedule]:
    """Returns (transformation, learning-rate schedule).

    `trainable(params) -> tree of bools` freezes the False leaves: they get zero updates and no optimizer
    state (optax.multi_transform with set_to_zero), and clipping sees only trainable gradients. Scales of
    slices of a leaf (frozen layers, layer-wise learning rates, DAS soft-masks) are train-step hooks instead
    (StepSpec's `hooks`).

    The transformation's update takes the schedule's numbers as the extra argument `schedule_values` (traced values,
    StepSpec passes them); without it they are constants. Its state is optax's AdamW state either way.
    """
    schedule = warmup_linear_decay(cfg.learning_rate, total_steps, cfg.warmup_fraction)

    def build_tx(learning_rate: optax.Schedule) -> optax.GradientTransformation:
        adamw = optax.chain(
            optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm else optax.identity(),
            optax.adamw(
                learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=weight_decay_mask
            ),
        )
        if trainable is None:
            return adamw
        labels = lambda params: jax.tree_util.tree_map(lambda t: "train" if t else "freeze", trainable(params))
        return optax.multi_transform({"train": adamw, "freeze": optax.set_to_zero()}, labels)

    def update(updates: Any, state: Any, params: Any = None, schedule_values: Mapping[str, Any] | None = None) -> tuple:
        return build_tx(functools.partial(schedule, values=schedule_values)).update(updates, state, params)

    return optax.GradientTransformationExtraArgs(build_tx(schedule).init, update), schedule
