"""Process-wide JAX settings every entry point applies first."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from typing import Any

import jax
import numpy as np

from dontstop_jax import distributed


def setup(compilation_cache: str | None = None) -> None:
    """Join a multi-process run when launched as one (see `distributed`), a persistent compilation cache
    (identical steps across seeds, phases and restarts compile once) and quieter third-party logs."""
    keep_freed_host_memory(True)
    distributed.initialize()
    if jax.default_backend() != "cpu":
        keep_freed_host_memory(False)  # an accelerator computes: the host's allocations are not in the step
    use_compilation_cache(
        compilation_cache
        or os.environ.get("DONTSTOP_COMPILATION_CACHE", os.path.expanduser("~/.cache/dontstop_jax/xla"))
    )
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        _one_cache_key_on_every_cpu_process()
    # Orbax reports every save at INFO/WARNING, and a failed background save as an ERROR with a traceback before
    # raising the same error in the main thread, where the CLI reports it in one line.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # "Task exception was never retrieved" of that save
    _quiet_closed_loop()


def use_compilation_cache(directory: str, min_compile_secs: float = 0.5) -> None:
    """Read compiled programs from `directory` and write there each one that took `min_compile_secs` or more."""
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _one_cache_key_on_every_cpu_process() -> None:
    """JAX keys a compiled program partly by its devices' topology fingerprint, which for CPU devices differs
    from process to process, and only process 0 writes the cache: the other processes of a multi-process CPU run
    (`launch/run.sh local`, the tests' 2-host runs) never read it and compiled every program again (process 1
    of a 2-process tiny continual run: 201 s of compiling, process 0: 13 s). Key CPU programs by their devices'
    kind and (process, id) layout instead, which every process sees alike."""
    from jax._src import cache_key

    fingerprint = getattr(cache_key, "_hash_accelerator_config", None)
    if fingerprint is None or getattr(fingerprint, "same_on_every_process", False):
        return

    def layout(hash_obj: Any, accelerators: np.ndarray) -> Any:
        if any(d.platform != "cpu" for d in accelerators.flat):
            return fingerprint(hash_obj, accelerators)
        hash_obj.update(repr([(d.device_kind, d.process_index, d.id) for d in accelerators.flat]).encode())
        return None

    layout.same_on_every_process = True  # type: ignore[attr-defined]
    cache_key._hash_accelerator_config = layout


# glibc's mallopt parameters (malloc.h): the values for a CPU run, and glibc's defaults.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_CPU_RUN = {_M_ARENA_MAX: 1, _M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1, _M_TOP_PAD: 64 << 20}
_GLIBC_DEFAULTS = {_M_ARENA_MAX: 0, _M_MMAP_MAX: 65536, _M_TRIM_THRESHOLD: 128 << 10, _M_TOP_PAD: 128 << 10}


def keep_freed_host_memory(keep: bool) -> bool:
    """Make glibc keep the memory a process frees (one arena, no per-allocation mmap, no trimming), or restore
    its defaults; False where the C library is not glibc (nothing to tune).

    XLA's CPU runtime allocates and frees each step's buffers from its thread pool; by default glibc serves them
    from per-thread arenas and mmap and hands them back to the OS when freed, so every step page-faults them in
    again: a third of a CPU run's time went to the kernel (the demo's pretraining; bench/NOTES.md). Kept, the
    process's memory stays at its peak. Called first, before JAX starts its threads."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in (_CPU_RUN if keep else _GLIBC_DEFAULTS).items())


def _closed_loop(err: BaseException | None) -> bool:
    return isinstance(err, RuntimeError) and str(err) == "Event loop is closed"


def _quiet_closed_loop() -> None:
    """After a failed background checkpoint save, tensorstore's threads still call into Orbax's closed event
    loop and each prints a traceback; the save's own error reaches the main thread and is reported there."""
    thread_hook, unraisable_hook, except_hook = threading.excepthook, sys.unraisablehook, sys.excepthook
    threading.excepthook = lambda args: None if _closed_loop(args.exc_value) else thread_hook(args)
    sys.unraisablehook = lambda args: None if _closed_loop(args.exc_value) else unraisable_hook(args)
    sys.excepthook = lambda kind, err, tb: None if _closed_loop(err) else except_hook(kind, err, tb)
