"""The masked-LM phase. DAPT and TAPT are this phase with different data and defaults (configs/dapt.py, tapt.py).

Resumable: a restarted run restores parameters, optimizer state, RNG and the loader position from the
latest checkpoint, so it produces the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
from ml_collections import ConfigDict

from dontstop_jax.distributed import on_first_process
from dontstop_jax.data import MLMLoader, PreparedCorpus, load_tokenizer, prepare_corpus, special_ids, word_start_table
from dontstop_jax.engine import (abstract_state, chain_hooks, check_batch_size, compile_train_step,
                                 create_train_state, make_mesh, make_train_step, mlm_loss_sums, to_global)
from dontstop_jax.engine.checkpoint import Checkpointer
from dontstop_jax.engine.peft import Adaptation
from dontstop_jax.model import RobertaForMaskedLM
from dontstop_jax.phases.export import export_delta
from dontstop_jax.phases import source as sources
from dontstop_jax.train import MetricsWriter, ProgressBar
from dontstop_jax.train.loop import StopSignal, run_steps

DONE = "DONE.json"
PEFT_FILE = "peft.safetensors"
# (model, sharded params) -> (loss_sums, extra make_train_step hooks): what a phase trains, e.g. DAS's objective.
Objective = Callable[[nn.Module, Any], tuple[Callable, dict[str, Callable]]]


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def finished(workdir: str | os.PathLike) -> dict | None:
    """The summary of a phase that completed in `workdir`, or None."""
    path = Path(workdir) / DONE
    return json.loads(path.read_text()) if path.exists() else None


def prepare(cfg: ConfigDict, source: sources.ModelSource) -> PreparedCorpus:
    """Tokenize + pack the corpus on process 0; the others then find it complete in the shared cache."""
    def run():
        return prepare_corpus(list(cfg.data.sources), source.tokenizer_dir, cfg.data.cache_dir,
                              max_seq_length=cfg.data.max_seq_length,
                              model_max_positions=source.config.max_seq_length,
                              model_vocab_size=source.config.vocab_size)
    prepared = on_first_process("prepare_corpus", run)
    return prepared if prepared is not None else run()


def write_delta(workdir: Path, adaptation: Adaptation) -> None:
    """A parameter-efficient phase also leaves what it trained as a small file (`PEFT_FILE`)."""
    if adaptation.method not in ("full", "top_k"):
        export_delta(str(workdir), str(workdir / PEFT_FILE))


def pretrain(cfg: ConfigDict, objective: Objective | None = None) -> dict:
    """Run (or resume, or reuse) one MLM phase in cfg.workdir; returns its summary.

    `objective` replaces plain MLM (the default) with another loss and step hooks (dontstop_jax.das).
    """
    workdir = Path(cfg.workdir)
    if (done := finished(workdir)) is not None:
        return done
    lead = jax.process_index() == 0
    source, adaptation = sources.adapted(sources.resolve_phase(cfg), cfg)
    mesh = make_mesh(cfg.mesh.shape, dcn_shape=cfg.mesh.dcn_shape)
    rules = tuple(tuple(r) for r in cfg.mesh.rules)
    check_batch_size(cfg.train.batch_size, mesh, "train.batch_size", accum_steps=cfg.train.accum_steps)
    corpus = prepare(cfg, source)
    tokenizer = load_tokenizer(source.tokenizer_dir)
    loader = MLMLoader(corpus, cfg.train.batch_size, cfg.seed, special_ids(tokenizer), vocab_size=len(tokenizer),
                       mask_prob=cfg.data.mask_prob, whole_word=cfg.data.whole_word,
                       word_starts_table=word_start_table(tokenizer) if cfg.data.whole_word else None,
                       process_index=jax.process_index(), process_count=jax.process_count())
    total = cfg.train.steps or cfg.train.epochs * loader.steps_per_epoch
    tx, schedule = adaptation.optimizer(cfg.optim, total)
    model = RobertaForMaskedLM(source.config)
    ckpt = Checkpointer(workdir / "checkpoints", keep_last=cfg.checkpoint.keep_last)
    state, shardings = create_train_state(model, tx, mesh, rules, cfg.seed, pretrained=source.params)
    meta = sources.provenance(cfg.name, source, cfg, corpus=str(corpus.directory), head="mlm")
    if ckpt.latest_step() is not None:  # resume exactly where the last checkpoint left off
        state, data_state, _ = ckpt.restore(abstract_state(shardings, model, tx))
        loader.set_state(data_state)
    loss_sums, hooks = objective(model, state.params) if objective else (mlm_loss_sums(model), {})
    hooks = chain_hooks(adaptation.hooks(), hooks)
    step_fn = compile_train_step(make_train_step(loss_sums, tx, accum_steps=cfg.train.accum_steps, schedule=schedule,
                                                 skip_nonfinite=cfg.train.skip_nonfinite, **hooks),
                                 shardings, mesh, rules)
    start = int(jax.device_get(state.step))
    batches = (to_global(b, mesh) for b in loader)
    save = lambda s: ckpt.save(s, data_state=loader.get_state(), meta=meta)
    with MetricsWriter(workdir, enabled=lead) as writer, StopSignal() as stop:
        progress = ProgressBar(total, enabled=lead, desc=cfg.name)
        state, interrupted = run_steps(
            state, step_fn, batches, start=start, stop=total, writer=writer, progress=progress,
            tokens_per_step=cfg.train.batch_size * corpus.max_seq_length, stop_signal=stop,
            log_every=cfg.train.log_every, save=save, save_every=cfg.checkpoint.every)
        progress.close()
    if ckpt.latest_step() != int(jax.device_get(state.step)):
        save(state)
    ckpt.close()
    loader.close()
    if interrupted:
        return {"interrupted": True, "step": int(jax.device_get(state.step))}
    summary = {"phase": cfg.name, "workdir": str(workdir.absolute()), "steps": total, "parent": source.parent,
               "corpus_blocks": corpus.num_blocks, "epochs": total / loader.steps_per_epoch,
               "trainable_params": adaptation.count(state.params)[0]}
    write_delta(workdir, adaptation)
    if lead:
        write_json_atomic(workdir / DONE, summary)
    return summary
