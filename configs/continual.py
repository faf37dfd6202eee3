"""Continual DAP-training (DAS vs NCL vs one-DAPT-per-domain vs base) on the synthetic benchmark, 3 domains.

dontstop continual --config configs/continual.py:synthetic     # or :tiny for a smoke run
"""

from dontstop_jax.phases.continual import synthetic_config


SCALES = {"synthetic": "default", "tiny": "tiny"}


def get_config(arg: str = "synthetic"):
    if arg not in SCALES:
        raise ValueError(f"unknown preset {arg!r}; choose from {sorted(SCALES)}")
    return synthetic_config(SCALES[arg])
