"""HAT (Serra et al. 2018, "Overcoming catastrophic forgetting with hard attention to the task") as the
parameter-isolation baseline of continual DAP-training, on DAS's units: attention heads and FFN intermediate
units (the model's `gates`; FFN output units are not gated).

Domain t has a learnable embedding e per unit; its mask a = sigmoid(s x e) gates the unit while domain t trains.
The slope s anneals linearly from 1/s_max to s_max (paper eq. 3; s_max = 400, the paper's value) over the
stage's steps: the paper restarts the ramp every epoch, a DAP stage is one pass (DAPT's default), so one ramp.
The loss adds c x R (c = 0.75, the paper's), R = sum a (1 - a_past) / sum (1 - a_past) over all units (eq. 5):
it pushes the domain to use few units, preferring ones the past domains left free. The embeddings' gradients
are compensated (eq. 6: x s_max (cosh(s e) + 1) / (s (cosh(e) + 1)), s e clipped to +-50 as in the paper's code)
and e is clipped to +-6 (the code clamps it after each step; here the forward pass clips it, same masks).

After the stage, the domain's mask at s = s_max is max-accumulated with the past domains' (a_past) and saved;
the next stage multiplies the gradient and the optimizer's update of every parameter slice of a unit by
(1 - a_past) (as DAS's soft mask, das/softmask.py, on HAT's slices: a unit's incoming weights and the
outgoing weights that read only it). Embeddings, LayerNorms, the attention- and FFN-output biases and the LM
head are shared and unblocked (continual's `frozen` can hold them).

The embeddings are extra parameters of the stage's model (`HatMaskedLM`, named per domain so a stage never
inherits its parent's); the next stage, fine-tuning and export read only the RoBERTa weights. A domain's task is
fine-tuned and scored under the domain's saved mask, through finetune's `unit_gates` (model/gates.py).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dontstop_jax.das import softmask
from dontstop_jax.das.importance import Importance
from dontstop_jax.engine.steps import Fixed, Hooks, mlm_loss_sums
from dontstop_jax.model import RobertaForMaskedLM

KINDS = ("head", "intermediate")  # the gated units; Importance's "output" stays 0 (never gated, never blocked)
THRES_COSH, THRES_EMB = 50.0, 6.0  # the paper's code: compensation's clip of s e, and the embeddings' range
# (module under roberta/layers, parameter) -> (unit kind, axis of the unit): the unit's incoming weights and biases,
# and the outgoing kernel slices that read only it (attention_output's heads axis, output's mlp axis).
SLICES: dict[tuple[str, str], tuple[str, int]] = {
    **{(m, "kernel"): ("head", 2) for m in ("query", "key", "value")},
    **{(m, "bias"): ("head", 1) for m in ("query", "key", "value")},
    ("attention_output", "kernel"): ("head", 1),
    ("intermediate", "kernel"): ("intermediate", 2),
    ("intermediate", "bias"): ("intermediate", 1),
    ("output", "kernel"): ("intermediate", 1),
}


def param_name(domain: int, kind: str) -> str:
    return f"hat{domain}_{kind}"


class HatMaskedLM(RobertaForMaskedLM):
    """The masked LM plus domain `domain`'s HAT embeddings, N(0, 1) as in the paper ([layers, units] each, top-level
    parameters `hat{domain}_head`, `hat{domain}_intermediate`); the loss reads them, the model's call does not."""

    domain: int = 0

    def setup(self):
        super().setup()
        cfg = self.config
        units = {"head": (cfg.num_attention_heads, "heads"), "intermediate": (cfg.intermediate_size, "mlp")}
        for kind, (n, axis) in units.items():
            init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("layers", axis))
            self.param(param_name(self.domain, kind), init, (cfg.num_hidden_layers, n))


