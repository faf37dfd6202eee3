"""The Flax RoBERTa and its Hugging Face import/export."""

from dontstop_jax.model import gates
from dontstop_jax.model.config import ModelConfig, tiny_config
from dontstop_jax.model.hf_io import check_tokenizer, load_pretrained, read_config, save_pretrained
from dontstop_jax.model.roberta import (
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
    init_params,
    position_ids,
)

__all__ = [
    "ModelConfig",
    "tiny_config",
    "RobertaModel",
    "RobertaForMaskedLM",
    "RobertaForSequenceClassification",
    "init_params",
    "position_ids",
    "load_pretrained",
    "save_pretrained",
    "read_config",
    "check_tokenizer",
    "gates",
]
