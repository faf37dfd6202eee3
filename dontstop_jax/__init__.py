"""dontstop_jax: domain- and task-adaptive pretraining (DAPT/TAPT) of RoBERTa in JAX/Flax."""

import os

# transformers greets every import without PyTorch with "PyTorch was not found. Models won't be available...",
# advice for its own model classes, which this package never uses (it needs only tokenizers and configs); on a
# plain install it was the first line a user saw and read like an install error. Only advisory messages go.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
