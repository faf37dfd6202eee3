"""Flax (linen) RoBERTa, numerically the Hugging Face one (see tests/test_hf_parity.py).

Layout choices that later features rely on:
- Encoder layers are stacked with `nn.scan`: every layer parameter has a leading `layers` axis, so
  per-layer quantities (DAS unit importances and gradient masks, LoRA) are plain arrays of shape [L, ...].
- Attention projections have an explicit heads axis ([embed, heads, kv]), so a head is a
  slice of the parameter, not a range of columns.
- Every parameter is annotated with logical axis names; `dontstop_jax.engine.sharding` maps them to mesh
  axes from the config's rules. Nothing here mentions a mesh axis.
- `gates` (optional) multiply each head's output, each FFN intermediate unit and each FFN output unit: the
  virtual gates DAS differentiates to measure unit importance. Gates of ones are the identity.
- `embedding_noise` (optional, [batch, length, embed]) is added to the word embeddings, before the position
  embeddings and the LayerNorm: the input perturbation of R3F and SMART (engine/regularizers.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dontstop_jax.model.config import ModelConfig
from dontstop_jax.model.gates import UnitGates
from dontstop_jax.model.peft import adapt, add_lora

Array = jax.Array
Gates = Mapping[str, Array]  # {"head": [L, heads], "intermediate": [L, mlp], "output": [L, embed]}

_REMAT_POLICY = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _init(cfg: ModelConfig, *axes: str):
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), axes)


def _vocab_rows(cfg: ModelConfig):
    """The word-embedding initialiser: normal rows for real ids, zero rows for the padding ids (never used)."""
    normal = nn.initializers.normal(cfg.initializer_range)

    def init(key, shape, dtype=jnp.float32):
        return jnp.where(jnp.arange(shape[0])[:, None] < cfg.vocab_size, normal(key, shape, dtype), 0).astype(dtype)

    return nn.with_logical_partitioning(init, ("vocab", "embed"))


# Logit of a padding id: exp() of it is exactly 0 in float32, and it stays finite (sums of logits, KL terms).
PAD_LOGIT = -1e9


def _zeros(*axes: str):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps,
        dtype=cfg.compute_dtype,
        name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=_zeros("norm"),
    )


def _dense(cfg: ModelConfig, features: int, axes: tuple[str, str], name: str) -> nn.Dense:
    return nn.Dense(
        features, dtype=cfg.compute_dtype, kernel_init=_init(cfg, *axes), bias_init=_zeros(axes[1]), name=name
    )


def position_ids(input_ids: Array, pad_token_id: int, attention_mask: Array | None = None) -> Array:
    """RoBERTa's positions: count real tokens from pad_token_id + 1; padding keeps pad_token_id. The count
    restarts where the mask's segment id changes from one non-zero value to another (a packed document starts,
    see `attention_pairs`); a 0/1 mask has one segment, which is exactly Hugging Face's numbering."""
    not_pad = (input_ids != pad_token_id).astype(jnp.int32)
    count = jnp.cumsum(not_pad, axis=1)
    if attention_mask is not None:
        seg = attention_mask.astype(jnp.int32)
        prev = jnp.pad(seg[:, :-1], ((0, 0), (1, 0)))
        starts = (seg != prev) & (seg > 0) & (prev > 0)
        count = count - jax.lax.cummax(jnp.where(starts, count - not_pad, 0), axis=1)
    return count * not_pad + pad_token_id


def attention_pairs(attention_mask: Array) -> Array:
    """bool [batch, 1 (heads), queries, keys] from a [batch, length] mask whose 0s are padding and whose other
    values name segments (packed documents, data/masking.py `document_segments`): a token sees the real tokens
    of its own segment. A 0/1 mask is the usual padding mask; padding queries see every real token (their
    outputs are never used, and no row is empty)."""
    seg = attention_mask.astype(jnp.int32)
    q, k = seg[:, None, :, None], seg[:, None, None, :]
    return ((q == k) | (q == 0)) & (k > 0)


