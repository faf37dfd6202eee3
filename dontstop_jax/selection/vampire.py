"""VAMPIRE (Gururangan et al. 2019): a bag-of-words VAE whose encoder mean is the document embedding.

The paper's kNN-TAPT embeds documents with VAMPIRE trained on the domain corpus; it is cheap (no
transformer) and captures topical similarity. Input: hashed word counts; encoder: an MLP on log counts
-> (mean, log-variance); decoder: softmax over the vocabulary of a linear map of softmax(z) plus the
corpus' background log-frequencies, as in the original. The KL term is annealed in linearly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dontstop_jax.selection.features import dense_counts

Params = dict[str, jax.Array]


def init_params(rng: jax.Array, vocab: int, hidden: int, latent: int, background: np.ndarray) -> Params:
    k = jax.random.split(rng, 4)
    glorot = jax.nn.initializers.glorot_uniform()
    return {
        "w1": glorot(k[0], (vocab, hidden)),
        "b1": jnp.zeros(hidden),
        "w_mu": glorot(k[1], (hidden, latent)),
        "b_mu": jnp.zeros(latent),
        "w_lv": glorot(k[2], (hidden, latent)),
        "b_lv": jnp.zeros(latent),
        "w_dec": glorot(k[3], (latent, vocab)),
        "background": jnp.asarray(background, jnp.float32),
    }


def encode(params: Params, counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, log-variance) of q(z | document)."""
    h = jax.nn.softplus(jnp.log1p(counts) @ params["w1"] + params["b1"])
    return h @ params["w_mu"] + params["b_mu"], h @ params["w_lv"] + params["b_lv"]


def loss(params: Params, counts: jax.Array, rng: jax.Array, kl_weight: jax.Array) -> jax.Array:
    """Mean negative ELBO per document (reconstruction of the counts + weighted KL to N(0, I))."""
    mu, logvar = encode(params, counts)
    z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mu.shape)
    logits = jax.nn.softmax(z) @ params["w_dec"] + jax.lax.stop_gradient(params["background"])
    recon = -(counts * jax.nn.log_softmax(logits)).sum(-1)
    kl = 0.5 * (jnp.exp(logvar) + mu**2 - 1.0 - logvar).sum(-1)
    return (recon + kl_weight * kl).mean()


def train(
    texts: Sequence[str],
    *,
    vocab: int,
    hidden: int,
    latent: int,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> tuple[dict[str, np.ndarray], list[float]]:
    """Fit on `texts` (the domain sample); returns host parameters and the loss curve (every 10 steps)."""
    counts = dense_counts(texts, vocab)
    background = np.log(counts.sum(0) + 1.0) - np.log(counts.sum() + vocab)
    rng, init_rng = jax.random.split(jax.random.key(seed))
    params = init_params(init_rng, vocab, hidden, latent, background)
    tx = optax.adam(learning_rate)
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch, rng, kl_weight):
        value, grads = jax.value_and_grad(loss)(params, batch, rng, kl_weight)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    order = np.random.default_rng(seed)
    curve = []
    for i in range(steps):
        rows = order.integers(0, len(counts), min(batch_size, len(counts)))
        rng, key = jax.random.split(rng)
        kl_weight = jnp.float32(min(1.0, 2 * (i + 1) / steps))  # annealed in over the first half
        params, opt_state, value = step(params, opt_state, counts[rows], key, kl_weight)
        if i % 10 == 0 or i == steps - 1:
            curve.append(float(value))
    return jax.device_get(params), curve


@jax.jit
def _mean(params: Params, counts: jax.Array) -> jax.Array:
    return encode(params, counts)[0]


def embed(params: dict[str, np.ndarray], texts: Sequence[str]) -> np.ndarray:
    """Encoder means [len(texts), latent]: the VAMPIRE document vectors."""
    return np.asarray(_mean(params, dense_counts(texts, params["w1"].shape[0])))
