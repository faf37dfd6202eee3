"""Test-session setup that must run before JAX initialises: 8 virtual CPU devices for the mesh tests."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