class Embeddings(nn.Module):
    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.word_embeddings = nn.Embed(
            cfg.padded_vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, embedding_init=_vocab_rows(cfg)
        )
        self.position_embeddings = nn.Embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            dtype=cfg.compute_dtype,
            embedding_init=_init(cfg, "position", "embed"),
        )
        self.token_type_embeddings = nn.Embed(
            cfg.type_vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, embedding_init=_init(cfg, "type", "embed")
        )
        self.layer_norm = _layer_norm(cfg, "LayerNorm")
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def __call__(
        self, input_ids: Array, attention_mask: Array, deterministic: bool, noise: Array | None = None
    ) -> Array:
        cfg = self.config
        words = self.word_embeddings(input_ids)
        if noise is not None:  # in float32: a 1e-5 perturbation vanishes in bfloat16 embeddings
            words = words.astype(jnp.float32) + nn.with_logical_constraint(noise, ("batch", "length", "act_embed"))
        h = (
            words
            + self.position_embeddings(position_ids(input_ids, cfg.pad_token_id, attention_mask))
            + self.token_type_embeddings(jnp.zeros_like(input_ids))
        )
        return self.dropout(self.layer_norm(h), deterministic=deterministic)


class HeadsProjection(nn.Module):
    """[batch, length, embed] -> [batch, length, heads, kv]; kernel [embed, heads, kv] (a head is a slice).

    Written out rather than nn.DenseGeneral, whose flat-kernel initialiser breaks under logical constraints.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        shape = (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim)
        kernel = self.param("kernel", _init(cfg, "embed", "heads", "kv"), shape).astype(cfg.compute_dtype)
        bias = self.param("bias", _zeros("heads", "kv"), shape[1:]).astype(cfg.compute_dtype)
        return jnp.einsum("btd,dhk->bthk", x.astype(cfg.compute_dtype), kernel) + bias


class HeadsOutput(nn.Module):
    """[batch, length, heads, kv] -> [batch, length, embed]; kernel [heads, kv, embed]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        shape = (cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size)
        kernel = self.param("kernel", _init(cfg, "heads", "kv", "embed"), shape).astype(cfg.compute_dtype)
        bias = self.param("bias", _zeros("embed"), shape[-1:]).astype(cfg.compute_dtype)
        return jnp.einsum("bthk,hkd->btd", x, kernel) + bias


class Layer(nn.Module):
    """One post-LayerNorm transformer layer, written as an `nn.scan` body: (h, mask, segments, gates) -> (h, None);
    `mask` is `attention_pairs(segments)`, `segments` the [batch, length] attention mask (for the splash kernel)."""

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, h: Array, mask: Array, segments: Array, gates: Gates | None):
        cfg, det = self.config, self.deterministic
        gates = gates or {}

        q, k, v = (
            add_lora(cfg, n, HeadsProjection(cfg, name=n)(h), h, ("embed",), ("heads", "kv"))
            for n in ("query", "key", "value")
        )
        ctx = self._attention(q, k, v, mask, segments)  # [batch, length, heads, kv]
        if "head" in gates:
            ctx = ctx * gates["head"][:, None].astype(ctx.dtype)
        attn_out = add_lora(
            cfg, "attention_output", HeadsOutput(cfg, name="attention_output")(ctx), ctx, ("heads", "kv"), ("embed",)
        )
        attn_out = nn.Dropout(cfg.hidden_dropout_prob)(attn_out, deterministic=det)
        attn_out = adapt(cfg, "attention", attn_out)
        h = _layer_norm(cfg, "attention_LayerNorm")(attn_out + h)

        inter = add_lora(
            cfg,
            "intermediate",
            _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "intermediate")(h),
            h,
            ("embed",),
            ("mlp",),
        )
        inter = nn.gelu(inter, approximate=False)
        if "intermediate" in gates:
            inter = inter * gates["intermediate"].astype(inter.dtype)
        out = add_lora(
            cfg, "output", _dense(cfg, cfg.hidden_size, ("mlp", "embed"), "output")(inter), inter, ("mlp",), ("embed",)
        )
        out = nn.Dropout(cfg.hidden_dropout_prob)(out, deterministic=det)
        if "output" in gates:
            out = out * gates["output"].astype(out.dtype)
        out = adapt(cfg, "output", out)
        h = _layer_norm(cfg, "output_LayerNorm")(out + h)
        return nn.with_logical_constraint(h, ("batch", "length", "act_embed")), None

    def _attention(self, q: Array, k: Array, v: Array, mask: Array, segments: Array) -> Array:
        cfg = self.config
        rate = cfg.attention_probs_dropout_prob
        if self.deterministic or rate == 0.0:
            # The fused path (cuDNN flash attention on GPUs when attention_impl="cudnn").
            if cfg.attention_impl == "cudnn":
                # cuDNN reads a mask as a [batch, heads, queries, keys] bias and refuses our broadcast one; padding
                # goes in as key lengths instead (batches are right-padded). >= 1 keeps an all-padding row finite.
                # (A packed row's document segments cannot be key lengths: phases/pretrain.py refuses them.)
                lengths = jnp.maximum(jnp.sum(mask[:, 0, 0, :], axis=-1, dtype=jnp.int32), 1)
                return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
            if cfg.attention_impl == "splash":
                if q.shape[1] % SPLASH_BLOCK == 0:
                    return splash_attention(q, k, v, segments)
                return jax.nn.dot_product_attention(q, k, v, mask=mask)  # a length the kernel does not tile
            return jax.nn.dot_product_attention(
                q, k, v, mask=mask, implementation="xla" if cfg.attention_impl else None
            )
        # Dropout on attention probabilities needs the probabilities, so training with it takes this path.
        return explicit_attention(q, k, v, mask, lambda probs: nn.Dropout(rate)(probs, deterministic=False))


