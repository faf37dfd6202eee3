"""Continual DAP-training (DAS vs NCL vs one-DAPT-per-domain vs base) on the synthetic benchmark, 3 domains.

dontstop continual --config configs/continual.py:synthetic     # every method, the demo's schedules
dontstop continual --config configs/continual.py:table         # docs/results/continual.md: 2 CPU cores
dontstop continual --config configs/continual.py:tiny          # smoke run
"""

from dontstop_jax.phases.continual import synthetic_config

SCALES = {"synthetic": "default", "tiny": "tiny", "table": "default"}
# docs/results/continual.md: the demo's base model (600 steps, shared by every method) and fine-tuning (10 epochs,
# 3 seeds); DAPT stages of 400 steps of 32 sequences, a third of the demo's 600 x 64. Measured on the bio
# domain: DAPT lifts bio_topic from 25% (base) to 46% macro-F1 (200 x 64: 28%), a gap that forgetting can
# erase. The main methods first; the ablations and the other references: --config.methods=...
TABLE_METHODS = ["ncl", "one", "base", "das", "ewc", "hat", "derpp"]


def get_config(arg: str = "synthetic"):
    if arg not in SCALES:
        raise ValueError(f"unknown preset {arg!r}; choose from {sorted(SCALES)}")
    cfg = synthetic_config(SCALES[arg])
    if arg == "table":
        cfg.workdir = "runs/continual-table"
        cfg.dapt.train.update(steps=400, batch_size=32)
        cfg.methods = TABLE_METHODS
    return cfg
