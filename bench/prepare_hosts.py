"""Preparation by every host: 2 processes vs 1 on the same corpus (plain text and gzipped JSON lines).

Each process is one "host" of a multi-process JAX run (gloo on this machine) with its own TMPDIR and cache, pinned
to cores of its own (sched_setaffinity; --cores-per-host, default 1): the 1-process run gets cores [0, c), the
2-process run [0, c) and [c, 2c). Each runs in a session of its own, so Linux's autogroup scheduling gives each
host the share of its cores that one process gets (in one shared group, 2 processes split 1 process's share of a
busy machine, and 2 hosts looked no faster than 1). Each prepares with prepare's default encoding pool, sized to
the cores it may use, so the comparison is of hosts that each bring their cores, as the issue means, not of 2
processes sharing the cores 1 process already used. Into a bucket (the local GCS emulator, not pinned: it stands
for the remote storage) or a local directory both share. Reported per corpus: the wall time of `prepare_corpus`
(slowest process; start-up before it, Python, JAX and the tokenizer's imports, the distributed join and the first
touch of the bucket, is not in it: a command has done that before it prepares) for 1 and 2 processes, run
1/2/1/2/..., median of the repeats, and their ratio; next to it the same for CPU seconds (each process's, its
encoding workers included; the ratio of the slowest): on a machine that other jobs load, the CPU ratio says what
hosts with their own idle cores would see; and each host's local disk: the bytes it staged for upload in all, and
its peak (the largest file, each deleted before the next, plus what is left in its TMPDIR and cache) against its
share of the prepared corpus. Unit, block and shard sizes are scaled down with the corpus (64 units, 256
compressed blocks, 8 shards, as a 24-48 GB corpus has thousands).

    python -m bench.prepare_hosts --out local     # 256 MB of text per corpus, into a local directory both share
    python -m bench.prepare_hosts                 # into the emulated bucket
    python -m bench.prepare_hosts --mb 8 --repeats 1
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import machine, markdown_table, write_json
from bench.data_pipeline import make_tokenizer, write_corpus

SEQ = 512
HOST = """
import json, os, sys, time
from pathlib import Path
from dontstop_jax import distributed, files
distributed.initialize()
from dontstop_jax.data import prepare
import dontstop_jax.model.hub  # start-up: the tokenizer loader's imports (flax among them),
files.walk(sys.argv[3])  # and the first touch of the storage (a bucket client's imports and session)
prepare.UNIT_BYTES, prepare.UNIT_LINES, prepare.STREAM_BLOCK = map(int, sys.argv[4:7])
upload, largest, written = files.upload, [0], [0]

def measured(local, target):  # every local file prepare writes goes up through here, one at a time, then is deleted
    largest[0] = max(largest[0], os.path.getsize(local))
    written[0] += os.path.getsize(local)
    upload(local, target)

files.upload = measured
cpu = lambda: sum(os.times()[:4])  # this process's and its finished workers' user + system seconds
start, start_cpu = time.perf_counter(), cpu()
corpus = prepare.prepare_corpus([sys.argv[1]], sys.argv[2], sys.argv[3], max_seq_length=512,
                                shard_blocks=int(sys.argv[7]))
seconds, cpu_seconds = time.perf_counter() - start, cpu() - start_cpu
left = sum(p.stat().st_size for d in (os.environ["TMPDIR"], os.environ["DONTSTOP_CACHE"])
           for p in Path(d).rglob("*") if p.is_file())
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "blocks": corpus.num_blocks,
                  "peak_disk": largest[0] + left, "written": written[0]}))
