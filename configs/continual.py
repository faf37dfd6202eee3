"""Continual DAP-training (DAS vs NCL vs one-DAPT-per-domain vs base) on the synthetic benchmark, 3 domains.

dontstop continual --config configs/continual.py:synthetic     # or :tiny for a smoke run
"""

from dontstop_jax.phases.continual import synthetic_config


def get_config(arg: str = "synthetic"):
    return synthetic_config({"synthetic": "default", "tiny": "tiny"}[arg])
