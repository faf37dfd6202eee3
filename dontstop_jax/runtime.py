"""Process-wide JAX settings every entry point applies first."""

from __future__ import annotations

import logging
import os

import jax

from dontstop_jax import distributed


def setup(compilation_cache: str | None = None) -> None:
    """Join a multi-process run when launched as one (see `distributed`), a persistent compilation cache
    (identical steps across seeds, phases and restarts compile once) and quieter third-party logs."""
    distributed.initialize()
    cache = compilation_cache or os.environ.get("DONTSTOP_COMPILATION_CACHE",
                                                os.path.expanduser("~/.cache/dontstop_jax/xla"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # Orbax reports every save at INFO/WARNING, and a failed background save as an ERROR with a traceback before
    # raising the same error in the main thread, where the CLI reports it in one line.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
