"""Multi-task fine-tuning: the task's loss plus a weighted masked-LM loss on the task's own text, in one jitted
step (Chronopoulou et al. 2019, "An embarrassingly simple approach for transfer learning from pretrained
language models": an auxiliary LM objective kept during fine-tuning, an alternative to adapting the LM first).

Per example the loss is CE + gamma x (the batch's mean MLM loss over its masked tokens), so its sum over a batch
is what `make_train_step` divides by the example count. gamma anneals as in the paper's code (SiATL,
`exp_decay: [-1.6, -2.3]` over 15 epochs): geometrically from `mlm_weight` (0.2) to `mlm_weight_end` (0.1)
over `anneal_epochs` (15) epochs, one value per epoch, then stays. The paper's auxiliary loss is a left-to-right
LM on the same sentences; here it is the model's masked-LM loss, with dynamic masks of `mask_prob` (TAPT's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from dontstop_jax.engine.regularizers import Regularizer
from dontstop_jax.engine.steps import Batch, LossSums, classification_loss_sums, mlm_loss_sums
from dontstop_jax.errors import UserError
from dontstop_jax.fields import FINETUNE, build

# The masked copy of a batch's text rides in the batch under these keys (data/masking.py's; its input_ids renamed).
MLM_KEYS = ("mlm_input_ids", "mlm_positions", "mlm_ids", "mlm_weights")


def default_multitask_config() -> ConfigDict:
    """The paper's schedule (see the module docstring); method none fine-tunes on the task loss alone."""
    return build(FINETUNE["multitask"])


def mlm_weights(cfg: ConfigDict, epochs: int) -> np.ndarray:
    """float32 [epochs]: gamma of each epoch, geometric from cfg.mlm_weight to cfg.mlm_weight_end over
    cfg.anneal_epochs epochs, then constant."""
    start, end = cfg.mlm_weight, cfg.mlm_weight_end
    if start != end and min(start, end) <= 0:
        raise UserError(
            f"multitask.mlm_weight={start} anneals geometrically to multitask.mlm_weight_end={end}, "
            "which needs both > 0; set them equal for a constant weight (0 = the MLM loss counts "
            "for nothing)"
        )
    curve = np.geomspace(start, end, cfg.anneal_epochs) if start != end else np.full(cfg.anneal_epochs, start)
    return curve[np.minimum(np.arange(epochs), cfg.anneal_epochs - 1)].astype(np.float32)


def auxiliary_mlm_loss_sums(
    model: nn.Module, regularizer: Regularizer | None, steps_per_epoch: int
) -> Callable[[jax.Array, jax.Array], LossSums]:
    """(gamma per epoch, step) -> the loss sums of CE (+ the regularizer's penalty) + gamma x mean MLM loss, for
    a `Fixed` loss. `model` gives classification logits, or MLM logits at `mlm_positions`
    (model/multitask.py). The MLM pass draws its dropout from its own key: the classification pass sees what
    plain fine-tuning's would, so gamma = 0 trains exactly as plain fine-tuning does."""
    classify, mlm = classification_loss_sums(model, regularizer), mlm_loss_sums(model)

    def build(gammas: jax.Array, step: jax.Array) -> LossSums:
        gamma = jnp.asarray(gammas)[jnp.minimum(step // steps_per_epoch, len(gammas) - 1)]

        def loss(params: Any, batch: Batch, rng: jax.Array, deterministic: bool, teacher: Any = None):
            task_sum, aux = classify(params, batch, rng, deterministic, teacher)
            masked = {
                "input_ids": batch["mlm_input_ids"],
                "attention_mask": batch["attention_mask"],
                **{k: batch[k] for k in MLM_KEYS[1:]},
            }
            mlm_sum, mlm_aux = mlm(params, masked, jax.random.fold_in(rng, 1), deterministic)
            return task_sum + gamma * aux["weight"] * mlm_sum / jnp.maximum(mlm_aux["weight"], 1.0), aux

        return loss

    return build
