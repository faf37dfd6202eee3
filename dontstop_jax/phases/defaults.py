"""Every field a phase reads, declared once with its type and the paper's default. The configs are type-safe
and locked, so a typo or a wrong type (`--config.train.stpes=5`, `--config.train.steps=abc`) is an error, not
a silently new or mistyped setting; fields that default to None are typed placeholders."""

from __future__ import annotations

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from dontstop_jax.engine.multitask import default_multitask_config
from dontstop_jax.engine.optim import default_optim_config
from dontstop_jax.engine.peft import default_peft_config
from dontstop_jax.engine.prompt import default_prompt_config
from dontstop_jax.engine.regularizers import default_regularizer_config
from dontstop_jax.engine.sharding import DEFAULT_RULES

PRETRAIN_KINDS = ("dapt", "tapt")
# A pretraining phase's loss: plain MLM, or a continual-learning stage's (set by `dontstop continual`).
OBJECTIVES = ("mlm", "das", "ewc", "derpp", "hat")


def _model() -> ConfigDict:
    """Runtime options for a loaded model, or the architecture when init='scratch' (None = keep/default)."""
    return ConfigDict(dict(
        # dtype "auto": bfloat16 on TPU/GPU, float32 on CPU (config_loader.accelerator_defaults records which)
        dtype="auto", remat="none", attention_impl=placeholder(str), hidden_dropout_prob=placeholder(float),
        attention_probs_dropout_prob=placeholder(float), classifier_dropout=placeholder(float),
        vocab_size=placeholder(int), hidden_size=placeholder(int), num_hidden_layers=placeholder(int),
        num_attention_heads=placeholder(int), intermediate_size=placeholder(int),
        max_position_embeddings=placeholder(int)))


def _common(name: str, **sections) -> ConfigDict:
    """The fields of every training phase plus its own `sections`, locked."""
    return ConfigDict(dict(
        name=name, workdir=f"runs/{name}", seed=0,
        init="",  # a Hugging Face directory, a finished phase's workdir, or "scratch"
        init_delta="",  # optional: an adapter file (peft.safetensors) put onto init's weights
        tokenizer=placeholder(str),  # default: the init's tokenizer
        model=_model(),
        # shape: (data, fsdp, tensor); dcn_shape (multi-slice): shape is then per slice, dcn_shape across slices;
        # allow_replicated: accept parameters >= 1 MiB left whole on every device because the mesh cannot
        # divide them
        mesh=dict(shape=(-1, 1, 1), dcn_shape=placeholder(tuple), rules=DEFAULT_RULES, allow_replicated=False),
        optim=default_optim_config(),
        peft=default_peft_config(),  # which parameters train: full or parameter-efficient
        **sections)).lock()


def das_config() -> ConfigDict:
    """DAS (Ke et al. 2023): the paper's contrastive temperature; importance measured on a few batches of the
    domain's text (the paper uses a sample of it; EWC's Fisher and DER++'s buffer logits use the same sample).
    Its ablations: `general=False` (no general-knowledge proxy: importance from domain MLM only),
    `contrastive_weight=0`, `contrast="past"` (contrast with past domains' knowledge only, not the general),
    `random=True` (each importance replaced by a seeded per-layer permutation of itself)."""
    return ConfigDict(dict(contrastive_weight=1.0, temperature=0.05, importance_batches=16,
                           importance_batch_size=16, importance_dropout=0.1, general=True, contrast="all",
                           random=False))


def ewc_config() -> ConfigDict:
    """EWC (Kirkpatrick et al. 2017): penalty strength lam, 5000 as in Serra et al. 2018's EWC baseline."""
    return ConfigDict(dict(lam=5000.0))


def derpp_config() -> ConfigDict:
    """DER++ (Buzzega et al. 2020): buffer of 200 sequences, alpha 0.1 (logit MSE), beta 0.5 (replayed MLM);
    batch_size: replayed rows per micro-batch (None: as many as the micro-batch, as in the paper)."""
    return ConfigDict(dict(buffer_size=200, alpha=0.1, beta=0.5, batch_size=placeholder(int)))


def hat_config() -> ConfigDict:
    """HAT (Serra et al. 2018): the gate slope anneals to s_max = 400; sparsity regulariser weight c = 0.75 (the
    paper's values)."""
    return ConfigDict(dict(s_max=400.0, c=0.75))


def pretrain_config(kind: str = "dapt") -> ConfigDict:
    """DAPT per the paper: one pass, 12.5K steps of 2048 sequences (via accumulation), lr 5e-4, warm-up 6%.
    TAPT: 100 epochs over the task's unlabeled text, batch 256, lr 1e-4, fresh masks every epoch."""
    if kind not in PRETRAIN_KINDS:
        raise ValueError(f"unknown pretraining kind {kind!r}; choose from {list(PRETRAIN_KINDS)}")
    cfg = _common(
        kind,
        # cache_dir: the prepared-data cache (default WORKDIR/prepared; a grid's phases share GRID/cache).
        # attend_across_documents: documents are packed into max_seq_length rows; True lets them see each other
        # (RoBERTa's FULL-SENTENCES), False keeps each to itself with its own positions (one document per row,
        # as the paper's TAPT ran, line by line, but without the padding)
        # span_masking: terms, a text file with one term per line ("tumor necrosis factor"); each occurrence is
        # masked whole, as one unit, with probability `rate` (else its tokens are ordinary words); "" = off
        data=dict(sources=[], cache_dir=placeholder(str), max_seq_length=512, mask_prob=0.15, whole_word=False,
                  attend_across_documents=True, span_masking=dict(terms="", rate=1.0)),
        checkpoint=dict(every=1000, keep_last=2),
        # steps: None = `epochs` passes over the corpus
        # grad_reduce_dtype: the dtype of the step's one gradient reduction (bfloat16 halves its bytes and rounds
        # the summed gradient); gather_params_once: FSDP gathers the parameters once per step, not per micro-batch;
        # stop_poll_every: steps between the processes' agreement on a stop request (train/loop.py; one process
        # checks every step)
        train=dict(batch_size=256, accum_steps=4, steps=placeholder(int), epochs=100, log_every=10,
                   skip_nonfinite=False, grad_reduce_dtype="float32", gather_params_once=False, stop_poll_every=10),
        # Continual DAP-training (phases/continual.py) sets these on its stages; a plain phase is MLM on all weights.
        objective="mlm",  # one of OBJECTIVES
        frozen=[],  # parameter paths held fixed, e.g. ["lm_head", "roberta/embeddings"]
        das=das_config(), ewc=ewc_config(), derpp=derpp_config(), hat=hat_config())
    if kind == "dapt":
        cfg.train.update(batch_size=2048, accum_steps=32, steps=12500, epochs=1)
        cfg.optim.learning_rate = 5e-4
    else:
        cfg.optim.learning_rate = 1e-4
        cfg.data.attend_across_documents = False  # a task's short examples are unrelated to their neighbours
    return cfg


