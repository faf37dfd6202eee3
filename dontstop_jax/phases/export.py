"""Export a phase's checkpoint as a Hugging Face directory (parameters only: no optimizer state is read),
or only what a parameter-efficient phase trained, as a small file."""

from __future__ import annotations

from ml_collections import ConfigDict

from dontstop_jax import files
from dontstop_jax.distributed import on_first_process
from dontstop_jax.engine.checkpoint import Checkpointer
from dontstop_jax.engine.peft import Adaptation, default_peft_config
from dontstop_jax.errors import UserError
from dontstop_jax.files import write_json
from dontstop_jax.model import ModelConfig, gates, save_pretrained
from dontstop_jax.model.peft import merge_lora, save_delta
from dontstop_jax.train.source import phase_checkpoints, relocated
from dontstop_jax.train.workdir import finished, require_finished

PROMPT_FILE = "prompt.json"  # beside an exported prompt-based fine-tune: its template, verbalizer and labels


def _load(workdir: str, step: int | None) -> tuple[dict, ModelConfig, dict]:
    """Any phase's explicitly named `step`, else a finished phase's reported step (a fine-tune's best, else the
    latest) or, if that one is damaged, the newest readable step."""
    directory = phase_checkpoints(files.path(workdir))
    if directory is None:
        raise UserError(
            f"--from={workdir!r} is not a phase workdir (it has no checkpoints/); pass the workdir of "
            "a finished pretrain or finetune run"
        )
    done = require_finished(directory.parent, "--from") if step is None else finished(directory.parent) or {}
    first = done.get("best_step") if step is None else None
    _, meta, params = Checkpointer(directory, read_only=True).read(step, first=first)
    meta = {**meta, "tokenizer_dir": relocated(meta["tokenizer_dir"], done.get("workdir"), directory.parent)}
    return meta, ModelConfig.recorded(meta["model_config"]), params


def export(workdir: str, out_dir: str, step: int | None = None) -> files.Path:
    """LoRA is merged into the base kernels and fixed unit gates (finetune's `unit_gates`) into the kernels that
    read the units (same logits); a prompt-based fine-tune is a masked LM, written with its `PROMPT_FILE`;
    adapters and mean pooling have no Hugging Face
    RoBERTa equivalent, so those models are refused rather than exported without them. Every process reads
    (restores are collective); the first one writes."""
    meta, cfg, params = _load(workdir, step)
    cfg, params = merge_lora(cfg, params)
    params = gates.fold(params, gates.recorded(meta, cfg))  # a gated fine-tune's (HAT) unit gates
    if cfg.adapter != "none" or (cfg.pooling != "cls" and meta.get("head") == "classification"):
        raise UserError(
            f"{workdir} has {cfg.adapter} adapters or {cfg.pooling} pooling, which a Hugging Face "
            "RoBERTa cannot hold; export the adapter file instead (`dontstop export --peft-only`)"
        )
    on_first_process(
        "export",
        lambda: save_pretrained(
            out_dir,
            cfg,
            params,
            meta.get("head", "mlm"),
            tokenizer_dir=meta["tokenizer_dir"],
            label_names=meta.get("label_names"),
        ),
    )
    if "prompt" in meta:  # a prompt-based fine-tune is its MLM plus how to read it (engine/prompt.py)
        on_first_process(
            "export_prompt",
            lambda: write_json(
                files.path(out_dir) / PROMPT_FILE, {**meta["prompt"], "label_names": meta["label_names"]}
            ),
        )
    return files.path(out_dir)


def export_delta(workdir: str, out_file: str, step: int | None = None) -> files.Path:
    """The leaves the phase's `peft.method` trained (adapters/LoRA, biases, norms, head) as safetensors;
    `dontstop_jax.model.peft.load_delta(file, base_params)` puts them back onto the base model.
    Every process reads (restores are collective); the first one writes."""
    meta, cfg, params = _load(workdir, step)
    peft = meta["config"].get("peft", default_peft_config().to_dict())
    adaptation = Adaptation.from_config(ConfigDict(peft), cfg)
    if adaptation.method in ("full", "top_k"):
        raise UserError(
            f"{workdir} trained with peft.method={adaptation.method}, which changes whole encoder "
            "weights; export the full model instead (without --peft-only)"
        )
    if files.path(out_file).is_dir():
        raise UserError(f"{out_file} is a directory; --peft-only writes one file, e.g. out/peft.safetensors")
    on_first_process("export_delta", lambda: save_delta(out_file, params, adaptation.trainable(params), cfg))
    return files.path(out_file)
