"""Test-session setup that must run before JAX initialises: 8 virtual CPU devices for the mesh tests, the CPU
backend only, and the XLA flags of every JAX process of the session. libtpu (in the test extra, for the
`dontstop plan` tests) would otherwise look for a TPU in every JAX process, the CLI runs the tests start included,
and print its failure to their stderr."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile speed (issue #28): the tests' tiny programs spend most of their CPU time in XLA's CPU compiler, and
# LLVM's optimisation level 1 compiles them faster (0.77x CPU on a cold tiny pretrain). Not level 0: it compiles
# faster still but runs the long tests slower (test_das_continual 262 s vs 148 s) and moved DAS's forgetting
# (3.84 vs 3.53 nats; NCL's 4.11 either way) past that test's margin. Set here, replacing the caller's XLA_FLAGS,
# so every process the tests start (the CLI, `launch/run.sh local`, tests/local_processes.py) inherits the same
# flags and runs compared across processes compile alike. A test-suite setting only: real runs keep XLA's defaults.
os.environ["XLA_FLAGS"] = "--xla_backend_optimization_level=1"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
