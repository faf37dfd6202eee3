"""Parameter-efficient additions to the encoder: bottleneck adapters and LoRA, plus their small files.

Both start as the identity (adapter up-projection and LoRA B are zero), so adding them to a pretrained
model changes no output until they are trained. Their parameters live inside each scanned layer
(`roberta/layers/<name>_adapter/...`, `roberta/layers/<target>_lora/{a,b}`), so they carry the leading
[L] axis and logical axis names like every other parameter and shard on the mesh the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dontstop_jax import files
from dontstop_jax.errors import UserError
from dontstop_jax.files import publishing
from dontstop_jax.model.config import ModelConfig

ADAPTER_SUFFIX, LORA_SUFFIX = "_adapter", "_lora"


class Adapter(nn.Module):
    """Houlsby/Pfeiffer bottleneck: x + up(gelu(down(x))); up is zero-initialised (identity at init)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        down = nn.Dense(
            cfg.adapter_size,
            dtype=cfg.compute_dtype,
            name="down",
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(cfg.initializer_range), ("embed", "adapter")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("adapter",)),
        )
        up = nn.Dense(
            cfg.hidden_size,
            dtype=cfg.compute_dtype,
            name="up",
            kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("adapter", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        )
        return x + up(nn.gelu(down(x), approximate=False))


class LoRA(nn.Module):
    """The low-rank update of one projection with kernel [*in, *out]: x @ A [*in, r] @ B [r, *out] * alpha / r.

    A has PEFT's default (Kaiming-uniform-like) init, B is zero, so the update starts at zero.
    """

    config: ModelConfig
    in_axes: tuple[str, ...]
    out_shape: tuple[int, ...]
    out_axes: tuple[str, ...]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, n_in = self.config, len(self.in_axes)
        in_shape = x.shape[-n_in:]
        a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1)
        a = self.param("a", nn.with_logical_partitioning(a_init, (*self.in_axes, "lora")), (*in_shape, cfg.lora_rank))
        b = self.param(
            "b",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("lora", *self.out_axes)),
            (cfg.lora_rank, *self.out_shape),
        )
        dt = cfg.compute_dtype
        low = jnp.tensordot(x.astype(dt), a.astype(dt), axes=n_in)
        return jnp.tensordot(low, b.astype(dt), axes=1) * (cfg.lora_alpha / cfg.lora_rank)


def add_lora(
    cfg: ModelConfig, name: str, y: jax.Array, x: jax.Array, in_axes: tuple[str, ...], out_axes: tuple[str, ...]
) -> jax.Array:
    """Projection `name`'s output `y` (of input `x`) plus its LoRA update, when LoRA targets `name`.

    Call inside the parent's compact __call__: the LoRA module becomes its child `<name>_lora`.
    """
    if cfg.lora_rank == 0 or name not in cfg.lora_targets:
        return y
    out_shape = y.shape[len(y.shape) - len(out_axes) :]
    return y + LoRA(cfg, in_axes, out_shape, out_axes, name=name + LORA_SUFFIX)(x).astype(y.dtype)


def adapt(cfg: ModelConfig, where: str, x: jax.Array) -> jax.Array:
    """Apply the adapter placed at `where` ("attention" or "output") if the config puts one there."""
    placed = {"houlsby": ("attention", "output"), "pfeiffer": ("output",)}.get(cfg.adapter, ())
    return Adapter(cfg, name=where + ADAPTER_SUFFIX)(x) if where in placed else x


# -- parameter trees ----------------------------------------------------------------------------
def is_peft_module(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIX) or name.endswith(LORA_SUFFIX)


def merge_lora(cfg: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
    """Fold every LoRA update into its base kernel: (config without LoRA, plain params), same outputs.

    Works on host (numpy) or device arrays; the layer axis [L] is kept.
    """
    if cfg.lora_rank == 0:
        return cfg, params
    layers = dict(params["roberta"]["layers"])
    for target in cfg.lora_targets:
        lora = layers.pop(target + LORA_SUFFIX)
        a, b, kernel = lora["a"], lora["b"], layers[target]["kernel"]
        num_layers, rank = a.shape[0], a.shape[-1]
        delta = (a.reshape(num_layers, -1, rank) @ b.reshape(num_layers, rank, -1)).reshape(kernel.shape)
        layers[target] = {**layers[target], "kernel": kernel + delta * (cfg.lora_alpha / rank)}
    roberta = {**params["roberta"], "layers": layers}
    return cfg.replace(lora_rank=0), {**params, "roberta": roberta}


# -- small files: only the parameters a parameter-efficient run changed ----------------------------
def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.update(_flatten(value, path + "/") if isinstance(value, dict) else {path: value})
    return out


def _unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def save_delta(path: str | os.PathLike, params: dict, trainable: dict, cfg: ModelConfig) -> files.Path:
    """Write the leaves marked True in `trainable` (adapters/LoRA, biases, norms, the head) to safetensors.

    The model config rides along as metadata, so `load_delta` can rebuild the model on any base.
    Written to a temporary sibling and renamed: a crash never leaves a half-written file.
    """
    from safetensors.numpy import save_file

    keep = {
        k: np.ascontiguousarray(np.asarray(v, np.float32))
        for (k, v), t in zip(_flatten(params).items(), _flatten(trainable).values())
        if t
    }
    with publishing(path) as tmp:
        save_file(keep, str(tmp), metadata={"model_config": json.dumps(dataclasses.asdict(cfg))})
    return path


def load_delta(path: str | os.PathLike, base: dict) -> tuple[ModelConfig, dict]:
    """(config, params): the base parameters with the file's leaves put in (adapters/LoRA added)."""
    from safetensors import safe_open

    if not files.path(path).is_file():
        raise UserError(
            f"{path} is not a file; pass the adapter file a parameter-efficient run wrote "
            "(its workdir's peft.safetensors)"
        )
    with safe_open(str(files.localize(path)), "numpy") as f:
        cfg = ModelConfig.recorded(json.loads(f.metadata()["model_config"]))
        flat = {k: f.get_tensor(k) for k in f.keys()}
    merged = _flatten(base)
    for key, value in flat.items():
        if key in merged and np.shape(merged[key]) != value.shape:
            raise UserError(
                f"{path}: {key} has shape {value.shape} but the base model's is "
                f"{np.shape(merged[key])}; load it onto the base model it was trained from"
            )
        merged[key] = value
    return cfg, _unflatten(merged)
