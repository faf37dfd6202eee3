"""Behavioural fine-tuning: intermediate-task training and multi-task fine-tuning, as fine-tuning options and grid
variants.

Intermediate-task training (STILTs, Phang et al. 2018; Pruksachatkun et al. 2020): fine-tune on a related
labeled task A, then fine-tune the target B from A's fine-tuned encoder with a new classification head
(`train.fresh_head`; A's head, trained for A's labels, is dropped). In the grid, variant `intermediate` does
this for task B with A = `tasks.<B>.intermediate_from`, another task of the grid; A's fine-tune starts from the
base model as in STILTs (`dapt_intermediate` / `tapt_intermediate`: from B's DAPT / TAPT start instead) and is
one phase, the grid's first seed, that all of B's seeds start from. From the base, it is the very phase of A's
own baseline row of that seed (same fields, same fingerprint), so a grid with both runs it once.

Multi-task fine-tuning (Chronopoulou et al. 2019): the task loss plus an annealed weight times a masked-LM loss
on the task's text (each train batch masked afresh, TAPT's dynamic masking), in the same jitted step
(engine/multitask.py; `finetune.multitask`). Grid variants `multitask` and `dapt_multitask`: the baseline and
dapt starts fine-tuned so, next to tapt and dapt_tapt (adapt to the task's text first, then fine-tune).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import flax.linen as nn
import jax
import numpy as np
from ml_collections import ConfigDict

from dontstop_jax.data.masking import mask_tokens, row_keys
from dontstop_jax.engine.multitask import MLM_KEYS, auxiliary_mlm_loss_sums, mlm_weights
from dontstop_jax.engine.prompt import HEADS
from dontstop_jax.engine.regularizers import Regularizer
from dontstop_jax.engine.steps import Fixed, classification_loss_sums
from dontstop_jax.errors import UserError
from dontstop_jax.model import ModelConfig
from dontstop_jax.model.multitask import RobertaForClassificationAndMLM
from dontstop_jax.train.source import ModelSource
from dontstop_jax.train.trainer import Objective

MASK_STREAM = 7  # keeps the auxiliary MLM's mask draws apart from other seeded streams


def intermediate_source(tasks: ConfigDict, task: str) -> str:
    """Task A of the intermediate variants for task B=`task`: tasks.<B>.intermediate_from, another grid task."""
    source = tasks[task].get("intermediate_from") or ""
    if source == task or source not in tasks:
        others = sorted(t for t in tasks if t != task)
        fix = f"set it to one of {others}" if others else "the grid has no other task; add one or drop the variant"
        raise UserError(
            f"tasks.{task}.intermediate_from={source!r}: the intermediate variants fine-tune on another "
            f"task of the grid before {task}; {fix}"
        )
    return source


def intermediate_label(start: str, target: str) -> str:
    """The row label of the intermediate task's fine-tune: its start variant's when that start is the base model
    (so it is the very phase of the intermediate task's own baseline row), else marked with the target task
    whose DAPT/TAPT it starts from."""
    return start if start == "baseline" else f"{start}_of_{target}"


def start_head(source: ModelSource, num_labels: int, fresh: bool) -> ModelSource:
    """The source with its classification head dropped when `fresh` (the head starts from the initializer, as on
    a pretrained LM); a kept head must have the task's label count."""
    params = source.params or {}
    if fresh and "classifier" in params:
        return dataclasses.replace(source, params={k: v for k, v in params.items() if k != "classifier"})
    if "classifier" in params and (found := np.shape(params["classifier"]["out_proj"]["bias"])[0]) != num_labels:
        raise UserError(
            f"init {source.parent} has a classification head for {found} labels and this task has "
            f"{num_labels}; set train.fresh_head=True to start a new head (intermediate-task training)"
        )
    return source


class Multitask:
    """What `finetune.multitask` changes in a fine-tune: the model (keeping the LM head), the objective and the
    train batches (each with a masked copy of its text). Method none leaves all three as plain fine-tuning's."""

    def __init__(self, cfg: ConfigDict, special: dict[str, int], vocab_size: int, epochs: int, steps_per_epoch: int):
        self.cfg, self.seed, self.on = cfg.multitask, cfg.seed, cfg.multitask.method != "none"
        if self.on and not HEADS[cfg.head].classifier:
            raise UserError(
                f"multitask.method={cfg.multitask.method!r} trains a classifier head beside the MLM "
                f"head and head={cfg.head!r} has none; set head=classifier (a prompt fine-tune already "
                "trains through the MLM head)"
            )
        self.special, self.vocab_size, self.steps_per_epoch = special, vocab_size, steps_per_epoch
        self.row_offset = jax.process_index() * (cfg.train.batch_size // jax.process_count())  # this host's rows
        self.gammas = mlm_weights(cfg.multitask, epochs) if self.on else None

    def model(self, config: ModelConfig, num_labels: int, plain: nn.Module) -> nn.Module:
        """The classifier that also keeps the LM head, or (method none) the `plain` fine-tuning model."""
        return RobertaForClassificationAndMLM(config, num_labels) if self.on else plain

    def objective(self, regularizer: Regularizer | None) -> Objective:
        """The Trainer's objective: (model, params) -> (loss, no hooks); gamma per epoch is placed replicated."""

        def build(model, params):
            if not self.on:
                return classification_loss_sums(model, regularizer), {}
            mesh = jax.tree_util.tree_leaves(params)[0].sharding.mesh
            gammas = jax.device_put(self.gammas, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
            return Fixed(auxiliary_mlm_loss_sums(model, regularizer, self.steps_per_epoch), gammas), {}

        return build

    def batches(self, batches: Iterator[dict], first_step: int) -> Iterator[dict]:
        """`batches` (global steps first_step, first_step + 1, ...) with the masked copy of their text (MLM_KEYS).
        Global row r of step s is masked with its own counter-based key, row_keys(seed, MASK_STREAM, s, r): the
        same masks on any host count and after a resume. Filler rows (example weight 0) mask nothing."""
        if not self.on:
            yield from batches
            return
        for step, batch in enumerate(batches, first_step):
            rows = np.arange(self.row_offset, self.row_offset + len(batch["input_ids"]))
            masked = mask_tokens(
                batch["input_ids"],
                row_keys(self.seed, MASK_STREAM, step, rows),
                self.special,
                self.vocab_size,
                mask_prob=self.cfg.mask_prob,
            )
            masked["mlm_weights"] = masked["mlm_weights"] * batch["example_weights"][:, None]
            yield {**batch, MLM_KEYS[0]: masked["input_ids"], **{k: masked[k] for k in MLM_KEYS[1:]}}
