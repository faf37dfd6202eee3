"""The test suite's XLA flags (root conftest.py) against XLA's defaults, on what the tests mostly do: a fresh process
compiling and running a tiny CLI pretrain (tests/tiny_pretrain.py, 10 steps) with an empty compilation cache.
Alternates the two sides repeat by repeat; prints each run's CPU seconds (the process and its children; on a
shared machine wall time says little), wall seconds and last loss, then the median CPU ratio.

    python -m bench.compile_flags --repeats 2
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from tiny_pretrain import REPO, command, write_corpus  # noqa: E402

# The candidate (the suite runs XLA's defaults: lower levels changed rounding enough to fail tests; bench/NOTES.md).
CANDIDATE_FLAGS = "--xla_backend_optimization_level=1"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    sides = {"defaults": "", CANDIDATE_FLAGS: CANDIDATE_FLAGS}
    root = Path(tempfile.mkdtemp())
    # the tests' tokenizer (tests/conftest.py, not importable by name next to the root conftest.py)
    spec = importlib.util.spec_from_file_location("tests_conftest", REPO / "tests" / "conftest.py")
    assert spec is not None and spec.loader is not None
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    tokenizer, corpus = fixtures._bpe_tokenizer(root / "tokenizer", 400, byte_alphabet=True), write_corpus(root)
    cpu: dict[str, list[float]] = {side: [] for side in sides}
    for repeat in range(args.repeats):
        for side, flags in sides.items():
            workdir = root / f"{repeat}-{side}"
            env = {**os.environ, "XLA_FLAGS": flags, "DONTSTOP_COMPILATION_CACHE": str(workdir / "xla")}
            before, start = cpu_seconds(), time.time()
            out = subprocess.run(
                command(workdir, corpus, tokenizer, workdir / "cache", 10), cwd=REPO, env=env, capture_output=True
            )
            assert out.returncode == 0, out.stderr[-2000:]
            cpu[side].append(cpu_seconds() - before)
            loss = re.findall(rb"loss=(\S+)", out.stdout + out.stderr)[-1].decode()
            print(f"{side:40s} cpu {cpu[side][-1]:6.1f} s  wall {time.time() - start:6.1f} s  loss {loss}", flush=True)
    base, test = (statistics.median(v) for v in cpu.values())
    print(f"CPU seconds, test flags / defaults: {test / base:.2f} (median of {args.repeats})")


if __name__ == "__main__":
    main()
