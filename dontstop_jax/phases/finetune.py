"""Fine-tuning per the paper: per-epoch dev evaluation, early stopping, the dev-selected checkpoint on test.

Resumable anywhere: each epoch ends with a checkpoint whose data state records the epoch, the early-stopping
counters and the dev curve so far; an interruption checkpoints mid-epoch with the batch to continue from.
The best epoch is the first with the best dev score (`first_best`): early stopping, the checkpoint kept as
best, the model scored on test and the summary all follow that one rule.

The summary flags a run whose best dev score is no higher than always predicting the train majority class
(`dev_at_majority`, the rule of analysis/reference.py): such a model may have learned nothing, and its
test score says little about its starting point. A warning names the phase.
"""

from __future__ import annotations

import logging
import math
import time

import flax.linen as nn
import jax
import numpy as np
from ml_collections import ConfigDict

from dontstop_jax import files
from dontstop_jax.analysis import classification_metrics
from dontstop_jax.analysis.metrics import check_metric
from dontstop_jax.analysis.reference import at_majority_level, majority_scores
from dontstop_jax.data import ClassificationBatches, load_task, load_tokenizer
from dontstop_jax.data.tasks import require_splits, with_shots, with_train_size
from dontstop_jax.data.tokenizer import special_ids
from dontstop_jax.engine import compile_predict_step, to_global
from dontstop_jax.engine.checkpoint import first_best
from dontstop_jax.engine.prompt import build_head
from dontstop_jax.engine.regularizers import Regularizer
from dontstop_jax.engine.state import running_mean
from dontstop_jax.errors import UserError
from dontstop_jax.fields import AVERAGING
from dontstop_jax.model import RobertaForSequenceClassification, gates, init_params
from dontstop_jax.phases.behavioral import Multitask, start_head
from dontstop_jax.train import source as sources
from dontstop_jax.train.trainer import Averaging, Trainer, check_batch
from dontstop_jax.train.workdir import Workdir

log = logging.getLogger(__name__)


def evaluate(predict, params, batches: ClassificationBatches, mesh, num_labels: int) -> dict[str, float]:
    """Metrics over one pass of `batches` (global predictions, so every host computes the same numbers)."""
    preds, labels, weights = [], [], []
    for batch in batches.epoch(0):
        logits, y, w = jax.device_get(predict(params, to_global(batch, mesh)))
        preds.append(np.argmax(logits, -1))
        labels.append(y)
        weights.append(w)
    return classification_metrics(
        np.concatenate(labels), np.concatenate(preds), num_labels, weights=np.concatenate(weights)
    )


def best_epoch(history: list[dict], metric: str) -> int:
    """The first epoch (from 1) with the best dev `metric` (`first_best`: a later epoch must be strictly better)."""
    best = first_best(enumerate((dev[metric] for dev in history), 1))
    assert best is not None, "no epoch has a dev score"
    return best


def _typical(epoch_seconds: list[float]) -> float:
    """Median epoch time, leaving out the first epoch (it includes XLA compilation) when there are others."""
    return float(np.median(epoch_seconds[1:] or epoch_seconds)) if epoch_seconds else float("nan")


def reinit_top_layers(model: nn.Module, params, k: int, seed: int, shardings):
    """Re-draw the top `k` encoder layers from the model's initializer (Zhang et al. 2021: the top layers of
    a pretrained model are specialised to its pretraining task and can hurt fine-tuning stability)."""
    num_layers = model.config.num_hidden_layers
    if not 0 <= k <= num_layers:
        raise UserError(f"train.reinit_top_layers={k} must be between 0 and the model's {num_layers} layers")

    def reinit(params, key):
        fresh = nn.unbox(init_params(model, key))["roberta"]["layers"]
        layers = jax.tree_util.tree_map(
            lambda p, f: p.at[num_layers - k :].set(f[num_layers - k :]), params["roberta"]["layers"], fresh
        )
        return {**params, "roberta": {**params["roberta"], "layers": layers}}

    return jax.jit(reinit, out_shardings=shardings)(params, jax.random.fold_in(jax.random.key(seed), 2))