SPLASH_BLOCK = 128  # the splash kernel's tile along the sequence; other lengths take XLA's fused attention


def splash_attention(q: Array, k: Array, v: Array, segments: Array, interpret: bool = False) -> Array:
    """[batch, length, heads, kv] attention by the Pallas splash (flash) kernel for TPUs. `segments` [batch,
    length] (0 padding, else a document id): a token sees the tokens of its own segment, so packed documents
    stay apart. Padding queries see padding keys only (their outputs are never read; a 0/1 mask's real tokens
    see exactly the real tokens, as in `attention_pairs`). Under a mesh the kernel runs per shard (shard_map over
    the batch and heads axes the logical rules give activations). `interpret`: run the kernel in Python (CPU)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    def per_shard(q, k, v, segments):
        heads, length = q.shape[2], q.shape[1]
        block = min(512, length) if length % min(512, length) == 0 else SPLASH_BLOCK
        kernel = splash.make_splash_mha(
            splash.MultiHeadMask([splash.FullMask((length, length))] * heads),
            head_shards=1,
            q_seq_shards=1,
            block_sizes=splash.BlockSizes(
                block_q=block,
                block_kv=block,
                block_kv_compute=block,
                block_q_dkv=block,
                block_kv_dkv=block,
                block_kv_dkv_compute=block,
                block_q_dq=block,
                block_kv_dq=block,
            ),
            interpret=interpret,
        )
        heads_first = lambda x: x.transpose(0, 2, 1, 3)
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, splash.SegmentIds(s, s)))(
            heads_first(q * q.shape[-1] ** -0.5), heads_first(k), heads_first(v), segments
        )
        return heads_first(out)

    if jax.sharding.get_abstract_mesh().empty:
        return per_shard(q, k, v, segments)
    spec = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
    return jax.shard_map(
        per_shard, in_specs=(spec, spec, spec, jax.sharding.PartitionSpec(*spec[:2])), out_specs=spec, check_vma=False
    )(q, k, v, segments)


def explicit_attention(q: Array, k: Array, v: Array, mask: Array, dropout=lambda probs: probs) -> Array:
    """RoBERTa's attention written out: float32 [batch, heads, queries, keys] probabilities, `dropout` applied to
    them. The fused path (jax.nn.dot_product_attention) computes the same without materialising them."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhqk,bkhd->bqhd", dropout(jax.nn.softmax(scores, axis=-1)).astype(v.dtype), v)


class RobertaModel(nn.Module):
    """Embeddings + encoder; returns the last hidden states [batch, length, embed]."""

    config: ModelConfig

    def setup(self):
        self.embeddings = Embeddings(self.config)

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array,
        *,
        deterministic: bool = True,
        gates: Gates | None = None,
        embedding_noise: Array | None = None,
    ) -> Array:
        cfg = self.config
        h = self.embeddings(input_ids, attention_mask, deterministic, embedding_noise)
        h = nn.with_logical_constraint(h, ("batch", "length", "act_embed"))
        mask = attention_pairs(attention_mask)
        layer = Layer
        if cfg.remat != "none":
            layer = nn.remat(Layer, policy=_REMAT_POLICY[cfg.remat], prevent_cse=False)
        stack = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, 0),
            length=cfg.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        h, _ = stack(cfg, deterministic, name="layers")(h, mask, attention_mask.astype(jnp.int32), gates)
        return h


