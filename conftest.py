"""Test-session setup that must run before JAX initialises: 8 virtual CPU devices for the mesh tests, and the
CPU backend only. libtpu (in the test extra, for the `dontstop plan` tests) would otherwise look for a TPU in
every JAX process, the CLI runs the tests start included, and print its failure to their stderr."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
