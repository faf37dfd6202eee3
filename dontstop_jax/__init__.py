"""dontstop_jax: domain- and task-adaptive pretraining (DAPT/TAPT) of RoBERTa in JAX/Flax."""

__version__ = "0.1.0"
