"""Trust-region regularisers of fine-tuning (against its instability across seeds): R3F and SMART.

Both penalise how far the classifier's output moves when the input word embeddings are perturbed
(`embedding_noise` of the model), measured by the symmetric KL divergence of the two predicted distributions,
and add `weight` times its mean over examples to the task loss. The extra forward passes run inside the same
jitted train step (engine/steps.py `classification_loss_sums`).

- R3F (Aghajanyan et al. 2021, "Better fine-tuning by reducing representational collapse"; fairseq's
  `sentence_prediction_r3f` defaults): noise from N(0, eps^2) or U(-eps, eps), eps = 1e-5, lambda = 1.
- SMART (Jiang et al. 2020, Algorithm 1 and Section 5): start from N(0, sigma^2) noise, sigma = 1e-5, take
  T = 1 ascent step of size eta = 1e-3 along the gradient of the symmetric KL normalised by its inf-norm
  (or l2), project onto the eps-ball (eps = 1e-5) around the input, and penalise the symmetric KL there with
  lambda_s = 1 (the paper searches {1, 3, 5}). The paper's Bregman proximal point term, mu = 1, adds the
  symmetric KL between the model and a mean teacher, an exponential average of the parameters with beta = 0.99
  (the paper uses 0.99 for the first 10% of the updates and 0.999 after; one beta here), updated after every
  step (`teacher` in the train state). Where the paper projects, MT-DNN's reference code (SmartPerturbation)
  only normalises the perturbed input's direction; this follows the paper.

The penalties are differentiated through both forward passes (as fairseq's R3F; MT-DNN holds each KL's target
distribution fixed: the same value, other gradients). The ascent step's perturbation is a constant to the
parameter gradient (no second order), and the teacher's output is too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from dontstop_jax.errors import UserError
from dontstop_jax.fields import FINETUNE, NOISES, NORMS, build
from dontstop_jax.fields import REGULARIZERS as METHODS

# forward(params, embedding_noise or None, dropout key, deterministic or None = the loss's) -> logits [batch, labels]
Forward = Callable[..., jax.Array]


def default_regularizer_config() -> ConfigDict:
    """R3F's and SMART's defaults (see the module docstring); method none trains on the task loss alone."""
    return build(FINETUNE["regularizer"])


def symmetric_kl(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """KL(p || q) + KL(q || p) per example (over the last axis), in float32: sum (p - q)(log p - log q)."""
    logp = jax.nn.log_softmax(p_logits.astype(jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
    return jnp.sum((jnp.exp(logp) - jnp.exp(logq)) * (logp - logq), axis=-1)


def sample_noise(key: jax.Array, shape: tuple[int, ...], kind: str, scale: float) -> jax.Array:
    """R3F's noise: N(0, scale^2) or U(-scale, scale)."""
    if kind == "normal":
        return scale * jax.random.normal(key, shape, jnp.float32)
    return jax.random.uniform(key, shape, jnp.float32, -scale, scale)


def _per_example(x: jax.Array, norm: str) -> jax.Array:
    """Each example's inf- or l2-norm over its [length, embed] slice, broadcastable against x."""
    axes = tuple(range(1, x.ndim))
    if norm == "inf":
        return jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True))


def ascent_step(delta: jax.Array, grad: jax.Array, step_size: float, radius: float, norm: str) -> jax.Array:
    """One step of SMART's projected normalised gradient ascent: delta + step_size * grad / ||grad|| (per example),
    projected onto the ball of `radius` around zero (inf: clip each coordinate; l2: shrink the example)."""
    tiny = jnp.finfo(jnp.float32).tiny
    delta = delta + step_size * grad / jnp.maximum(_per_example(grad, norm), tiny)
    if norm == "inf":
        return jnp.clip(delta, -radius, radius)
    return delta * jnp.minimum(1.0, radius / jnp.maximum(_per_example(delta, norm), tiny))


@dataclasses.dataclass(frozen=True)
class Regularizer:
    """A fine-tuning regulariser's settings (the `regularizer` section of a fine-tuning config)."""

    method: str
    weight: float = 1.0
    noise: str = "normal"
    noise_scale: float = 1e-5
    step_size: float = 1e-3
    radius: float = 1e-5
    norm: str = "inf"
    steps: int = 1
    bregman_weight: float = 1.0
    bregman_decay: float = 0.99

    @classmethod
    def from_config(cls, cfg: ConfigDict) -> Regularizer | None:
        """None for method none; an unknown method, noise or norm is a UserError."""
        for field, choices in (("method", METHODS), ("noise", NOISES), ("norm", NORMS)):
            if cfg[field] not in choices:
                raise UserError(f"regularizer.{field}={cfg[field]!r} is unknown; use one of {', '.join(choices)}")
        return None if cfg.method == "none" else cls(**cfg.to_dict())

    @property
    def uses_teacher(self) -> bool:
        """Whether the train state keeps SMART's mean teacher (an average of the parameters)."""
        return self.method == "smart" and self.bregman_weight > 0

    def penalty(
        self,
        forward: Forward,
        params: Any,
        clean: jax.Array,
        shape: tuple[int, ...],
        rng: jax.Array,
        teacher: Any = None,
    ) -> jax.Array:
        """The per-example penalty given the unperturbed `clean` logits; `shape` is the embeddings' [batch,
        length, embed]. Perturbed passes draw their own dropout (key folded from `rng`), as separate calls do."""
        noise_key, dropout_key, ascent_key = jax.random.split(jax.random.fold_in(rng, 1), 3)
        if self.method == "r3f":
            noise = sample_noise(noise_key, shape, self.noise, self.noise_scale)
            return self.weight * symmetric_kl(clean, forward(params, noise, dropout_key))
        delta = self.perturbation(
            forward, params, clean, sample_noise(noise_key, shape, "normal", self.noise_scale), ascent_key
        )
        total = self.weight * symmetric_kl(clean, forward(params, delta, dropout_key))
        if self.uses_teacher:
            target = jax.lax.stop_gradient(forward(teacher, None, dropout_key, True))
            total = total + self.bregman_weight * symmetric_kl(clean, target)
        return total

    def perturbation(
        self, forward: Forward, params: Any, clean: jax.Array, delta: jax.Array, key: jax.Array
    ) -> jax.Array:
        """SMART's adversarial input perturbation, from `delta` after `steps` ascent steps (a constant for the
        parameter gradient)."""
        params, target = jax.lax.stop_gradient(params), jax.lax.stop_gradient(clean)
        for i in range(self.steps):
            grad = jax.grad(
                lambda d, i=i: jnp.sum(symmetric_kl(target, forward(params, d, jax.random.fold_in(key, i))))
            )(delta)
            delta = ascent_step(delta, grad, self.step_size, self.radius, self.norm)
        return jax.lax.stop_gradient(delta)
