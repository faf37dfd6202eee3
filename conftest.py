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

# Several test workers (pytest-xdist) and the processes they start may load libtpu at once (the `plan` tests).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

from dontstop_jax.runtime import keep_freed_host_memory  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
keep_freed_host_memory(True)  # as every `dontstop` command on CPU does (runtime.setup), before JAX's threads start
