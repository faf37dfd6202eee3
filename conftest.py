"""Test-session setup that must run before JAX initialises: 8 virtual CPU devices for the mesh tests, the CPU
backend only, and the XLA flags of every JAX process of the session. libtpu (in the test extra, for the
`dontstop plan` tests) would otherwise look for a TPU in every JAX process, the CLI runs the tests start included,
and print its failure to their stderr."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA configuration for every process of the session (the CLI, `launch/run.sh local`,
# tests/local_processes.py inherit it), so runs compared across processes compile alike: LLVM unoptimised. The
# tests' programs are tiny and built for one check each, so their CPU time is mostly XLA:CPU's LLVM compiler
# (tests/test_engine.py + tests/test_grad_reduction.py: 337 s of 385 s; 208 s at level 0). Real runs keep XLA's
# defaults, and so do the tests whose margins were measured there or that train long enough for optimised code to
# pay: in this process a test marked `xla_defaults` (below), a CLI child given `XLA_FLAGS=""`
# (-O0 moves DAS's forgetting past its margin; -O1 broke gamma-0 behavioural fine-tuning's bit-for-bit equality
# and DAPT+TAPT over TAPT in the demo; bench/NOTES.md).
os.environ["XLA_FLAGS"] = "--xla_backend_optimization_level=0"

# Several test workers (pytest-xdist) and the processes they start may load libtpu at once (the `plan` tests).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import pytest  # noqa: E402
from jax._src import compiler as jax_compiler  # noqa: E402

from dontstop_jax.runtime import keep_freed_host_memory  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
keep_freed_host_memory(True)  # as every `dontstop` command on CPU does (runtime.setup), before JAX's threads start

# `xla_defaults`: XLA's default level (3) for what the marked test compiles in this process, as a per-compilation
# option (part of the compilation-cache key), so both kinds of test share one process.
_defaults = [False]


def _compile_or_get_cached(backend, computation, devices, compile_options, *args, **kwargs):
    if _defaults[0] and backend.platform == "cpu":
        overrides = [kv for kv in compile_options.env_option_overrides if kv[0] != "xla_backend_optimization_level"]
        compile_options.env_option_overrides = [*overrides, ("xla_backend_optimization_level", "3")]
    return _compile(backend, computation, devices, compile_options, *args, **kwargs)


_compile, jax_compiler.compile_or_get_cached = jax_compiler.compile_or_get_cached, _compile_or_get_cached


@pytest.fixture(autouse=True)
def _xla_defaults_where_marked(request: pytest.FixtureRequest):
    _defaults[0] = request.node.get_closest_marker("xla_defaults") is not None
    yield
    _defaults[0] = False
