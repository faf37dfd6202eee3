"""Run a Python snippet as N local processes of one multi-process JAX run (one CPU device each), as
`launch/run.sh local` would: the coordinator on a free local port, ranks from DONTSTOP_* variables."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def run_local_processes(code: str, *args: str, processes: int = 2, timeout: float = 300) -> list[str]:
    """Each process's stdout, after all exited 0 (else the assertion shows their stderr)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "DONTSTOP_COORDINATOR": f"127.0.0.1:{port}",
                "DONTSTOP_NUM_PROCESSES": str(processes),
                "DONTSTOP_PROCESS_ID": str(i),
                "DONTSTOP_LOCAL_DEVICES": "1",
            },
        )
        for i in range(processes)
    ]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    assert [p.returncode for p in procs] == [0] * processes, [err[-2000:] for _, err in outputs]
    return [out for out, _ in outputs]
