"""Benchmarks, run as `python -m bench.NAME` (bench/RESULTS.md lists them and their figures).

Importing the package first makes the CLI's platform choice, before any benchmark imports JAX: on a machine with
no TPU and no GPU, JAX_PLATFORMS=cpu, so libtpu (in the test extra) prints no start-up lines into the figures."""

from dontstop_jax.cli import quiet_platform

quiet_platform()
