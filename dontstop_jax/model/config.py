"""RoBERTa hyper-parameters: the fields of a Hugging Face `config.json`, plus our compute options."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dontstop_jax.errors import UserError
from dontstop_jax.fields import DTYPES, REMAT_POLICIES, default_dtype

# Parameter-efficient additions (model/peft.py); all off by default, so the model is exactly RoBERTa.
ADAPTERS = ("none", "houlsby", "pfeiffer")
LORA_TARGETS = ("query", "key", "value", "attention_output", "intermediate", "output")
POOLINGS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    initializer_range: float = 0.02
    # Compute options (not part of the Hugging Face config).
    dtype: str = "float32"  # activations / matmul dtype; parameters stay float32; "auto": default_dtype(backend)
    remat: str = "none"  # jax.checkpoint policy per encoder layer, one of REMAT_POLICIES
    # None (XLA decides), "xla" or "cudnn" for jax.nn.dot_product_attention; cudnn (GPUs: flash attention) needs
    # bfloat16/float16 compute and right-padded batches (padding given to it as key lengths; every loader here pads
    # on the right), and is used where attention dropout is off (eval, or attention_probs_dropout_prob=0);
    # "splash": the Pallas splash kernel on TPUs (takes the packed documents' segment ids; lengths that are a
    # multiple of 128), also only where attention dropout is off
    attention_impl: str | None = None
    # Parameter-efficient additions (not part of the Hugging Face config either).
    adapter: str = "none"  # bottleneck adapters: houlsby (after attention and FFN) or pfeiffer (after FFN)
    adapter_size: int = 64  # adapter bottleneck width
    lora_rank: int = 0  # 0 = no LoRA
    lora_alpha: float = 16.0  # LoRA update scale is lora_alpha / lora_rank
    lora_targets: tuple[str, ...] = ("query", "value")
    pooling: str = "cls"  # classifier input: the <s> state (RoBERTa's head) or the mean over real tokens
    # Layout (not part of the Hugging Face config): the word-embedding table and the MLM head's bias get
    # `padded_vocab_size` rows, a multiple of this, so `vocab -> tensor` divides them (50265 -> 50304); the
    # extra ids are never predicted. Import pads with zero rows, export slices them off.
    vocab_pad_multiple: int = 128

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; pick a head count that divides it"
            )
        if self.remat not in REMAT_POLICIES:
            raise UserError(f"model.remat={self.remat!r} is unknown; use one of {REMAT_POLICIES}")
        if self.dtype == "auto":
            object.__setattr__(self, "dtype", default_dtype(jax.default_backend()))
        if self.dtype not in DTYPES:
            raise UserError(f"model.dtype={self.dtype!r} is unknown; use auto, float32, bfloat16 or float16")
        if self.attention_impl not in (None, "xla", "cudnn", "splash"):
            raise UserError(
                f"model.attention_impl={self.attention_impl!r} is unknown; use xla, cudnn (GPUs) or splash "
                "(TPUs), or leave it unset"
            )
        if self.attention_impl == "cudnn" and self.dtype == "float32":
            raise UserError(
                "model.attention_impl=cudnn has no float32 kernel; set model.dtype=bfloat16 (or float16) "
                "or leave attention_impl unset"
            )
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # JSON metadata gives lists
        if self.adapter not in ADAPTERS:
            raise UserError(f"adapter={self.adapter!r} is unknown; use one of {ADAPTERS}")
        if self.adapter != "none" and self.adapter_size < 1:
            raise UserError(f"adapter_size={self.adapter_size} must be >= 1")
        if self.lora_rank < 0 or set(self.lora_targets) - set(LORA_TARGETS):
            raise UserError(
                f"lora_rank={self.lora_rank} / lora_targets={self.lora_targets} are invalid; use a "
                f"rank >= 0 and targets among {LORA_TARGETS}"
            )
        if self.pooling not in POOLINGS:
            raise UserError(f"pooling={self.pooling!r} is unknown; use one of {POOLINGS}")
        if self.vocab_pad_multiple < 1:
            raise UserError(f"model.vocab_pad_multiple={self.vocab_pad_multiple} must be >= 1 (1 = no padding)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding table and the MLM head: vocab_size rounded up to vocab_pad_multiple. Ids from
        vocab_size on exist only so the table shards evenly; tokenizer checks use vocab_size."""
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m

    @property
    def max_seq_length(self) -> int:
        """Longest input: RoBERTa's positions start at pad_token_id + 1."""
        return self.max_position_embeddings - self.pad_token_id - 1

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **kwargs: Any) -> ModelConfig:
        return dataclasses.replace(self, **kwargs)

    @classmethod
    def recorded(cls, fields: dict, **overrides: Any) -> ModelConfig:
        """The config a checkpoint's meta or an adapter file recorded. Those written before the vocabulary was
        padded name no `vocab_pad_multiple`: their tables have exactly vocab_size rows (multiple 1)."""
        return cls(**{"vocab_pad_multiple": 1, **fields, **overrides})

    # -- Hugging Face config.json ------------------------------------------------------------
    HF_FIELDS = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "type_vocab_size",
        "layer_norm_eps",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "classifier_dropout",
        "initializer_range",
    )

    @classmethod
    def from_hf_dict(cls, d: dict, **overrides: Any) -> ModelConfig:
        if d.get("model_type", "roberta") not in ("roberta", "xlm-roberta"):
            raise UserError(
                f"config.json has model_type={d.get('model_type')!r}; only RoBERTa checkpoints are supported"
            )
        act = d.get("hidden_act", "gelu")
        if act != "gelu":
            raise UserError(f"config.json has hidden_act={act!r}; only RoBERTa's exact 'gelu' is supported")
        kwargs = {k: d[k] for k in cls.HF_FIELDS if d.get(k) is not None}  # None = keep our default
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.HF_FIELDS}
        d.update(model_type="roberta", hidden_act="gelu", position_embedding_type="absolute")
        return d


def tiny_config(**overrides: Any) -> ModelConfig:
    """A model small enough for unit tests and the offline default on 2 CPU cores."""
    base: dict[str, Any] = dict(
        vocab_size=1024,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=130,
    )
    base.update(overrides)
    return ModelConfig(**base)
