"""Fixed unit gates of a fine-tuned model (finetune's `unit_gates`): per-unit factors on the attention heads'
outputs and the FFN intermediate units, e.g. a HAT domain's mask at s_max, so that a task trains and is scored
with only the units its domain used (das/hat.py).

They go through the model's `gates` (model/roberta.py, the mechanism DAS's importance differentiates). A head's
gate multiplies its context vector before the attention-output projection and an intermediate unit's its
activation before the output projection, so both are the same as scaling the kernel slice that reads the unit:
`fold` writes them into those slices, which makes a gated checkpoint a plain RoBERTa for `dontstop export` and
for a phase that starts from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dontstop_jax import files
from dontstop_jax.errors import UserError
from dontstop_jax.model.config import ModelConfig

KINDS = ("head", "intermediate")  # the gated units (an npz may hold others, e.g. importance's "output": not read)
# The kernel (under roberta/layers) that reads each kind of unit: [L, heads, kv, embed] and [L, mlp, embed]
READERS = {"head": "attention_output", "intermediate": "output"}


@dataclasses.dataclass(frozen=True, eq=False)
class UnitGates:
    """{"head": [layers, heads], "intermediate": [layers, mlp]} float32 factors. Compared and hashed by identity,
    so that it can be a Flax module's attribute."""

    head: np.ndarray
    intermediate: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in KINDS}


def load(path: str, config: ModelConfig) -> UnitGates | None:
    """The gates in the .npz at `path` (None for ""), checked against `config`'s layers, heads and units."""
    if not path:
        return None
    if not files.path(path).exists():
        raise UserError(
            f"unit_gates={path!r} does not exist; point it to an .npz of gates (e.g. a HAT stage's "
            'hat_domain_mask.npz) or set it to ""'
        )
    shapes = {
        "head": (config.num_hidden_layers, config.num_attention_heads),
        "intermediate": (config.num_hidden_layers, config.intermediate_size),
    }
    with files.path(path).open("rb") as raw, np.load(raw) as f:
        if missing := [k for k in KINDS if k not in f.files]:
            raise UserError(f"unit_gates {path} lacks {missing}; it needs arrays {shapes}")
        arrays = {k: np.asarray(f[k], np.float32) for k in KINDS}
    if wrong := [k for k in KINDS if arrays[k].shape != shapes[k]]:
        raise UserError(
            f"unit_gates {path}: {wrong} have shapes {[arrays[k].shape for k in wrong]} but the model "
            f"needs {[shapes[k] for k in wrong]}; were they measured on another model?"
        )
    return UnitGates(**arrays)


def fold(params: Any, gates: UnitGates | None) -> Any:
    """`params` (a classifier's or masked LM's) with each gate multiplied into the kernel slice that reads its
    unit: the same outputs without gates."""
    if gates is None:
        return params
    layers = dict(params["roberta"]["layers"])
    for kind, module in READERS.items():
        kernel = np.asarray(layers[module]["kernel"])
        g = getattr(gates, kind).reshape(kernel.shape[:2] + (1,) * (kernel.ndim - 2))
        layers[module] = {**layers[module], "kernel": (kernel * g).astype(kernel.dtype)}
    return {**params, "roberta": {**params["roberta"], "layers": layers}}


def recorded(meta: dict, config: ModelConfig) -> UnitGates | None:
    """The gates a checkpoint's phase trained and was scored with (`unit_gates` of the config in its meta)."""
    return load(meta.get("config", {}).get("unit_gates", ""), config)
