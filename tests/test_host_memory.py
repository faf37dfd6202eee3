"""runtime.keep_freed_host_memory: a CPU run keeps the memory it frees instead of page-faulting it in again on
every step (the demo's pretraining spent a third of its time in the kernel before; bench/NOTES.md)."""

import subprocess
import sys

import pytest

# A process that allocates, writes and frees a 64 MiB buffer 8 times (as XLA's CPU runtime does a step's buffers)
# and prints its minor page faults; "default" leaves glibc as it is,
# "cli" first runs what every `dontstop` command runs first.
CHURN = """
import ctypes, resource, sys
from dontstop_jax import runtime
if sys.argv[1] == "cli":
    runtime.setup(sys.argv[2])  # what every command does first; on the CPU backend it keeps freed memory
libc, size = ctypes.CDLL("libc.so.6"), 64 << 20
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    buffer = libc.malloc(size)
    ctypes.memset(buffer, 1, size)
    libc.free(buffer)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, cache: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHURN, mode, cache], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_command_on_cpu_keeps_freed_buffers_instead_of_faulting_them_in_again(tmp_path):
    default, kept = _faults("default", str(tmp_path)), _faults("cli", str(tmp_path))
    pages = (64 << 20) // 4096
    assert default > 6 * pages  # glibc hands each freed buffer back: every allocation faults its pages in
    assert kept < 2 * pages, (default, kept)  # kept: only the first allocation does
