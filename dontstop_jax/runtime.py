"""Process-wide JAX settings every entry point applies first."""

from __future__ import annotations

import copy
import ctypes
import itertools
import logging
import os
import sys
import threading
import zlib
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
        _compile_once_for_every_cpu_process()
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
    kind and (process, id) layout instead, which every process sees alike (and hand programs over by that key:
    `_compile_once_for_every_cpu_process`)."""
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


HAND_OVER_SECONDS = 600  # how long a process waits for process 0's program before compiling it itself


def _compile_once_for_every_cpu_process() -> None:
    """In a multi-process CPU run (`launch/run.sh local`, the tests' 2-host runs: all on one machine) every
    process compiled every program that spans the processes, the same program at the same moment, so N processes
    took N times the compile CPU (a 2-process tiny continual run: 75 s of compiling on each). Now the process
    holding the program's first device compiles it (or reads it from its cache) and hands the executable over
    through the coordination service's key-value store: it announces the n-th such program by its cache key (as
    above; each host's own cache directory left out), and a process whose n-th program has that key loads the
    executable; the last of them to read it deletes it. Any other program (another key, host callbacks, nothing
    announced within HAND_OVER_SECONDS) is compiled where it is, as before."""
    from jax._src import cache_key, compiler
    from jax._src import distributed as jax_distributed

    compile_or_get_cached = getattr(compiler, "compile_or_get_cached", None)
    if compile_or_get_cached is None or getattr(compile_or_get_cached, "hands_over", False):
        return
    hits = threading.local()  # this thread's compilation-cache hits (JAX records them where it compiles)
    jax.monitoring.register_event_listener(
        lambda event, **_: setattr(hits, "n", getattr(hits, "n", 0) + 1) if event.endswith("/cache_hits") else None
    )
    programs, lock = itertools.count(), threading.Lock()  # this process's programs over several processes

    def handed_over(backend, computation, devices, compile_options, host_callbacks, executable_devices, *rest):
        def here():
            return compile_or_get_cached(
                backend, computation, devices, compile_options, host_callbacks, executable_devices, *rest
            )

        client = jax_distributed.global_state.client
        processes = {d.process_index for d in devices.flat}
        if client is None or len(processes) < 2 or host_callbacks or backend.platform != "cpu":
            return here()
        options = copy.deepcopy(compile_options)  # JAX names the cache directory in them: each host has its own
        options.executable_build_options.debug_options.xla_gpu_per_fusion_autotune_cache_dir = ""
        key = cache_key.get(computation, devices, options, backend)
        with lock:
            n = next(programs)
        announced, handed = f"dontstop/program-key/{n}", f"dontstop/program/{n}"
        if jax.process_index() == min(devices.flat, key=lambda d: d.id).process_index:
            client.key_value_set(announced, key, True)
            before = getattr(hits, "n", 0)
            try:
                executable = here()
            except BaseException:
                client.key_value_set_bytes(handed, b"", True)  # the others compile it (and fail alike), not wait
                raise
            # A program read from the cache cannot be serialized again (XLA:CPU drops its code): the others read it
            # from theirs (an empty payload), as before; one compiled here is handed over.
            payload = b"" if getattr(hits, "n", 0) > before else zlib.compress(executable.serialize(), 1)
            client.key_value_set_bytes(handed, payload, True)
            return executable
        try:
            if client.blocking_key_value_get(announced, HAND_OVER_SECONDS * 1000) != key:
                return here()  # process 0's n-th program is another one
            payload = client.blocking_key_value_get_bytes(handed, HAND_OVER_SECONDS * 1000)
        except Exception as err:  # the first process failed, or never compiles it: compile here
            name = key.split("-")[0]
            print(f"process {jax.process_index()}: {name} not handed over ({err}); compiling it here", file=sys.stderr)
            return here()
        # The last of the program's other processes to read it frees it: the service keeps a run's programs else.
        if client.key_value_increment(f"dontstop/program-read/{n}", 1) == len(processes) - 1:
            client.key_value_delete(handed)
        if not payload:
            return here()
        return backend.deserialize_executable(zlib.decompress(payload), executable_devices, compile_options)

    handed_over.hands_over = True  # type: ignore[attr-defined]
    compiler.compile_or_get_cached = handed_over


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
    accepted = [mallopt(param, value) == 1 for param, value in (_CPU_RUN if keep else _GLIBC_DEFAULTS).items()]
    return all(accepted)  # every setting tried, even after one is refused


def _closed_loop(err: BaseException | None) -> bool:
    return isinstance(err, RuntimeError) and str(err) == "Event loop is closed"


def _quiet_closed_loop() -> None:
    """After a failed background checkpoint save, tensorstore's threads still call into Orbax's closed event
    loop and each prints a traceback; the save's own error reaches the main thread and is reported there."""
    thread_hook, unraisable_hook, except_hook = threading.excepthook, sys.unraisablehook, sys.excepthook
    threading.excepthook = lambda args: None if _closed_loop(args.exc_value) else thread_hook(args)
    sys.unraisablehook = lambda args: None if _closed_loop(args.exc_value) else unraisable_hook(args)
    sys.excepthook = lambda kind, err, tb: None if _closed_loop(err) else except_hook(kind, err, tb)