def finetune_config() -> ConfigDict:
    """Paper protocol: lr 2e-5, batch 16, up to 10 epochs, patience 3 on dev, dropout 0.1, warm-up 6%; no
    regulariser, averaging or pruning unless asked."""
    cfg = _common(
        "finetune",
        # train_size: fine-tune on a stratified draw of this many train examples (draw `seed`; 0 = all of train);
        # shots: few-shot, k train examples per class and a dev set of k per class (LM-BFF; draw `seed`; 0 = off)
        task=dict(path="", hf_dataset="", text_field="text", label_field="label", train_size=0, shots=0),
        data=dict(max_seq_length=512),
        train=dict(batch_size=16, epochs=10, patience=3, metric="macro_f1", log_every=50, skip_nonfinite=False,
                   grad_reduce_dtype="float32", gather_params_once=False, stop_poll_every=10,  # as in pretraining
                   # Stability helpers: re-initialise the top k encoder layers (Zhang et al. 2021); layer-wise
                   # learning-rate decay (1 = off); Dodge et al. 2020: after `discard_fraction` of the epochs,
                   # stop a seed whose dev score is below `discard_below` (the grid sets it from other seeds).
                   reinit_top_layers=0, layerwise_lr_decay=1.0, discard_fraction=0.0,
                   discard_below=placeholder(float),
                   # steps_per_epoch: cap an "epoch" (dev evaluation, early stopping) at this many batches of
                   # the epoch's shuffled order, for large tasks (None: a full pass over train)
                   steps_per_epoch=placeholder(int),
                   # structured pruning: drop the top k encoder layers before fine-tuning (a shallower model)
                   prune_top_layers=0,
                   # start a new classification head even when init has one (intermediate-task training)
                   fresh_head=False),
        # R3F / SMART trust-region regularisers (engine/regularizers.py; their papers' defaults)
        regularizer=default_regularizer_config(),
        # weight averaging, evaluated on dev and test and handed on instead of the last weights:
        # ema (decay per step) or swa (the mean of the end-of-epoch weights from epoch swa_start on)
        averaging=dict(method="none", ema_decay=0.999, swa_start=1),
        # head: "classifier" (a new head on <s>) or "prompt" (the MLM head at a template's mask, scored at the
        # verbalizer's words: engine/prompt.py); `prompt` counts only with head="prompt"
        head="classifier", prompt=default_prompt_config(),
        # multi-task fine-tuning: + an annealed weight x MLM loss on the task's text (engine/multitask.py)
        multitask=default_multitask_config(),
        # an .npz of fixed gates on the heads and FFN units ([layers, heads] "head", [layers, mlp] "intermediate"),
        # applied in training and scoring, e.g. a HAT domain's mask (model/gates.py); "" = none
        unit_gates="")
    cfg.optim.update(learning_rate=2e-5, weight_decay=0.1)
    cfg.model.hidden_dropout_prob = 0.1
    return cfg


def select_config() -> ConfigDict:
    """kNN-TAPT per the paper: k neighbours per task example by VAMPIRE embedding (k=50/150/500 in Table 8)."""
    return ConfigDict(dict(
        name="select", workdir="runs/select", seed=0,
        method="knn",  # knn | rand | dsir | curated
        task=dict(path="", hf_dataset="", text_field="text", label_field="label"),
        sources=[],  # the domain corpus to select from
        curated_sources=[],  # method=curated: your extra in-distribution unlabeled text
        k=50,  # knn: neighbours per task (train) example
        n=0, n_from="",  # rand/dsir: n documents, or as many as the finished selection in workdir n_from kept
        fit_docs=100_000,  # the embedder and DSIR's raw distribution are fitted on the corpus' first documents
        embedding=dict(kind="vampire", dim=8192, ngrams=(1,),  # dim: hashed vocabulary (vampire, tfidf)
                       vampire=dict(hidden=64, latent=64, steps=2000, batch_size=256, learning_rate=1e-3),
                       lm=dict(init="", max_seq_length=128, batch_size=64)),
        knn=dict(backend="jax", approximate=False),  # backend: jax | faiss
        dsir=dict(dim=1 << 16, ngrams=(1, 2)),
        leakage=dict(splits=("dev", "test"), ngram=3, threshold=0.8),
        chunk_size=4096, checkpoint_every=8,
        mesh=dict(shape=(-1, 1, 1)))).lock()