"""


def run_hosts(
    processes: int, corpus: Path, tokenizer: Path, out_root: str, units: tuple[int, ...], scratch: Path, cores: int
) -> dict:
    """Prepare with `processes` local processes, process i pinned to cores [i * cores, (i + 1) * cores); the slowest
    one's wall seconds, each one's CPU seconds and local disk."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    homes = [Path(tempfile.mkdtemp(prefix=f"host{i}-", dir=scratch)) for i in range(processes)]
    procs = []
    for i, home in enumerate(homes):
        (home / "tmp").mkdir()
        env = {
            **os.environ,
            "DONTSTOP_COORDINATOR": f"127.0.0.1:{port}",
            "DONTSTOP_NUM_PROCESSES": str(processes),
            "DONTSTOP_PROCESS_ID": str(i),
            "DONTSTOP_LOCAL_DEVICES": "1",
            "TMPDIR": str(home / "tmp"),
            "DONTSTOP_CACHE": str(home / "cache"),
            "XLA_FLAGS": "",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", HOST, str(corpus), str(tokenizer), out_root, *map(str, units)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                preexec_fn=functools.partial(os.sched_setaffinity, 0, range(i * cores, (i + 1) * cores)),
                start_new_session=True,  # a scheduling group of its own (autogroup), as a host's own cores
            )
        )
    outputs = [p.communicate(timeout=3600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outputs]
    results = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
    return {
        "seconds": max(r["seconds"] for r in results),
        "cpu_seconds": max(r["cpu_seconds"] for r in results),
        "cpu_each": [r["cpu_seconds"] for r in results],
        "blocks": results[0]["blocks"],
        "peak_disk": [r["peak_disk"] for r in results],
        "written": [r["written"] for r in results],
    }


def table(record: dict) -> str:
    """The markdown table of one run's record (also what bench/run_all.py puts in RESULTS.md)."""
    gs = record.get("out", "gs") == "gs"
    rows = [
        [
            name,
            f"{c['one_s']:.1f}",
            f"{c['two_s']:.1f}",
            f"{c['one_cpu_s']:.1f}",
            " / ".join(f"{statistics.median(run['cpu_each'][i] for run in c['runs']['2']):.1f}" for i in range(2)),
            f"**{c['ratio']:.2f}**",
            f"{c['cpu_ratio']:.2f}",
            f"{c['prepared_bytes'] / 2**20:.1f}",
            " / ".join(f"{w / 2**20:.1f}" for w in c["written_2"]) if gs else "shared disk",
            f"{c['peak_host_disk_2'] / 2**20:.2f}" if gs else "-",
            f"{c['peak_host_disk_2'] / c['share_bytes']:.2f}" if gs else "-",
        ]
        for name, c in record["corpora"].items()
    ]
    load = " -> ".join(", ".join(f"{x:.1f}" for x in record[k]) for k in ("load", "load_after") if k in record)
    cores = record["cores_per_host"]
    return (
        f"Into {'the emulated bucket' if gs else 'a local directory both share'}, {record['mb']:g} MB of text per "
        f"corpus, each process pinned to {cores} core{'s' * (cores > 1)} of its own (prepare's default pool: "
        f"{'in-process' if cores == 1 else f'{cores} workers'}), 1/2 processes alternated, median of "
        f"{record['repeats']}; load average before -> after the run {load} on "
        f"{record.get('machine', machine())['cores']} cores (the 2-process runs alone add 2"
        f"{', the emulator more' if gs else ''}):\n\n"
        + markdown_table(
            [
                "corpus",
                "1 process s",
                "2 processes s",
                "1 process CPU s",
                "2 processes CPU s (host 0 / 1)",
                "wall ratio (target <= 0.6)",
                "CPU ratio (slowest host)",
                "prepared MB",
                "written locally per host MB",
                "peak local disk per host MB",
                "peak / share (target <= 1.1)",
            ],
            rows,
        )
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cores-per-host", type=int, default=1)
    parser.add_argument(
        "--out",
        choices=("gs", "local"),
        default="gs",
        help="prepare into the emulated bucket, or into a local directory both processes share",
    )
    args = parser.parse_args(argv)
    if 2 * args.cores_per_host > len(os.sched_getaffinity(0)):
        parser.error(f"--cores-per-host {args.cores_per_host}: 2 hosts need {2 * args.cores_per_host} cores")
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from gcs_emulator import gcs_emulator

    from dontstop_jax import files
    from dontstop_jax.data.tokenizer import encode_plain, load_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench-prepare-hosts-") as tmp:
        work = Path(tmp)
        text = work / "corpus.txt"
        write_corpus(text, args.mb)
        lines = text.read_text().splitlines()
        jsonl = work / "corpus.jsonl.gz"
        with gzip.open(jsonl, "wt", compresslevel=6) as f:  # gzip's own default level
            f.writelines(json.dumps({"text": line}) + "\n" for line in lines)
        tokenizer = make_tokenizer(text, work / "tokenizer")
        # 64 units, 256 compressed blocks and 8 shards per corpus: a host's share of a `.gz` file is whole units, so it
        # is off by up to one unit (with 32, 17 of 32 went to one host: 0.53, not 0.5); a real corpus has thousands.
        sample = lines[:1000]  # the corpus's bytes of text per token
        per_token = len("\n".join(sample)) / sum(map(len, encode_plain(load_tokenizer(tokenizer), sample)))
        blocks = int(args.mb * 2**20 / per_token / (SEQ - 2))
        units = (
            int(args.mb * 2**20 / 64),
            max(1, len(lines) // 64),
            max(1, jsonl.stat().st_size // 256),
            int(blocks * 1.02 / 8) + 1,
        )  # 2% over the estimate: 8 shards, the last a little short
        record = {
            "mb": args.mb,
            "units": units,
            "out": args.out,
            "cores_per_host": args.cores_per_host,
            "repeats": args.repeats,
            "load": os.getloadavg(),
            "corpora": {},
        }
        with gcs_emulator(work / "gcs") as _:
            for corpus in (text, jsonl):
                runs: dict[int, list] = {1: [], 2: []}
                for r in range(args.repeats):
                    for processes in (1, 2):
                        out_root = f"{'gs://bkt' if args.out == 'gs' else work / 'out'}/{corpus.stem}-{processes}-{r}"
                        run = run_hosts(processes, corpus, tokenizer, out_root, units, work, args.cores_per_host)
                        runs[processes].append(run)
                        print(corpus.name, processes, f"{run['seconds']:.1f} s", run["cpu_each"], flush=True)
                prepared = files.walk(f"{'gs://bkt' if args.out == 'gs' else work / 'out'}/{corpus.stem}-1-0")
                corpus_bytes = sum(files.source_stat(p)[0] for p in prepared.values())
                one, two = (statistics.median(run["seconds"] for run in runs[n]) for n in (1, 2))
                one_cpu, two_cpu = (statistics.median(run["cpu_seconds"] for run in runs[n]) for n in (1, 2))
                peak = max(max(run["peak_disk"]) for run in runs[2])
                record["corpora"][corpus.name] = {
                    "one_s": one,
                    "two_s": two,
                    "ratio": two / one,
                    "one_cpu_s": one_cpu,
                    "two_cpu_s": two_cpu,
                    "cpu_ratio": two_cpu / one_cpu,
                    "prepared_bytes": corpus_bytes,
                    "peak_host_disk_2": peak,
                    "written_2": runs[2][0]["written"],
                    "share_bytes": corpus_bytes / 2,
                    "runs": {str(n): v for n, v in runs.items()},
                }
        record["load_after"] = os.getloadavg()
    print(table(record))
    write_json(f"prepare_hosts_{args.out}", record)
    return record


if __name__ == "__main__":
    main()
