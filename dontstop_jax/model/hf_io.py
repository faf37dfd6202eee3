"""Import from and export to Hugging Face RoBERTa directories (config.json + weights).

One name table (`_name_table`) is used in both directions, so import and export cannot drift apart.
Hugging Face stores Linear weights as (out, in) and does not store the tied `lm_head.decoder.weight`.
Our vocabulary tensors have `padded_vocab_size` rows (see ModelConfig.vocab_pad_multiple): import appends zero
rows, export drops them, so a Hugging Face directory always holds exactly `vocab_size` rows.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from dontstop_jax import files
from dontstop_jax.errors import UserError
from dontstop_jax.files import publishing
from dontstop_jax.model.config import ModelConfig
from dontstop_jax.model.roberta import RobertaForMaskedLM, RobertaForSequenceClassification, RobertaModel, init_params

Params = dict[str, Any]
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
HEADS = {"mlm": "RobertaForMaskedLM", "classification": "RobertaForSequenceClassification", "encoder": "RobertaModel"}


# -- layout conversions: (hf array) <-> (our array) ---------------------------------------------
def _to_ours(kind: str, a: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    h, d = cfg.num_attention_heads, cfg.head_dim
    if kind == "linear":
        return a.T
    if kind == "qkv":  # (heads*kv, embed) -> (embed, heads, kv)
        return a.T.reshape(cfg.hidden_size, h, d)
    if kind == "qkv_bias":
        return a.reshape(h, d)
    if kind == "attn_out":  # (embed, heads*kv) -> (heads, kv, embed)
        return a.T.reshape(h, d, cfg.hidden_size)
    if kind == "vocab":  # (vocab, ...) -> (padded vocab, ...), zero rows appended
        return np.pad(a, [(0, cfg.padded_vocab_size - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
    return a


def _to_hf(kind: str, a: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    if kind == "attn_out":  # (heads, kv, embed) -> (embed, heads*kv)
        return np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)
    if kind in ("linear", "qkv"):  # (in, out...) -> (out, in)
        return np.ascontiguousarray(a.reshape(a.shape[0], -1).T)
    if kind == "qkv_bias":
        return a.reshape(-1)
    if kind == "vocab":
        return a[: cfg.vocab_size]
    return a


def _name_table(cfg: ModelConfig, prefix: str, head: str) -> Iterator[tuple[str, tuple[str, ...], str, int | None]]:
    """(hf name, our path, layout kind, layer index or None) for every tensor of the chosen head."""
    emb = ("roberta", "embeddings")
    yield prefix + "embeddings.word_embeddings.weight", emb + ("word_embeddings", "embedding"), "vocab", None
    yield prefix + "embeddings.position_embeddings.weight", emb + ("position_embeddings", "embedding"), "copy", None
    yield prefix + "embeddings.token_type_embeddings.weight", emb + ("token_type_embeddings", "embedding"), "copy", None
    yield prefix + "embeddings.LayerNorm.weight", emb + ("LayerNorm", "scale"), "copy", None
    yield prefix + "embeddings.LayerNorm.bias", emb + ("LayerNorm", "bias"), "copy", None
    per_layer = [
        ("attention.self.query", "query", "qkv", "qkv_bias"),
        ("attention.self.key", "key", "qkv", "qkv_bias"),
        ("attention.self.value", "value", "qkv", "qkv_bias"),
        ("attention.output.dense", "attention_output", "attn_out", "copy"),
        ("attention.output.LayerNorm", "attention_LayerNorm", None, None),
        ("intermediate.dense", "intermediate", "linear", "copy"),
        ("output.dense", "output", "linear", "copy"),
        ("output.LayerNorm", "output_LayerNorm", None, None),
    ]
    for i in range(cfg.num_hidden_layers):
        for hf, ours, w_kind, b_kind in per_layer:
            base, path = f"{prefix}encoder.layer.{i}.{hf}", ("roberta", "layers", ours)
            if w_kind is None:  # LayerNorm
                yield base + ".weight", path + ("scale",), "copy", i
                yield base + ".bias", path + ("bias",), "copy", i
            else:
                assert b_kind is not None  # a dense layer has both kinds
                yield base + ".weight", path + ("kernel",), w_kind, i
                yield base + ".bias", path + ("bias",), b_kind, i
    if head == "mlm":
        yield "lm_head.dense.weight", ("lm_head", "dense", "kernel"), "linear", None
        yield "lm_head.dense.bias", ("lm_head", "dense", "bias"), "copy", None
        yield "lm_head.layer_norm.weight", ("lm_head", "layer_norm", "scale"), "copy", None
        yield "lm_head.layer_norm.bias", ("lm_head", "layer_norm", "bias"), "copy", None
        yield "lm_head.bias", ("lm_head", "bias"), "vocab", None
    elif head == "classification":
        for name in ("dense", "out_proj"):
            yield f"classifier.{name}.weight", ("classifier", name, "kernel"), "linear", None
            yield f"classifier.{name}.bias", ("classifier", name, "bias"), "copy", None


# -- reading ------------------------------------------------------------------------------------
def _read_state_dict(path: Path) -> dict[str, np.ndarray]:
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        from safetensors.numpy import load_file

        files = [path / "model.safetensors"]
        if not files[0].exists():
            index = json.loads((path / "model.safetensors.index.json").read_text())
            files = [path / f for f in sorted(set(index["weight_map"].values()))]
        state: dict[str, np.ndarray] = {}
        for f in files:
            try:
                state.update(load_file(str(f)))
            except Exception as err:  # noqa: BLE001 (safetensors raises its own error types for damaged files)
                raise UserError(
                    f"{f} is not a readable safetensors file ({err}); download or export it again"
                ) from None
        return state
    if (path / "pytorch_model.bin").exists():
        try:
            import torch
        except ImportError:
            raise UserError(
                f"{path}/pytorch_model.bin needs torch to read; `pip install torch==2.13.0` "
                "or convert the checkpoint to model.safetensors"
            ) from None
        sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}
    raise UserError(f"{path} has no model.safetensors or pytorch_model.bin; point to a Hugging Face model directory")


def read_config(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    path = Path(path)
    if not (path / "config.json").exists():
        raise UserError(
            f"{path} has no config.json; point to a Hugging Face model directory (the folder save_pretrained wrote)"
        )
    try:
        hf = json.loads((path / "config.json").read_text())
    except ValueError as err:
        raise UserError(
            f"{path / 'config.json'} is not valid JSON ({err}); download or export the model again"
        ) from None
    return ModelConfig.from_hf_dict(hf, **overrides)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _hf_shape(kind: str, our_shape: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...]:
    return _to_hf(kind, np.empty(our_shape, np.float32), cfg).shape


def param_shapes(module: nn.Module) -> Params:
    """Unboxed parameter shapes of a module, without allocating them."""
    return jax.eval_shape(lambda: nn.unbox(init_params(module, jax.random.key(0))))


def load_pretrained(path: str | os.PathLike, **config_overrides: Any) -> tuple[ModelConfig, Params, str]:
    """Read a Hugging Face RoBERTa directory.

    Returns (config, params, head) where params holds `roberta` and, when the checkpoint has one, the
    `lm_head` or `classifier` subtree as float32 numpy arrays, and head names what was found ("mlm",
    "classification" or "encoder"). A partial or mismatched checkpoint raises UserError naming the tensor.
    """
    path = Path(path)
    cfg = read_config(path, **config_overrides)
    state = _read_state_dict(path)
    if "lm_head.decoder.bias" in state and "lm_head.bias" not in state:
        state["lm_head.bias"] = state["lm_head.decoder.bias"]
    prefix = "roberta." if any(k.startswith("roberta.") for k in state) else ""
    head = (
        "mlm"
        if "lm_head.dense.weight" in state
        else "classification"
        if "classifier.dense.weight" in state
        else "encoder"
    )
    num_labels = state["classifier.out_proj.bias"].shape[0] if head == "classification" else 0
    module = {
        "mlm": RobertaForMaskedLM(cfg),
        "classification": RobertaForSequenceClassification(cfg, num_labels),
        "encoder": RobertaModel(cfg),
    }[head]
    shapes = param_shapes(module)
    if head == "encoder":
        shapes = {"roberta": shapes}

    params: Params = {}
    stacks: dict[tuple[str, ...], list[np.ndarray]] = {}
    for hf_name, our_path, kind, layer in _name_table(cfg, prefix, head):
        if hf_name not in state:
            raise UserError(
                f"{path} has no tensor {hf_name!r} that its config.json implies "
                f"(num_hidden_layers={cfg.num_hidden_layers}); the checkpoint is partial or "
                "config.json belongs to another model: re-export it with save_pretrained"
            )
        full_shape = _get(shapes, our_path).shape
        expected = _hf_shape(kind, full_shape[1:] if layer is not None else full_shape, cfg)
        if state[hf_name].shape != expected:
            raise UserError(
                f"{path}: tensor {hf_name!r} has shape {tuple(state[hf_name].shape)} but config.json "
                f"implies {expected}; fix config.json or use the checkpoint it was saved with"
            )
        value = _to_ours(kind, np.asarray(state[hf_name], np.float32), cfg)
        if layer is None:
            _set(params, our_path, value)
        else:
            stacks.setdefault(our_path, []).append(value)
    for our_path, layers in stacks.items():
        _set(params, our_path, np.stack(layers))
    return cfg, params, head


def check_tokenizer(cfg: ModelConfig, tokenizer_dir: str | os.PathLike) -> None:
    """The tokenizer must not produce ids past the model's embedding table. Its size is read from tokenizer.json
    where there is one: this runs at every phase's start, and AutoTokenizer's import pulls in torch where it is
    installed (seconds)."""
    from dontstop_jax.model import hub

    tokenizer_dir = hub.local(os.fspath(tokenizer_dir), "tokenizer")
    where = files.path(tokenizer_dir)
    if not (where / "tokenizer.json").exists() and not (where / "vocab.json").exists():
        raise UserError(
            f"{tokenizer_dir} has no tokenizer files (tokenizer.json or vocab.json + merges.txt); "
            "copy the model's tokenizer there or pass the tokenizer directory explicitly"
        )
    local = files.localize(tokenizer_dir)  # this host's copy, which loading the tokenizer reads too
    if (local / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        n = Tokenizer.from_file(str(local / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    else:
        from transformers import AutoTokenizer

        n = len(AutoTokenizer.from_pretrained(str(local)))
    if n > cfg.vocab_size:
        raise UserError(
            f"tokenizer at {tokenizer_dir} has {n} tokens but the model's vocab_size is "
            f"{cfg.vocab_size}; use the tokenizer the model was trained with"
        )


# -- writing ------------------------------------------------------------------------------------
def save_pretrained(
    out_dir: str | os.PathLike,
    cfg: ModelConfig,
    params: Params,
    head: str,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    label_names: list[str] | None = None,
    overwrite: bool = False,
) -> files.Path:
    """Write a directory that `transformers.AutoModelFor...from_pretrained` loads with the same outputs.

    The directory is assembled beside its final place and renamed into it, so a crash never leaves a
    half-written model; an existing directory is replaced only with overwrite=True.
    """
    from safetensors.numpy import save_file
    from transformers import RobertaConfig

    if head not in HEADS:
        raise UserError(f"unknown head {head!r}; use one of {sorted(HEADS)}")
    out_dir = files.path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} already exists and is not empty; choose another directory or pass overwrite")
    params = {k: v for k, v in params.items()}
    prefix = "" if head == "encoder" else "roberta."
    state: dict[str, np.ndarray] = {}
    for hf_name, our_path, kind, layer in _name_table(cfg, prefix, head):
        value = np.asarray(_get(params, our_path), np.float32)
        state[hf_name] = np.ascontiguousarray(_to_hf(kind, value[layer] if layer is not None else value, cfg))

    hf_config = cfg.to_hf_dict()
    hf_config.update(architectures=[HEADS[head]], tie_word_embeddings=True)
    if head == "classification":
        names = label_names or [f"LABEL_{i}" for i in range(state["classifier.out_proj.bias"].shape[0])]
        hf_config.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})

    with publishing(out_dir, last="config.json") as tmp:  # in a bucket, config.json marks it complete
        tmp.mkdir()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        RobertaConfig(**hf_config).save_pretrained(str(tmp))
        if tokenizer_dir is not None:
            from dontstop_jax.model import hub

            tokenizer_dir = files.localize(hub.local(os.fspath(tokenizer_dir), "tokenizer"))
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).exists():
                    shutil.copy2(tokenizer_dir / name, tmp / name)
    return out_dir