def anneal(step: Any, total: int, s_max: float) -> Any:
    """s at 0-based `step` of a `total`-step stage: 1/s_max + (s_max - 1/s_max) x step / (total - 1) (eq. 3 with
    b - 1 = step, B = total), held at s_max past the end."""
    return 1 / s_max + (s_max - 1 / s_max) * jnp.minimum(step / max(total - 1, 1), 1.0)


def _compensated(e: jax.Array, s: Any, s_max: float) -> jax.Array:
    """`e` (same value) whose gradient is multiplied by eq. 6's factor: the annealed sigmoid's gradient would
    otherwise be ~s times too small early in the stage and its embeddings barely move."""
    factor = jax.lax.stop_gradient(
        s_max * (jnp.cosh(jnp.clip(s * e, -THRES_COSH, THRES_COSH)) + 1) / (s * (jnp.cosh(e) + 1))
    )
    return jax.lax.stop_gradient(e) + factor * (e - jax.lax.stop_gradient(e))


def gates(params: Any, domain: int, s: Any, s_max: float) -> dict[str, jax.Array]:
    """The domain's masks sigmoid(s x clip(e)) as the model's gates: {"head": [L, heads], "intermediate": [L, mlp]}."""
    return {
        k: jax.nn.sigmoid(s * _compensated(jnp.clip(params[param_name(domain, k)], -THRES_EMB, THRES_EMB), s, s_max))
        for k in KINDS
    }


def regulariser(masks: dict[str, jax.Array], past: Importance) -> jax.Array:
    """R = sum a (1 - a_past) / sum (1 - a_past) over every gated unit (eq. 5)."""
    free = {k: 1.0 - past[k] for k in KINDS}
    return sum(jnp.sum(masks[k] * free[k]) for k in KINDS) / jnp.maximum(sum(jnp.sum(free[k]) for k in KINDS), 1e-8)


def final_masks(params: Any, domain: int, s_max: float) -> Importance:
    """The trained domain's masks at s = s_max (what it used), as an Importance whose "output" is 0."""
    value = {
        k: np.asarray(
            jax.nn.sigmoid(
                s_max * np.clip(np.asarray(params[param_name(domain, k)], np.float32), -THRES_EMB, THRES_EMB)
            ),
            np.float32,
        )
        for k in KINDS
    }
    return {**value, "output": np.zeros(np.shape(params["roberta"]["layers"]["output"]["bias"]), np.float32)}


def hat_objective(domain: int, past: Importance | None, c: float, s_max: float, total_steps: int):
    """The `pretrain(objective=...)` hook for domain `domain` (with `HatMaskedLM(domain=domain)`): MLM under the
    domain's annealed gates + c x R; gradients and updates of slices of units the `past` domains used scaled by
    (1 - their mask). No `past` (the first domain): nothing blocked, R over all units."""

    def build(model: nn.Module, params: Any):
        mesh = jax.tree_util.tree_leaves(params)[0].sharding.mesh
        shapes = {k: np.shape(params[param_name(domain, k)]) for k in KINDS}
        used = past if past is not None else {k: np.zeros(shapes[k], np.float32) for k in KINDS}
        placed = jax.device_put(
            {k: np.asarray(used[k], np.float32) for k in KINDS},
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
        )

        def loss(arrays, step):
            def sums(params, batch, rng, deterministic):
                masks = gates(params, domain, anneal(step, total_steps, s_max), s_max)
                total, aux = mlm_loss_sums(model, masks)(params, batch, rng, deterministic)
                return total + aux["weight"] * c * regulariser(masks, arrays), aux

            return sums

        if past is None:
            return Fixed(loss, placed), {}
        arrays = {**placed, "blocks": softmask.shard_masks(softmask.unit_masks(past, params, SLICES), params)}

        def block(fixed: dict[str, Any]) -> Hooks:
            scale = lambda tree: softmask.apply(tree, fixed["blocks"])
            return {"grad_transform": scale, "update_transform": scale}

        return Fixed(loss, arrays, block), {}

    return build
