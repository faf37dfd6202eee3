"""Where a model's weights come from (a Hugging Face directory, a finished phase, or scratch), and placing them
on a mesh: what every phase starts from and what analysis and selection evaluate."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from dontstop_jax import files
from dontstop_jax.distributed import decide, on_first_process
from dontstop_jax.engine.checkpoint import Checkpointer
from dontstop_jax.engine.peft import Adaptation, plan
from dontstop_jax.engine.sharding import Rules, put_tree, tree_shardings
from dontstop_jax.errors import UserError
from dontstop_jax.model import ModelConfig, RobertaModel, check_tokenizer, gates, hub, init_params, load_pretrained
from dontstop_jax.model.hf_io import param_shapes
from dontstop_jax.model.peft import load_delta, merge_lora
from dontstop_jax.train.workdir import require_finished

# Fields a phase may change on a loaded model: how it computes and how much dropout it uses.
RUNTIME_FIELDS = (
    "dtype",
    "remat",
    "attention_impl",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
)
# Fields an adapter file and the model it goes onto must share.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
)


@dataclasses.dataclass
class ModelSource:
    config: ModelConfig
    params: Any  # numpy tree ({"roberta": ..., maybe "lm_head"/"classifier"}) or None for scratch
    tokenizer_dir: str  # where the tokenizer lives (local or gs://; every host reads it from there)
    parent: str  # provenance: what these weights are


def phase_checkpoints(path: files.Path) -> files.Path | None:
    """A phase's checkpoint directory, given its workdir or the checkpoint directory itself; None if neither."""
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    return path if path.name == "checkpoints" and path.is_dir() else None


def _kind(init: str) -> str:
    """What `init` names: "hf" (a Hugging Face directory), "hub" (a Hub id), "workdir" (a phase's), "checkpoints"
    (a phase's checkpoint directory) or "none"."""
    path = files.path(init)
    if (path / "config.json").exists():
        return "hf"
    if hub.looks_like_hub_id(init):
        return "hub"
    found = phase_checkpoints(path)
    return "none" if found is None else "workdir" if found != path else "checkpoints"


def resolve(
    init: str, *, tokenizer: str | None = None, model: ConfigDict | None = None, delta: str | None = None
) -> ModelSource:
    """`init`: "scratch" (architecture from `model`), a Hugging Face directory or Hub id (`roberta-base`,
    `org/name@revision`), or a phase's workdir. `tokenizer` (default: init's) is a directory or a Hub id.
    `delta`: an adapter file a parameter-efficient phase wrote (`peft.safetensors`), put onto init's weights."""
    overrides = {k: v for k, v in (model or {}).items() if k in RUNTIME_FIELDS and v is not None}
    source = _weights(init, tokenizer, model, overrides)
    source = _with_delta(source, delta, overrides) if delta else source
    _check(source)
    return source


def _check(source: ModelSource) -> None:
    """Whatever the init kind: the tokenizer's ids fit the embedding table (else the first step is NaN) and
    every encoder weight has the shape the model config says."""
    check_tokenizer(source.config, source.tokenizer_dir)
    if source.params is None:
        return
    expected = jax.tree_util.tree_flatten_with_path(param_shapes(RobertaModel(source.config)))[0]
    actual = dict(jax.tree_util.tree_flatten_with_path(source.params.get("roberta", {}))[0])
    for path, shape in expected:
        got = np.shape(actual[path]) if path in actual else None
        if got != tuple(shape.shape):
            name = "/".join(str(k.key) for k in path)
            raise UserError(
                f"{source.parent}: weight roberta/{name} has shape {got} but its model config "
                f"(hidden {source.config.hidden_size}, layers {source.config.num_hidden_layers}, vocab "
                f"{source.config.vocab_size}) needs {tuple(shape.shape)}; the checkpoint and its config "
                "do not belong together"
            )


def resolve_phase(cfg: ConfigDict) -> ModelSource:
    """The starting weights a phase config names (`init`, `init_delta`, `tokenizer`, `model`)."""
    return resolve(cfg.init, tokenizer=cfg.get("tokenizer"), model=cfg.get("model"), delta=cfg.get("init_delta"))


def _weights(init: str, tokenizer: str | None, model: ConfigDict | None, overrides: dict) -> ModelSource:
    if init == "scratch":
        if tokenizer is None:
            raise UserError("init=scratch needs a tokenizer directory (config field `tokenizer`)")
        arch = {k: v for k, v in (model or {}).items() if v is not None}
        return ModelSource(ModelConfig(**arch), None, tokenizer, "scratch")
    path = files.path(init)
    kind = decide(f"look at init={init}", lambda: _kind(init), timeout=600)  # the same kind on every host
    if kind == "hf":  # a bucket directory is read through this host's copy
        cfg, params, _ = load_pretrained(files.localize(path), **overrides)
        return ModelSource(cfg, params, tokenizer or files.absolute(init), f"hf:{files.absolute(init)}")
    if kind == "hub":  # the tokenizer stays the id: each host resolves it in its own cache
        # process 0 downloads first, so a shared cache is written once; the others then find it there
        snapshot = on_first_process(f"hub:{init}", lambda: hub.snapshot(init)) or hub.snapshot(init)
        cfg, params, _ = load_pretrained(snapshot, **overrides)
        return ModelSource(cfg, params, tokenizer or init, hub.provenance(init, snapshot))
    ckpt_dir = {"workdir": path / "checkpoints", "checkpoints": path}.get(kind)
    if ckpt_dir is None:
        raise UserError(
            f"init={init!r} is neither a Hugging Face directory (config.json) nor a phase workdir "
            "with checkpoints; pass a model directory, a Hub id, a finished phase's workdir, or 'scratch'"
        )
    summary = require_finished(ckpt_dir.parent, "init")
    # The step the phase reported (a fine-tune's best, else the latest), or the newest readable one if damaged.
    step, meta, params = Checkpointer(ckpt_dir, read_only=True).read(first=summary.get("best_step"))
    # A parent's LoRA is folded into its weights: the next phase starts from a plain (or adapter) model.
    cfg, params = merge_lora(ModelConfig.recorded(meta["model_config"], **overrides), params)
    params = gates.fold(params, gates.recorded(meta, cfg))  # so are a gated fine-tune's unit gates
    tokenizer = tokenizer or relocated(meta["tokenizer_dir"], summary.get("workdir"), ckpt_dir.parent)
    return ModelSource(cfg, params, tokenizer, f"checkpoint:{files.absolute(ckpt_dir)}@{step}")


