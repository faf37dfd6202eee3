"""The phases' default configs: the fields declared in dontstop_jax/fields.py at the paper's values per phase.
The configs are type-safe and locked, so a typo or a wrong type (`--config.train.stpes=5`,
`--config.train.steps=abc`) is an error, not a silently new or mistyped setting; fields that default to None are
typed placeholders."""

from __future__ import annotations

from ml_collections import ConfigDict

from dontstop_jax.fields import DAS, DERPP, EWC, FINETUNE, HAT, PRETRAIN, SELECT, build

PRETRAIN_KINDS = ("dapt", "tapt")


def das_config() -> ConfigDict:
    """DAS (Ke et al. 2023): the paper's contrastive temperature; importance measured on a few batches of the
    domain's text (the paper uses a sample of it; EWC's Fisher and DER++'s buffer logits use the same sample)."""
    return build(DAS)


def ewc_config() -> ConfigDict:
    """EWC (Kirkpatrick et al. 2017): penalty strength lam, 5000 as in Serra et al. 2018's EWC baseline."""
    return build(EWC)


def derpp_config() -> ConfigDict:
    """DER++ (Buzzega et al. 2020): buffer of 200 sequences, alpha 0.1 (logit MSE), beta 0.5 (replayed MLM)."""
    return build(DERPP)


def hat_config() -> ConfigDict:
    """HAT (Serra et al. 2018): the gate slope anneals to s_max = 400; sparsity weight c = 0.75."""
    return build(HAT)


def _named(cfg: ConfigDict, name: str) -> ConfigDict:
    cfg.update(name=name, workdir=f"runs/{name}")
    return cfg


def pretrain_config(kind: str = "dapt") -> ConfigDict:
    """DAPT per the paper: one pass, 12.5K steps of 2048 sequences (via accumulation), lr 5e-4, warm-up 6%.
    TAPT: 100 epochs over the task's unlabeled text, batch 256, lr 1e-4, fresh masks every epoch."""
    if kind not in PRETRAIN_KINDS:
        raise ValueError(f"unknown pretraining kind {kind!r}; choose from {list(PRETRAIN_KINDS)}")
    cfg = _named(build(PRETRAIN), kind)
    if kind == "dapt":
        cfg.train.update(batch_size=2048, accum_steps=32, steps=12500, epochs=1)
        cfg.optim.learning_rate = 5e-4
    else:
        cfg.optim.learning_rate = 1e-4
        cfg.data.attend_across_documents = False  # a task's short examples are unrelated to their neighbours
    return cfg.lock()


def finetune_config() -> ConfigDict:
    """Paper protocol: lr 2e-5, batch 16, up to 10 epochs, patience 3 on dev, dropout 0.1, warm-up 6%; no
    regulariser, averaging or pruning unless asked."""
    cfg = _named(build(FINETUNE), "finetune")
    cfg.optim.update(learning_rate=2e-5, weight_decay=0.1)
    cfg.model.hidden_dropout_prob = 0.1
    return cfg.lock()


def select_config() -> ConfigDict:
    """kNN-TAPT per the paper: k neighbours per task example by VAMPIRE embedding (k=50/150/500 in Table 8)."""
    return _named(build(SELECT), "select").lock()
