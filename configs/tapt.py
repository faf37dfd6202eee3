"""TAPT: 100 epochs of masked-LM on the task's own unlabeled text (train split + unlabeled.jsonl if any).

dontstop pretrain --config configs/tapt.py:chemprot --config.init=runs/dapt-biomed \
    --config.data.sources='["/data/chemprot/train.jsonl"]'
"""

from dontstop_jax.phases.defaults import pretrain_config


def get_config(task: str = "chemprot"):
    cfg = pretrain_config("tapt")
    cfg.name = f"tapt-{task}"
    cfg.workdir = f"runs/tapt-{task}"
    return cfg