class LMHead(nn.Module):
    """dense -> gelu -> LayerNorm -> decoder tied to the word embeddings (+ its own bias).

    Logits span `padded_vocab_size` (so they stay sharded over `vocab`); the padding ids' logits are PAD_LOGIT,
    so they get probability 0 and are never the argmax: losses and accuracies see only the real vocabulary.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, h: Array, word_embeddings: Array) -> Array:
        cfg = self.config
        # The output of `dense` is contracted with the embedding table, so it stays unsharded ("embed_out" ->
        # replicated). Naming it "mlp" put it on `tensor` against the table's `fsdp`, a layout on which XLA
        # computed wrong gradients (jax 0.10, (2,2,2) mesh; see tests/test_engine.py).
        x = nn.gelu(_dense(cfg, cfg.hidden_size, ("embed", "embed_out"), "dense")(h), approximate=False)
        x = _layer_norm(cfg, "layer_norm")(x)
        bias = self.param("bias", _zeros("vocab"), (cfg.padded_vocab_size,))
        logits = jnp.einsum("...d,vd->...v", x, word_embeddings.astype(x.dtype))
        logits = logits.astype(jnp.float32) + bias  # losses are computed in float32
        if cfg.padded_vocab_size == cfg.vocab_size:
            return logits
        return jnp.where(jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size, logits, PAD_LOGIT)


class RobertaForMaskedLM(nn.Module):
    config: ModelConfig

    def setup(self):
        self.roberta = RobertaModel(self.config)
        self.lm_head = LMHead(self.config)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array,
        mlm_positions: Array | None = None,
        *,
        deterministic: bool = True,
        gates: Gates | None = None,
    ) -> Array:
        """Vocabulary logits [..., padded_vocab_size] at `mlm_positions` [batch, slots] only (all positions when
        None); the columns from vocab_size on are padding (see LMHead).

        Projecting only the masked slots onto the vocabulary is what makes the MLM step cheap: at seq 512
        that is ~80 rows per sequence instead of 512.
        """
        h = self.roberta(input_ids, attention_mask, deterministic=deterministic, gates=gates)
        if mlm_positions is not None:
            h = jnp.take_along_axis(h, mlm_positions[..., None], axis=1)
        return self.lm_head(h, self.roberta.embeddings.word_embeddings.embedding)


class ClassificationHead(nn.Module):
    """Hugging Face's RobertaClassificationHead: dropout, dense+tanh, dropout, out_proj on `<s>`.

    With config.pooling="mean" it reads the mean over real tokens instead (feature extraction's other
    common choice; no Hugging Face equivalent).
    """

    config: ModelConfig
    num_labels: int

    @nn.compact
    def __call__(self, h: Array, deterministic: bool, attention_mask: Array) -> Array:
        cfg = self.config
        rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        if cfg.pooling == "mean":
            w = attention_mask.astype(h.dtype)[..., None]
            pooled = jnp.sum(h * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1)
        else:
            pooled = h[:, 0]
        x = nn.Dropout(rate)(pooled, deterministic=deterministic)
        x = jnp.tanh(_dense(cfg, cfg.hidden_size, ("embed", "mlp"), "dense")(x))
        x = nn.Dropout(rate)(x, deterministic=deterministic)
        return _dense(cfg, self.num_labels, ("mlp", "labels"), "out_proj")(x).astype(jnp.float32)


class RobertaForSequenceClassification(nn.Module):
    """`unit_gates` (model/gates.py): fixed gates applied whenever the call passes none (a HAT task's units)."""

    config: ModelConfig
    num_labels: int
    unit_gates: UnitGates | None = None

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array,
        *,
        deterministic: bool = True,
        gates: Gates | None = None,
        embedding_noise: Array | None = None,
    ) -> Array:
        if gates is None and self.unit_gates is not None:
            gates = {k: jnp.asarray(v) for k, v in self.unit_gates.as_dict().items()}
        h = RobertaModel(self.config, name="roberta")(
            input_ids, attention_mask, deterministic=deterministic, gates=gates, embedding_noise=embedding_noise
        )
        return ClassificationHead(self.config, self.num_labels, name="classifier")(h, deterministic, attention_mask)


def init_params(module: nn.Module, rng: Array, seq_len: int = 8) -> Any:
    """Boxed (logically partitioned) parameters of `module` for a dummy batch."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return module.init({"params": rng, "dropout": rng}, ids, jnp.ones_like(ids))["params"]
