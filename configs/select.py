"""Task-adaptive data selection: the corpus a TAPT phase adds to the task's own text.

dontstop select --config configs/select.py:knn --config.task.path=/data/chemprot \
    --config.sources='["/data/s2orc/*.txt"]' --config.k=500 --config.workdir=runs/select-chemprot-knn500
Methods (the arg): knn, rand, dsir, curated. See dontstop_jax/phases/defaults.py select_config for every field.
"""

from dontstop_jax.phases.defaults import select_config


def get_config(method: str = "knn"):
    cfg = select_config()
    cfg.method = method
    cfg.name = f"select-{method}"
    cfg.workdir = f"runs/select-{method}"
    return cfg
