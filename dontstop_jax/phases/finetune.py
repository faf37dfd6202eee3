"""Fine-tuning per the paper: per-epoch dev evaluation, early stopping, the dev-selected checkpoint on test.

Resumable at epoch boundaries: each epoch ends with a checkpoint whose data state records the epoch,
the early-stopping counters and the dev curve so far.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
from ml_collections import ConfigDict

from dontstop_jax.analysis import classification_metrics
from dontstop_jax.analysis.metrics import check_metric
from dontstop_jax.data import ClassificationBatches, load_task, load_tokenizer, tokenize_split
from dontstop_jax.data.tokenizer import special_ids
from dontstop_jax.engine import (abstract_state, check_batch_size, classification_loss_sums, compile_predict_step,
                                 compile_train_step, create_train_state, make_mesh, make_train_step, to_global)
from dontstop_jax.engine.checkpoint import Checkpointer
from dontstop_jax.errors import UserError
from dontstop_jax.model import RobertaForSequenceClassification, init_params
from dontstop_jax.phases import source as sources
from dontstop_jax.phases.pretrain import DONE, finished, write_delta, write_json_atomic
from dontstop_jax.train import MetricsWriter, ProgressBar
from dontstop_jax.train.loop import StopSignal, run_steps


def evaluate(predict, params, batches: ClassificationBatches, mesh, num_labels: int) -> dict[str, float]:
    """Metrics over one pass of `batches` (global predictions, so every host computes the same numbers)."""
    preds, labels, weights = [], [], []
    for batch in batches.epoch(0):
        logits, y, w = jax.device_get(predict(params, to_global(batch, mesh)))
        preds.append(np.argmax(logits, -1)), labels.append(y), weights.append(w)
    return classification_metrics(np.concatenate(labels), np.concatenate(preds), num_labels,
                                  weights=np.concatenate(weights))


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
        layers = jax.tree_util.tree_map(lambda p, f: p.at[num_layers - k:].set(f[num_layers - k:]),
                                        params["roberta"]["layers"], fresh)
        return {**params, "roberta": {**params["roberta"], "layers": layers}}
    return jax.jit(reinit, out_shardings=shardings)(params, jax.random.fold_in(jax.random.key(seed), 2))


def finetune(cfg: ConfigDict) -> dict:
    """Run (or resume, or reuse) one fine-tuning run in cfg.workdir; returns dev and test metrics."""
    workdir = Path(cfg.workdir)
    if (done := finished(workdir)) is not None:
        return done
    lead = jax.process_index() == 0
    metric = check_metric(cfg.train.metric)
    source, adaptation = sources.adapted(sources.resolve_phase(cfg), cfg)
    task = load_task(cfg.task.path or None, text_field=cfg.task.text_field, label_field=cfg.task.label_field,
                     hf_dataset=cfg.task.hf_dataset or None)
    for split in ("train", "dev", "test"):
        if split not in task.splits:
            raise UserError(f"task {task.name} has no {split} split; fine-tuning needs train, dev and test")
    max_len = min(cfg.data.max_seq_length, source.config.max_seq_length)
    tokenizer = load_tokenizer(source.tokenizer_dir)
    tokens = {s: tokenize_split(task.splits[s][0], tokenizer, max_len) for s in ("train", "dev", "test")}
    mesh = make_mesh(cfg.mesh.shape, dcn_shape=cfg.mesh.dcn_shape)
    rules = tuple(tuple(r) for r in cfg.mesh.rules)
    check_batch_size(cfg.train.batch_size, mesh)
    batches = {s: ClassificationBatches(tokens[s], task.splits[s][1], cfg.train.batch_size, cfg.seed,
                                        pad_id=special_ids(tokenizer)["pad"], max_seq_length=max_len,
                                        shuffle=s == "train", process_index=jax.process_index(),
                                        process_count=jax.process_count()) for s in ("train", "dev", "test")}
    num_labels = len(task.label_names)
    epochs, per_epoch = cfg.train.epochs, batches["train"].num_batches
    tx, schedule = adaptation.optimizer(cfg.optim, epochs * per_epoch)
    model = RobertaForSequenceClassification(source.config, num_labels)
    state, shardings = create_train_state(model, tx, mesh, rules, cfg.seed, pretrained=source.params)
    ckpt = Checkpointer(workdir / "checkpoints", keep_last=1, best_metric=f"dev_{metric}", best_mode="max")
    progress_state = {"epoch": 0, "best": -1.0, "bad_epochs": 0, "history": [], "epoch_seconds": []}
    if ckpt.latest_step() is not None:
        state, progress_state, _ = ckpt.restore(abstract_state(shardings, model, tx))
    elif cfg.train.reinit_top_layers:
        state = state.replace(params=reinit_top_layers(model, state.params, cfg.train.reinit_top_layers, cfg.seed,
                                                       shardings.params))
    # Dodge et al. 2020: judge a seed on dev after this many epochs (None: never discard).
    check_at = max(1, math.ceil(cfg.train.discard_fraction * epochs)) if cfg.train.discard_fraction > 0 else None
    meta = sources.provenance(cfg.name, source, cfg, head="classification", label_names=task.label_names)

    step_fn = compile_train_step(make_train_step(classification_loss_sums(model), tx, schedule=schedule,
                                                 skip_nonfinite=cfg.train.skip_nonfinite,
                                                 **adaptation.hooks()), shardings, mesh, rules)
    predict = compile_predict_step(model, shardings.params, mesh, rules)

    with MetricsWriter(workdir, enabled=lead) as writer, StopSignal() as stop:
        progress = ProgressBar(epochs * per_epoch, enabled=lead, desc=cfg.name)
        for epoch in range(progress_state["epoch"], epochs):
            if progress_state["bad_epochs"] >= cfg.train.patience or progress_state.get("discarded"):
                break
            start, began = int(jax.device_get(state.step)), time.perf_counter()
            state, interrupted = run_steps(
                state, step_fn, iter(batches["train"].epoch(epoch)), start=start, stop=start + per_epoch,
                writer=writer, progress=progress, tokens_per_step=lambda b: b["input_ids"].size, stop_signal=stop,
                log_every=cfg.train.log_every)
            if interrupted:  # mid-epoch: the next run redoes this epoch from its last checkpoint
                ckpt.close()
                return {"interrupted": True, "epoch": epoch}
            jax.block_until_ready(state.params)
            seconds = time.perf_counter() - began
            dev = evaluate(predict, state.params, batches["dev"], mesh, num_labels)
            writer.write(int(jax.device_get(state.step)), {**dev, "epoch": epoch + 1}, prefix="dev/")
            improved = dev[metric] > progress_state["best"]
            progress_state = {"epoch": epoch + 1, "best": max(dev[metric], progress_state["best"]),
                              "bad_epochs": 0 if improved else progress_state["bad_epochs"] + 1,
                              "history": progress_state["history"] + [dev],
                              "epoch_seconds": progress_state.get("epoch_seconds", []) + [seconds],
                              "early_dev": dev[metric] if epoch + 1 == check_at else progress_state.get("early_dev")}
            below = cfg.train.discard_below
            progress_state["discarded"] = epoch + 1 == check_at and below is not None and dev[metric] < below
            ckpt.save(state, data_state=progress_state, meta=meta, metrics={f"dev_{metric}": dev[metric]})
        progress.close()
    ckpt.wait()
    best_step = ckpt.best_step()
    best = ckpt.restore_params(best_step, abstract_params=abstract_state(shardings, model, tx).params)
    test = evaluate(predict, best, batches["test"], mesh, num_labels)
    history = progress_state["history"]
    best_epoch = int(np.argmax([h[metric] for h in history])) + 1
    summary = {"phase": cfg.name, "workdir": str(workdir.absolute()), "parent": source.parent, "metric": metric,
               "dev": history[best_epoch - 1], "test": test, "best_epoch": best_epoch, "epochs_run": len(history),
               "best_step": best_step, "label_names": task.label_names,
               "trainable_params": adaptation.count(best)[0],
               "seconds_per_epoch": _typical(progress_state.get("epoch_seconds", [])),
               "early_dev": progress_state.get("early_dev"), "discarded": bool(progress_state.get("discarded"))}
    ckpt.close()
    write_delta(workdir, adaptation)
    if lead:
        writer_step = int(jax.device_get(state.step))
        with MetricsWriter(workdir) as w:
            w.write(writer_step, test, prefix="test/")
        write_json_atomic(workdir / DONE, summary)
    return summary
