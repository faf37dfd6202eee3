"""Shared check: a phase exported to Hugging Face format gives our model's logits in transformers."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from dontstop_jax.data import load_tokenizer
from dontstop_jax.engine.checkpoint import Checkpointer
from dontstop_jax.model import ModelConfig, RobertaForSequenceClassification
from dontstop_jax.train.workdir import require_finished


def assert_transformers_logits_match(phase: Path, exported: Path) -> dict:
    """Compare transformers' logits of `exported` with ours from `phase`'s best checkpoint (the step its summary
    reports, which `dontstop export` reads); returns its meta."""
    import torch
    import transformers

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(exported).eval()
    tok = load_tokenizer(exported)
    batch = tok(["voul ve kai tohe", "ba zus za de bou mu ki"], padding=True, return_tensors="np")
    ckpt = Checkpointer(phase / "checkpoints", read_only=True)
    best = require_finished(phase, "phase")["best_step"]
    meta = ckpt.meta(best)
    ours = RobertaForSequenceClassification(ModelConfig.recorded(meta["model_config"]), len(meta["label_names"])).apply(
        {"params": ckpt.restore_params(best)}, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    )
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]))
    np.testing.assert_allclose(theirs.logits.numpy(), np.asarray(ours), atol=1e-4)
    assert hf.config.id2label[0] == meta["label_names"][0]
    return meta
