"""Test-session setup that must run before JAX initialises: 8 virtual CPU devices for the mesh tests, the CPU
backend only, and the XLA flags of every JAX process of the session. libtpu (in the test extra, for the
`dontstop plan` tests) would otherwise look for a TPU in every JAX process, the CLI runs the tests start included,
and print its failure to their stderr."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA configuration for every process of the session (the CLI, `launch/run.sh local`,
# tests/local_processes.py inherit it), so runs compared across processes compile alike: XLA's defaults, as real
# runs use. Lower LLVM levels compile faster but change rounding enough to break exact-equality and thin-margin
# tests (-O0: DAS forgetting; -O1: gamma-0 behavioural fine-tuning, DAPT+TAPT over TAPT; bench/NOTES.md).
os.environ["XLA_FLAGS"] = ""

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
