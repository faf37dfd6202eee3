"""Process-wide JAX settings every entry point applies first."""

from __future__ import annotations

import logging
import os
import sys
import threading

import jax

from dontstop_jax import distributed


def setup(compilation_cache: str | None = None) -> None:
    """Join a multi-process run when launched as one (see `distributed`), a persistent compilation cache
    (identical steps across seeds, phases and restarts compile once) and quieter third-party logs."""
    distributed.initialize()
    cache = compilation_cache or os.environ.get(
        "DONTSTOP_COMPILATION_CACHE", os.path.expanduser("~/.cache/dontstop_jax/xla")
    )
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # Orbax reports every save at INFO/WARNING, and a failed background save as an ERROR with a traceback before
    # raising the same error in the main thread, where the CLI reports it in one line.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # "Task exception was never retrieved" of that save
    _quiet_closed_loop()


def _closed_loop(err: BaseException | None) -> bool:
    return isinstance(err, RuntimeError) and str(err) == "Event loop is closed"


def _quiet_closed_loop() -> None:
    """After a failed background checkpoint save, tensorstore's threads still call into Orbax's closed event
    loop and each prints a traceback; the save's own error reaches the main thread and is reported there."""
    thread_hook, unraisable_hook, except_hook = threading.excepthook, sys.unraisablehook, sys.excepthook
    threading.excepthook = lambda args: None if _closed_loop(args.exc_value) else thread_hook(args)
    sys.unraisablehook = lambda args: None if _closed_loop(args.exc_value) else unraisable_hook(args)
    sys.excepthook = lambda kind, err, tb: None if _closed_loop(err) else except_hook(kind, err, tb)
