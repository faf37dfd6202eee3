"""Which parameters a phase trains: full fine-tuning or a parameter-efficient method, selected in config.

Whole frozen leaves are masked out of the optimizer (`make_optimizer(trainable=...)`: no Adam state).
Encoder layers are stacked on a leading [L] axis, so freezing the lower layers ("top_k") and scaling the
learning rate per layer (layer-wise decay) act on slices of one array: gradients of frozen slices are
zeroed before clipping and Adam (so they neither count in the norm nor fill the moments), and updates are
multiplied per slice after AdamW, which also keeps weight decay off frozen slices (bit-identical); both are
train-step hooks (`Adaptation.hooks`), which compose with other sources of hooks such as DAS (`chain_hooks`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from dontstop_jax.engine.optim import make_optimizer
from dontstop_jax.engine.steps import Hooks
from dontstop_jax.errors import UserError
from dontstop_jax.fields import PEFT, build
from dontstop_jax.fields import PEFT_METHODS as METHODS
from dontstop_jax.model.config import ModelConfig
from dontstop_jax.model.peft import ADAPTER_SUFFIX, LORA_SUFFIX


def default_peft_config() -> ConfigDict:
    """method: full | frozen (feature extraction: train the head only) | top_k | bitfit | houlsby | pfeiffer | lora."""
    return build(PEFT).lock()


def configure_model(model: ModelConfig, peft: ConfigDict) -> ModelConfig:
    """The model a method needs: adapters or LoRA added (adapters the source already has are kept)."""
    method = check_method(peft.method)
    kw: dict[str, Any] = {"pooling": peft.pooling}
    if method in ("houlsby", "pfeiffer"):
        if model.adapter not in ("none", method):
            raise UserError(
                f"the model already has {model.adapter} adapters; peft.method={method} would add a "
                f"second kind: use peft.method={model.adapter} to keep training them"
            )
        if model.adapter == "none":
            kw.update(adapter=method, adapter_size=peft.adapter_size)
    if method == "lora":
        kw.update(lora_rank=peft.lora_rank, lora_alpha=peft.lora_alpha, lora_targets=tuple(peft.lora_targets))
        if peft.lora_rank < 1:
            raise UserError(f"peft.method=lora needs peft.lora_rank >= 1, got {peft.lora_rank}")
    return model.replace(**kw)


def plan(cfg: ConfigDict, model: ModelConfig) -> tuple[ModelConfig, Adaptation]:
    """A phase's (model config, adaptation) from its `peft` section (and `train.layerwise_lr_decay`)."""
    model = configure_model(model, cfg.peft)
    return model, Adaptation.from_config(cfg.peft, model, lr_decay=cfg.train.get("layerwise_lr_decay", 1.0))


def check_method(method: str) -> str:
    if method not in METHODS:
        raise UserError(f"peft.method={method!r} is unknown; use one of {METHODS}")
    return method


def _keys(path) -> tuple[str, ...]:
    """Dict keys only: the same names for boxed (LogicallyPartitioned) and plain parameter trees."""
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _leaf_trainable(method: str, keys: tuple[str, ...]) -> bool:
    if keys[0] != "roberta":  # the task or LM head: always trained
        return True
    in_layers = keys[1] == "layers"
    module = keys[2] if in_layers else ""
    if method == "full":
        return True
    if method == "top_k":
        return in_layers  # lower slices are frozen per layer, below
    if method == "bitfit":
        return keys[-1] == "bias"
    if method in ("houlsby", "pfeiffer"):  # Houlsby et al.: adapters and the layer norms
        return module.endswith(ADAPTER_SUFFIX) or module.endswith("LayerNorm")
    if method == "lora":
        return module.endswith(LORA_SUFFIX)
    return False  # frozen


