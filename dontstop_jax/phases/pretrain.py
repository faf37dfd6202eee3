"""The masked-LM phase. DAPT and TAPT are this phase with different data and defaults (configs/dapt.py, tapt.py).

Resumable: a restarted run restores parameters, optimizer state, RNG and the loader position from the
latest checkpoint, so it produces the same parameters as an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from ml_collections import ConfigDict

from dontstop_jax import files
from dontstop_jax.data import (
    MLMLoader,
    PreparedCorpus,
    SpanMasker,
    load_terms,
    load_tokenizer,
    prepare_corpus,
    special_ids,
    word_start_table,
)
from dontstop_jax.engine import mlm_loss_sums
from dontstop_jax.engine.steps import Hooks, LossSums
from dontstop_jax.errors import UserError
from dontstop_jax.model import ModelConfig, RobertaForMaskedLM
from dontstop_jax.train import source as sources
from dontstop_jax.train.trainer import Objective, Trainer, check_batch
from dontstop_jax.train.workdir import PREPARED, Workdir


def prepare(cfg: ConfigDict, source: sources.ModelSource) -> PreparedCorpus:
    """Tokenize + pack the corpus: every process encodes its share into the shared cache (`prepare_corpus`)."""
    return prepare_corpus(
        list(cfg.data.sources),
        source.tokenizer_dir,
        cfg.data.cache_dir or str(files.path(cfg.workdir) / PREPARED),
        max_seq_length=cfg.data.max_seq_length,
        model_max_positions=source.config.max_seq_length,
        model_vocab_size=source.config.vocab_size,
    )


def mlm(model: nn.Module, params: Any) -> tuple[LossSums, Hooks]:
    """The default objective: masked-LM loss, no step hooks."""
    return mlm_loss_sums(model), {}


def pretrain(
    cfg: ConfigDict, objective: Objective = mlm, module: Callable[[ModelConfig], nn.Module] = RobertaForMaskedLM
) -> dict:
    """Run (or resume, or return the finished) MLM phase in cfg.workdir; returns its summary. Raises
    `Interrupted` after checkpointing when asked to stop. `objective` replaces plain MLM (e.g. DAS's);
    `module` builds the trained model from the source's config (HAT's adds its mask embeddings)."""
    with Workdir(cfg) as done:  # refuses a changed config and a workdir another run holds
        return done if done is not None else _pretrain(cfg, objective, module)


def _pretrain(cfg: ConfigDict, objective: Objective, module: Callable[[ModelConfig], nn.Module]) -> dict:
    if cfg.objective != "mlm" and objective is mlm:
        raise UserError(
            f"objective={cfg.objective!r} needs the importance that `dontstop continual` measures "
            "between its stages; run it through `dontstop continual` (configs/continual.py)"
        )
    check_batch(cfg)
    source, adaptation = sources.adapted(sources.resolve_phase(cfg), cfg)
    if not cfg.data.attend_across_documents and source.config.attention_impl == "cudnn":
        raise UserError(
            "data.attend_across_documents=False needs a per-document attention mask, which the cuDNN "
            "kernel (model.attention_impl=cudnn) cannot take; leave attention_impl unset or use xla"
        )
    terms = load_terms(cfg.data.span_masking.terms) if cfg.data.span_masking.terms else None  # before any work
    corpus = prepare(cfg, source)
    tokenizer = load_tokenizer(source.tokenizer_dir)
    spans = None if terms is None else SpanMasker(tokenizer, terms, cfg.data.span_masking.rate, special_ids(tokenizer))
    loader = MLMLoader(
        corpus,
        cfg.train.batch_size,
        cfg.seed,
        special_ids(tokenizer),
        vocab_size=len(tokenizer),
        mask_prob=cfg.data.mask_prob,
        whole_word=cfg.data.whole_word,
        word_starts_table=word_start_table(tokenizer) if cfg.data.whole_word else None,
        attend_across_documents=cfg.data.attend_across_documents,
        span_masker=spans,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    total = cfg.train.steps or cfg.train.epochs * loader.steps_per_epoch
    with Trainer(
        cfg,
        source,
        adaptation,
        module(source.config),
        objective,
        total_steps=total,
        keep_last=cfg.checkpoint.keep_last,
        corpus=str(corpus.directory),
        head="mlm",
    ) as trainer:
        if trainer.data_state is not None:
            loader.set_state(trainer.data_state)
        try:
            trainer.fit(
                iter(loader),
                total,
                data_state=lambda _: loader.get_state(),
                save_every=cfg.checkpoint.every,
                tokens_per_step=cfg.train.batch_size * corpus.max_seq_length,
            )
        finally:
            loader.close()
        return trainer.finish(
            {
                "phase": cfg.name,
                "workdir": files.absolute(cfg.workdir),
                "steps": total,
                "parent": source.parent,
                "corpus_blocks": corpus.num_blocks,
                "epochs": total / loader.steps_per_epoch,
                "trainable_params": adaptation.count(trainer.state.params)[0],
                **({} if spans is None else {"span_masking": spans.summary}),
            },
            data_state=loader.get_state(),
        )