def relocated(recorded: str, made_in: str | None, workdir: files.Path) -> str:
    """A path a phase recorded where it was made (`made_in`), e.g. its tokenizer: as recorded while it is there
    (or a Hub id); else, if it moved with the phase (a grid's benchmark in a copied grid), at the same place
    relative to the phase's `workdir` now."""
    if not made_in or hub.looks_like_hub_id(recorded) or files.path(recorded).exists():
        return recorded
    old, parts = made_in.rstrip("/").split("/"), recorded.rstrip("/").split("/")
    shared = next((i for i, (a, b) in enumerate(zip(old, parts)) if a != b), min(len(old), len(parts)))
    top = workdir
    for _ in old[shared:]:
        top = top.parent
    moved = top.joinpath(*parts[shared:])
    return str(moved) if moved.exists() else recorded


def _with_delta(source: ModelSource, delta: str, overrides: dict) -> ModelSource:
    """The adapter file's leaves (adapters or LoRA, biases, norms, head) over the source's weights; its LoRA is
    folded in, as a parent phase's would be."""
    if source.params is None:
        raise UserError(
            "init_delta needs pretrained weights to go onto, and init=scratch has none; set init to "
            "the model the adapter file was trained from"
        )
    cfg, params = load_delta(delta, source.params)
    if mismatch := [k for k in ARCHITECTURE_FIELDS if getattr(cfg, k) != getattr(source.config, k)]:
        raise UserError(
            f"init_delta {delta} was trained on another architecture ({', '.join(mismatch)} differ from "
            f"init's); set init to the model it was trained from"
        )
    cfg, params = merge_lora(cfg.replace(**overrides), params)
    return ModelSource(cfg, params, source.tokenizer_dir, f"{source.parent}+delta:{files.absolute(delta)}")


def prune_top_layers(source: ModelSource, k: int) -> ModelSource:
    """The source without its top `k` encoder layers: structured pruning, a shallower and faster model whose
    other weights are unchanged (Sajjad et al. 2023, "On the effect of dropping layers of pre-trained transformer
    models": dropping the top layers costs little accuracy after fine-tuning). Every encoder-layer weight,
    adapters included, is stacked on a leading [layers] axis, so this keeps its first L - k slices."""
    if k == 0:
        return source
    layers = source.config.num_hidden_layers
    if source.params is None:
        raise UserError(
            "train.prune_top_layers removes layers of pretrained weights, and init=scratch has none; "
            "set model.num_hidden_layers for a smaller model from scratch"
        )
    if not 0 < k < layers:
        raise UserError(
            f"train.prune_top_layers={k} must leave at least one of the model's {layers} layers (0 to {layers - 1})"
        )
    roberta = source.params["roberta"]
    kept = jax.tree_util.tree_map(lambda w: w[: layers - k], roberta["layers"])
    return dataclasses.replace(
        source,
        config=source.config.replace(num_hidden_layers=layers - k),
        params={**source.params, "roberta": {**roberta, "layers": kept}},
    )


def adapted(source: ModelSource, cfg: ConfigDict) -> tuple[ModelSource, Adaptation]:
    """The source with the model its `cfg.peft` method needs (adapters/LoRA added), and the trainable split."""
    model, adaptation = plan(cfg, source.config)
    return dataclasses.replace(source, config=model), adaptation


def provenance(phase: str, source: ModelSource, cfg: ConfigDict, **extra: Any) -> dict:
    """The `meta` item of every checkpoint: enough to rebuild the model and trace where it came from."""
    return {
        "phase": phase,
        "parent": source.parent,
        "tokenizer_dir": (
            source.tokenizer_dir
            if hub.looks_like_hub_id(source.tokenizer_dir)
            else files.absolute(source.tokenizer_dir)
        ),
        "model_config": dataclasses.asdict(source.config),
        "config": json.loads(cfg.to_json_best_effort()),
        **extra,
    }


def place(source: ModelSource, model: nn.Module, mesh: Mesh, rules: Rules) -> tuple[Any, Any]:
    """(params, shardings) of `model` on `mesh` from `source`'s weights, for evaluation (analysis, selection,
    DAS importance): placed shard by shard. A bare encoder (RobertaModel) takes the source's encoder."""
    if source.params is None:
        raise UserError(
            f"{source.parent} has no trained weights to evaluate; point to a Hugging Face directory "
            "or a finished phase's workdir"
        )
    shardings = tree_shardings(jax.eval_shape(lambda: init_params(model, jax.random.key(0))), mesh, rules)
    params = source.params["roberta"] if "roberta" not in shardings else source.params
    if missing := [k for k in shardings if k not in params]:
        raise UserError(
            f"{source.parent} has no {', '.join(missing)} weights (a fine-tuned classifier evaluated "
            "as a masked LM?); point to a pretraining phase or a Hugging Face MLM directory"
        )
    return put_tree({k: params[k] for k in shardings}, shardings), shardings