@dataclasses.dataclass(frozen=True)
class Adaptation:
    """A phase's trainable split and per-layer learning-rate scale.

    top_k: with method "top_k", the number of top encoder layers trained. lr_decay: layer-wise
    learning-rate decay; the top layer (and the head) train at the full rate, layer i of L at
    lr_decay ** (L - 1 - i), the embeddings at lr_decay ** L. 1.0 = off.
    """

    method: str
    num_layers: int
    top_k: int = 0
    lr_decay: float = 1.0

    @classmethod
    def from_config(cls, peft: ConfigDict, model: ModelConfig, lr_decay: float = 1.0) -> Adaptation:
        method = check_method(peft.method)
        top_k = int(peft.top_k) if method == "top_k" else 0
        if method == "top_k" and not 0 <= top_k <= model.num_hidden_layers:
            raise UserError(f"peft.top_k={top_k} must be between 0 and the model's {model.num_hidden_layers} layers")
        if not 0.0 < lr_decay <= 1.0:
            raise UserError(f"layer-wise learning-rate decay {lr_decay} must be in (0, 1]; 1 turns it off")
        return cls(method, model.num_hidden_layers, top_k, float(lr_decay))

    # -- the parts make_optimizer / make_train_step take ----------------------------------------
    def optimizer(self, optim: ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
        """make_optimizer with this split (full fine-tuning keeps the plain AdamW state layout)."""
        return make_optimizer(optim, total_steps, trainable=None if self.method == "full" else self.trainable)

    def hooks(self) -> Hooks:
        """make_train_step hooks: frozen leaves and slices get zero gradients, updates are scaled per layer."""
        hooks = Hooks()
        if (grad := self.grad_transform()) is not None:
            hooks["grad_transform"] = grad
        if (update := self.update_transform()) is not None:
            hooks["update_transform"] = update
        return hooks

    def trainable(self, params: Any) -> Any:
        """Bool tree: False leaves get no optimizer state and no updates."""
        return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_trainable(self.method, _keys(p)), params)

    def _layer_factors(self) -> np.ndarray:
        factors = self.lr_decay ** np.arange(self.num_layers - 1, -1, -1, dtype=np.float64)
        if self.method == "top_k":
            factors[: self.num_layers - self.top_k] = 0.0
        return factors.astype(np.float32)

    def _factor(self, keys: tuple[str, ...], ndim: int) -> np.ndarray | float:
        if keys[0] != "roberta":
            return 1.0
        if keys[1] == "layers":
            return self._layer_factors().reshape((self.num_layers,) + (1,) * (ndim - 1))
        return self.lr_decay**self.num_layers

    @property
    def _scales_layers(self) -> bool:
        return self.method == "top_k" or self.lr_decay != 1.0

    def update_transform(self) -> Callable[[Any], Any] | None:
        """Multiplies updates per layer slice (zero where frozen); None when every factor is 1. After AdamW,
        so weight decay stays off frozen slices too (bit-identical)."""
        if not self._scales_layers:
            return None

        def transform(updates):
            def one(path, u):
                f = self._factor(_keys(path), u.ndim)
                return u if isinstance(f, float) and f == 1.0 else jnp.where(f == 0, jnp.zeros_like(u), u * f)

            return jax.tree_util.tree_map_with_path(one, updates)

        return transform

    def grad_transform(self) -> Callable[[Any], Any] | None:
        """Zeroes gradients of frozen leaves and slices, so clipping and Adam see only trained ones (and XLA
        can skip the frozen weight gradients)."""
        if self.method == "full" and not self._scales_layers:
            return None
        trainable = self.trainable

        def transform(grads):
            def one(path, g, t):
                if not t:
                    return jnp.zeros_like(g)
                f = self._factor(_keys(path), g.ndim) if self.method == "top_k" else 1.0
                return g if isinstance(f, float) else jnp.where(f == 0, jnp.zeros_like(g), g)

            return jax.tree_util.tree_map_with_path(one, grads, trainable(grads))

        return transform

    def count(self, params: Any) -> tuple[int, int]:
        """(trainable, total) parameter counts; works on arrays or ShapeDtypeStructs."""
        trainable, total = 0, 0
        flags = jax.tree_util.tree_leaves_with_path(self.trainable(params))
        for (path, t), leaf in zip(flags, jax.tree_util.tree_leaves(params)):
            size = math.prod(leaf.shape)
            total += size
            if t:
                f = self._factor(_keys(path), len(leaf.shape)) if self.method == "top_k" else 1.0
                trainable += size if isinstance(f, float) else int(size * np.count_nonzero(f) // f.size)
        return trainable, total