def _averaging(cfg: ConfigDict, regularizer: Regularizer | None) -> Averaging:
    """The parameter averages the train state keeps ({name: per-step EMA decay, or None for SWA's, updated at
    epoch ends}), the regularizer's teacher among them, and the weights the phase evaluates: "params", "ema" or
    "swa"."""
    method, averages = cfg.averaging.method, {}
    if method not in AVERAGING:
        raise UserError(f"averaging.method={method!r} is unknown; use one of {', '.join(AVERAGING)}")
    if method == "ema":
        averages["ema"] = cfg.averaging.ema_decay
    if method == "swa":
        if cfg.averaging.swa_start > cfg.train.epochs:
            raise UserError(
                f"averaging.swa_start={cfg.averaging.swa_start} is after the last of train.epochs="
                f"{cfg.train.epochs}: nothing would be averaged; start SWA at an earlier epoch"
            )
        averages["swa"] = None
    if regularizer is not None and regularizer.uses_teacher:
        averages["teacher"] = regularizer.bregman_decay
    return Averaging(averages, "teacher" if "teacher" in averages else None, "params" if method == "none" else method)


def _swa_step(trainer: Trainer):
    """(state, count) -> the state whose `swa` average also counts its current parameters (engine.running_mean)."""
    shardings = trainer.shardings.averages["swa"]
    update = jax.jit(running_mean, out_shardings=shardings, donate_argnums=(0,))

    def step(state, count: int):
        return state.replace(
            averages={**state.averages, "swa": update(state.averages["swa"], state.params, np.float32(count))}
        )

    return step


def finetune(cfg: ConfigDict) -> dict:
    """Run (or resume, or return the finished) fine-tuning run in cfg.workdir; returns dev and test metrics.
    Raises `Interrupted` after checkpointing (mid-epoch too) when asked to stop."""
    with Workdir(cfg) as done:  # refuses a changed config and a workdir another run holds
        summary = done if done is not None else _finetune(cfg)
    if summary.get("dev_at_majority"):  # absent from summaries written before the flag existed
        metric = summary["metric"]
        log.warning(
            "fine-tune %s (%s) may have learned nothing: its best dev %s, %.1f%%, is no higher than always "
            "predicting the majority class (%.1f%%); try another learning rate or more epochs",
            summary["phase"],
            summary["workdir"],
            metric,
            100 * summary["dev"][metric],
            100 * summary["majority_dev"][metric],
        )
    return summary


