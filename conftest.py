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
import pytest  # noqa: E402
from jax._src import compiler as jax_compiler  # noqa: E402

from dontstop_jax.runtime import keep_freed_host_memory  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
keep_freed_host_memory(True)  # as every `dontstop` command on CPU does (runtime.setup), before JAX's threads start

# The programs this process compiles itself (not its CLI children, which keep XLA's defaults above) are compiled
# with LLVM unoptimised: the in-process tests are tiny programs built for one check each, whose CPU time is mostly
# XLA:CPU's LLVM compiler (tests/test_engine.py + tests/test_grad_reduction.py: 337 s of 385 s was compilation;
# at level 0 the two files take 208 s). The CLI runs the tests start train for longer: at level 0 they took more
# CPU, not less (the tiny demo's interrupted runs 75 -> 92 s, the continual reference 40 -> 63 s). A test marked
# `xla_defaults` compiles with XLA's defaults: its margins were measured there, or it runs a program long enough
# that optimised code pays (bench/NOTES.md, "Test-suite XLA flags"). Applied per compilation (part of the
# compilation-cache key), so both kinds share one process.
FAST_COMPILE = ("xla_backend_optimization_level", "0")
_fast_compile = [True]


def _compile_or_get_cached(backend, computation, devices, compile_options, *args, **kwargs):
    if _fast_compile[0] and backend.platform == "cpu":
        compile_options.env_option_overrides = [*compile_options.env_option_overrides, FAST_COMPILE]
    return _compile(backend, computation, devices, compile_options, *args, **kwargs)


_compile, jax_compiler.compile_or_get_cached = jax_compiler.compile_or_get_cached, _compile_or_get_cached


@pytest.fixture(autouse=True)
def _xla_defaults_where_marked(request: pytest.FixtureRequest):
    _fast_compile[0] = request.node.get_closest_marker("xla_defaults") is None
    yield
    _fast_compile[0] = True


@pytest.fixture(scope="module", autouse=True)
def _fast_compiling_commands_where_marked(request: pytest.FixtureRequest):
    """A test file marked `fast_compile_commands` (pytestmark) starts its CLI processes with LLVM unoptimised too,
    module fixtures included: they run a few steps of a tiny model, so compiling is most of their CPU time. The
    file compares them only with runs it starts itself."""
    with pytest.MonkeyPatch.context() as env:
        if request.node.get_closest_marker("fast_compile_commands") is not None:
            env.setenv("XLA_FLAGS", f"--{FAST_COMPILE[0]}={FAST_COMPILE[1]}")
        yield
