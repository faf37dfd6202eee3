"""Export a phase's checkpoint as a Hugging Face directory (parameters only: no optimizer state is read)."""

from __future__ import annotations

from pathlib import Path

from dontstop_jax.engine.checkpoint import Checkpointer
from dontstop_jax.model import ModelConfig, save_pretrained
from dontstop_jax.phases.source import phase_checkpoints


def export(workdir: str, out_dir: str, step: int | None = None) -> Path:
    ckpt = Checkpointer(phase_checkpoints(Path(workdir)), read_only=True)
    step = step if step is not None else (ckpt.best_step() or ckpt.latest_step())
    meta = ckpt.meta(step)
    cfg = ModelConfig(**meta["model_config"])
    return save_pretrained(out_dir, cfg, ckpt.restore_params(step), meta.get("head", "mlm"),
                           tokenizer_dir=meta["tokenizer_dir"], label_names=meta.get("label_names"))
