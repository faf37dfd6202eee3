"""Document embeddings for kNN selection, picked in config (`embedding.kind`):

- "vampire": the paper's choice, a bag-of-words VAE trained on a sample of the domain corpus;
- "tfidf": hashed TF-IDF (sublinear tf, smoothed idf from the same sample), no training;
- "lm": the mean-pooled last hidden states of a model (`embedding.init`: HF directory or phase workdir).

An embedder is fitted once and its arrays saved beside the selection, so a resumed run embeds the rest of
the corpus with exactly the same function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from dontstop_jax.errors import UserError
from dontstop_jax.selection import vampire
from dontstop_jax.selection.features import dense_counts

KINDS = ("vampire", "tfidf", "lm")
Embed = Callable[[Sequence[str]], np.ndarray]


def fit(cfg: ConfigDict, sample: Sequence[str], seed: int) -> dict[str, np.ndarray]:
    """The arrays that define the embedder (empty for "lm", whose weights come from `cfg.init`)."""
    if cfg.kind not in KINDS:
        raise UserError(f"unknown embedding kind {cfg.kind!r}; choose one of {KINDS}")
    if cfg.kind == "tfidf":
        counts = dense_counts(sample, cfg.dim, cfg.ngrams)
        df = (counts > 0).sum(0)
        return {"idf": (np.log((1.0 + len(sample)) / (1.0 + df)) + 1.0).astype(np.float32)}
    if cfg.kind == "vampire":
        v = cfg.vampire
        params, curve = vampire.train(
            sample,
            vocab=cfg.dim,
            hidden=v.hidden,
            latent=v.latent,
            steps=v.steps,
            batch_size=v.batch_size,
            learning_rate=v.learning_rate,
            seed=seed,
        )
        return {**params, "loss_curve": np.asarray(curve, np.float32)}
    return {}


def embedder(cfg: ConfigDict, arrays: dict[str, np.ndarray]) -> Embed:
    """texts -> [len(texts), d] float32 vectors, from `fit`'s arrays."""
    if cfg.kind == "tfidf":
        idf = arrays["idf"]
        return lambda texts: np.log1p(dense_counts(texts, cfg.dim, cfg.ngrams)) * idf
    if cfg.kind == "vampire":
        params = {k: v for k, v in arrays.items() if k != "loss_curve"}
        return lambda texts: vampire.embed(params, texts)
    return _lm_embedder(cfg.lm)


def _lm_embedder(cfg: ConfigDict) -> Embed:
    from dontstop_jax.data import load_tokenizer, special_ids, tokenize_split
    from dontstop_jax.engine.sharding import MESH_AXES
    from dontstop_jax.fields import DEFAULT_RULES
    from dontstop_jax.model import RobertaModel
    from dontstop_jax.train.source import place, resolve

    if not cfg.init:
        raise UserError("embedding.kind=lm needs embedding.lm.init: a Hugging Face directory or a phase workdir")
    source = resolve(cfg.init)
    tokenizer = load_tokenizer(source.tokenizer_dir)
    pad = special_ids(tokenizer)["pad"]
    length = min(cfg.max_seq_length, source.config.max_seq_length)
    model = RobertaModel(source.config)
    one_device = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), MESH_AXES)
    params, _ = place(source, model, one_device, DEFAULT_RULES)

    @jax.jit
    def pooled(params, ids, mask):  # params as an argument, not a closure: no weights baked into the program
        h = model.apply({"params": params}, ids, mask, deterministic=True)
        m = mask[..., None].astype(h.dtype)
        return (h * m).sum(1) / jnp.maximum(m.sum(1), 1.0)

    def embed(texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), cfg.batch_size):  # fixed [batch, length] shape: one compilation
            tokens = tokenize_split(texts[start : start + cfg.batch_size], tokenizer, length)
            ids = np.full((cfg.batch_size, length), pad, np.int32)
            for r, t in enumerate(tokens):
                ids[r, : len(t)] = t
            mask = (ids != pad).astype(np.int32)
            mask[len(tokens) :, 0] = 1  # filler rows: one visible token, no all-masked attention
            out.append(np.asarray(pooled(params, ids, mask))[: len(tokens)])
        return np.concatenate(out).astype(np.float32)

    return embed
