"""The training loop's pieces: reporting (more modules join as the loop grows)."""

from dontstop_jax.train.logging import MetricsBuffer, MetricsWriter, ProgressBar
