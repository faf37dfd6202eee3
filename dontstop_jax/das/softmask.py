"""DAS soft-masking: the gradient of each unit's parameters is scaled by (1 - its accumulated importance).

Which slices belong to a unit (every encoder parameter has a leading [layers] axis):
- head h: query/key/value kernels [L, embed, heads, kv] and biases [L, heads, kv] at heads=h, and the
  attention-output kernel [L, heads, kv, embed] at heads=h: that slice only reads head h's output, which
  is what the head's gate scales. The attention-output bias [L, embed] is shared by all heads: not masked.
- intermediate unit i: intermediate kernel [L, embed, mlp] column i and bias [L, mlp] entry i.
- output unit d: output kernel [L, mlp, embed] column d and bias [L, embed] entry d.
Embeddings, LayerNorms, the LM head and classifier are not masked.

Masks are kept in broadcastable form (size 1 on every axis but layers and the unit's), sharded like the
parameter they scale, so they cost O(units) memory and the multiply runs shard-local inside the train step.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dontstop_jax.das.importance import Importance
from dontstop_jax.errors import UserError

# (module under roberta/layers, parameter) -> (unit kind, axis of the unit in the parameter)
SLICES: dict[tuple[str, str], tuple[str, int]] = {
    **{(m, "kernel"): ("head", 2) for m in ("query", "key", "value")},
    **{(m, "bias"): ("head", 1) for m in ("query", "key", "value")},
    ("attention_output", "kernel"): ("head", 1),
    ("intermediate", "kernel"): ("intermediate", 2),
    ("intermediate", "bias"): ("intermediate", 1),
    ("output", "kernel"): ("output", 2),
    ("output", "bias"): ("output", 1),
}
Masks = dict[str, dict[str, Any]]  # module -> parameter -> broadcastable mask


def _layers(tree: Any) -> Any:
    return tree["roberta"]["layers"]


def unit_masks(importance: Importance, params: Any, slices: dict[tuple[str, str], tuple[str, int]] = SLICES) -> Masks:
    """1 - importance, shaped to broadcast against each masked parameter of `params` (arrays or shapes);
    `slices` says which parameter slices belong to which unit (HAT's differ: das/hat.py)."""
    masks: Masks = {}
    layers = _layers(params)
    for (module, leaf), (kind, axis) in slices.items():
        shape = np.shape(layers[module][leaf])
        keep = 1.0 - np.asarray(importance[kind], np.float32)  # [L, units]
        if keep.shape != (shape[0], shape[axis]):
            raise UserError(
                f"importance[{kind!r}] has shape {keep.shape} but {module}/{leaf} {shape} needs "
                f"{(shape[0], shape[axis])}: it was measured on another model; measure it again"
            )
        target = [1] * len(shape)
        target[0], target[axis] = shape[0], shape[axis]
        masks.setdefault(module, {})[leaf] = keep.reshape(target)
    return masks


def shard_masks(masks: Masks, params: Any) -> Masks:
    """Place each mask like its (sharded) parameter in `params`, replicated along its size-1 axes."""

    def place(mask, sharding: NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (mask.ndim - len(sharding.spec))
        spec = [s if n > 1 else None for s, n in zip(spec, mask.shape)]
        return jax.device_put(mask, NamedSharding(sharding.mesh, PartitionSpec(*spec)))

    layers = _layers(params)
    return {
        m: {leaf: place(mask, layers[m][leaf].sharding) for leaf, mask in leaves.items()} for m, leaves in masks.items()
    }


def apply(grads: Any, masks: Masks) -> Any:
    """`grads` with every masked parameter's gradient multiplied by its mask; all other leaves unchanged."""
    layers = dict(_layers(grads))
    for module, leaves in masks.items():
        layers[module] = {**layers[module], **{leaf: layers[module][leaf] * m for leaf, m in leaves.items()}}
    return {**grads, "roberta": {**grads["roberta"], "layers": layers}}