def _finetune(cfg: ConfigDict) -> dict:
    metric = check_metric(cfg.train.metric)
    check_batch(cfg)
    source = sources.prune_top_layers(sources.resolve_phase(cfg), cfg.train.prune_top_layers)
    source, adaptation = sources.adapted(source, cfg)
    regularizer = Regularizer.from_config(cfg.regularizer)
    averaging = _averaging(cfg, regularizer)
    weights = averaging.weights
    task = load_task(
        cfg.task.path or None,
        text_field=cfg.task.text_field,
        label_field=cfg.task.label_field,
        hf_dataset=cfg.task.hf_dataset or None,
    )
    require_splits(task, "fine-tuning")
    if cfg.task.train_size:
        task = with_train_size(task, cfg.task.train_size, cfg.seed)
    if cfg.task.shots:
        task = with_shots(task, cfg.task.shots, cfg.seed)
    max_len = min(cfg.data.max_seq_length, source.config.max_seq_length)
    tokenizer = load_tokenizer(source.tokenizer_dir)
    source = start_head(source, len(task.label_names), cfg.train.fresh_head)
    head = build_head(cfg, source.config, source.params, tokenizer, task.label_names, max_len, task.splits["train"])
    batches = {
        s: ClassificationBatches(
            head.encode(task.splits[s][0]),
            task.splits[s][1],
            cfg.train.batch_size,
            cfg.seed,
            pad_id=special_ids(tokenizer)["pad"],
            max_seq_length=max_len,
            shuffle=s == "train",
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        for s in ("train", "dev", "test")
    }
    num_labels = len(task.label_names)
    epochs, per_epoch = (
        cfg.train.epochs,
        min(batches["train"].num_batches, cfg.train.get("steps_per_epoch") or batches["train"].num_batches),
    )
    multitask = Multitask(cfg, special_ids(tokenizer), len(tokenizer), epochs, per_epoch)  # none: plain fine-tuning
    model, objective = multitask.model(source.config, num_labels, head.model), multitask.objective(regularizer)
    if cfg.unit_gates:
        if not isinstance(model, RobertaForSequenceClassification):
            raise UserError(
                f"unit_gates={cfg.unit_gates!r} gates a classifier's units; it does not combine with "
                "head=prompt or multitask.method=mlm"
            )
        model = model.clone(unit_gates=gates.load(cfg.unit_gates, source.config))
    with Trainer(
        cfg,
        source,
        adaptation,
        model,
        objective,
        total_steps=epochs * per_epoch,
        best_metric=f"dev_{metric}",
        keep_last=1,
        averaging=averaging,
        head=head.kind,
        label_names=task.label_names,
        **head.provenance,
    ) as trainer:
        # The data state: the epoch to continue (the step says where in it), early stopping, the dev curve so far.
        progress = trainer.data_state or {"epoch": 0, "bad_epochs": 0, "history": [], "epoch_seconds": []}
        if trainer.data_state is None and cfg.train.reinit_top_layers:
            trainer.restart_from(
                reinit_top_layers(
                    model, trainer.state.params, cfg.train.reinit_top_layers, cfg.seed, trainer.shardings.params
                )
            )
        swa = _swa_step(trainer) if weights == "swa" else None
        # Dodge et al. 2020: judge a seed on dev after this many epochs (None: never discard).
        check_at = max(1, math.ceil(cfg.train.discard_fraction * epochs)) if cfg.train.discard_fraction > 0 else None
        predict = compile_predict_step(model, trainer.shardings.params, trainer.mesh, trainer.rules)
        for epoch in range(progress["epoch"], epochs):
            if progress["bad_epochs"] >= cfg.train.patience or progress.get("discarded"):
                break
            began, first = time.perf_counter(), epoch * per_epoch
            trainer.fit(
                multitask.batches(batches["train"].epoch(epoch, start=trainer.step - first), trainer.step),
                first + per_epoch,
                data_state=lambda _: progress,  # noqa: B023 (read during this fit)
                tokens_per_step=lambda b: b["input_ids"].size,
            )
            if swa is not None:  # the mean of the weights that ended epochs swa_start.. (the current one counted)
                trainer.state = swa(trainer.state, max(0, epoch + 1 - cfg.averaging.swa_start))
            jax.block_until_ready(trainer.state.params)
            seconds = time.perf_counter() - began
            dev = evaluate(predict, trainer.reported, batches["dev"], trainer.mesh, num_labels)
            trainer.writer.write(trainer.step, {**dev, "epoch": epoch + 1}, prefix="dev/")
            history = progress["history"] + [dev]
            improved = best_epoch(history, metric) == epoch + 1
            progress = {
                "epoch": epoch + 1,
                "bad_epochs": 0 if improved else progress["bad_epochs"] + 1,
                "history": history,
                "epoch_seconds": progress["epoch_seconds"] + [seconds],
                "early_dev": dev[metric] if epoch + 1 == check_at else progress.get("early_dev"),
            }
            below = cfg.train.discard_below
            progress["discarded"] = epoch + 1 == check_at and below is not None and dev[metric] < below
            trainer.save(progress, metrics={f"dev_{metric}": dev[metric]})
        trainer.checkpoints.wait()
        history = progress["history"]
        best = best_epoch(history, metric)
        best_step = best * per_epoch  # where that epoch ended: the step the checkpointer keeps as best (first_best)
        params = trainer.checkpoints.restore_params(best_step, abstract_params=trainer.abstract().params, item=weights)
        test = evaluate(predict, params, batches["test"], trainer.mesh, num_labels)
        trainer.writer.write(trainer.step, test, prefix="test/")
        majority_dev = majority_scores(task.splits["train"][1], task.splits["dev"][1], num_labels)
        return trainer.finish(
            {
                "phase": cfg.name,
                "workdir": files.absolute(cfg.workdir),
                "parent": source.parent,
                "metric": metric,
                "dev": history[best - 1],
                "test": test,
                "best_epoch": best,
                "epochs_run": len(history),
                "best_step": best_step,
                "label_names": task.label_names,
                "weights": weights,
                "train_examples": len(task.splits["train"][0]),
                "trainable_params": adaptation.count(params)[0],
                "seconds_per_epoch": _typical(progress["epoch_seconds"]),
                "early_dev": progress.get("early_dev"),
                "discarded": bool(progress.get("discarded")),
                "majority_dev": majority_dev,
                "dev_at_majority": at_majority_level(history[best - 1][metric], majority_dev[metric]),
            },
            progress,
        )
