"""Cost of remote I/O: the same work on local disk and in a gs:// bucket (a local GCS emulator), side by side.

1. prepare: local line files -> local cache vs the same files in the bucket -> a bucket cache (bucket files read
   line by line, pieces and shards uploaded as they are written, the manifest last): tokens/s of each and the
   ratio.
   And `iter_documents` alone over one line file, local vs in the bucket: the line reader prepare uses for .gz
   and bucket files (local plain files are read by the encoding workers in byte ranges instead).
2. a host's read of an existing corpus: `prepare_corpus` opening the corpus in the bucket in place (the manifest
   and one listing to check the shards' sizes; no copy) vs opening and verifying the local cache.
3. MLMLoader on the local prepared corpus (memory-mapped) vs on the corpus in the bucket (each batch's rows
   fetched by concurrent range reads), against the tokens/s the small model's train step consumes.
4. Checkpointer: async save + wait, and restore, of the small model's full train state (params, Adam state,
   step, RNG) to a local directory vs to gs:// (Orbax through tensorstore).

The emulator is gcp-storage-emulator, a Python HTTP server on this machine, sharing its cores with the client:
the ratios bound the client-side overhead (gcsfs / tensorstore requests, copies, staging), not the latency or
bandwidth of real GCS. Every pair is timed in one process, alternating repeat by repeat after a warm-up (the
prepare, first-read and checkpoint sides time only their own work: fresh cache directories and bucket prefixes
are set up outside the clock). Restored checkpoints are checked against the saved state.

    python -m bench.storage                # 32 MB corpus in 4 files (1-2 min on 2 cores)
    python -m bench.storage --mb 4 --repeats 1 --step-repeats 1 --stream-docs 100 --batch 8 --seq 64   # smoke

Needs gcsfs and gcp-storage-emulator (the test extra). The emulator helper lives in tests/gcs_emulator.py,
which this script imports by adding tests/ to sys.path: it is test/bench tooling, not part of the package.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bench.common import markdown_table, time_alternating, write_json

# gcsfs reads this once, at import: without it the first bucket call probes for a zonal/hierarchical bucket
# over gRPC, which the emulator never answers (a minute of retries). Set before anything can import gcsfs.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"
FILES = 4  # the corpus is split into this many line files, as a real corpus directory is
FRESH = "gs:// cache: open in place (manifest + listing)"
RATIOS = {
    "prepare": "prepare, gs:// / local time",
    "stream": "iter_documents over a line file, gs:// / local time",
    "first_read": "a fresh host's first read from gs:// / opening the local cache, time",
    "loader_copy_vs_local": "loader on the corpus in gs:// / on the local corpus, tokens/s",
    "loader_vs_step": "loader on the corpus in gs:// / train step consumption, tokens/s",
    "save": "checkpoint save (async save + wait), gs:// / local time",
    "restore": "checkpoint restore, gs:// / local time",
}
NOTE = (
    "The emulator is a local Python server (gcp-storage-emulator) on the same cores: the ratios bound the "
    "client-side overhead of bucket I/O (gcsfs / tensorstore requests, copies, staging), not real GCS "
    "latency or bandwidth."
)


def alternate(fns: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict:
    """Like `time_alternating`, for work that needs untimed setup: each fn does its setup, times its own work
    and returns the seconds. Returns {name: {"median_s", "min_s", "all_s"}}."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            seconds = fn()
            if i >= warmup:
                times[name].append(seconds)
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "all_s": ts} for name, ts in times.items()}


def _timed(work: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    out = work()
    return time.perf_counter() - t, out


class Sides:
    """The corpus and tokenizer on both sides, and fresh per-run places to write to."""

    def __init__(self, work: Path, mb: float, seq: int):
        from gcs_emulator import upload_tree

        from bench.data_pipeline import make_tokenizer, write_corpus

        self.work, self.seq = work, seq
        corpus = work / "corpus"
        corpus.mkdir()
        self.bytes = sum(write_corpus(corpus / f"part-{i}.txt", mb / FILES, seed=i) for i in range(FILES))
        self.tokenizer = str(make_tokenizer(corpus / "part-0.txt", work / "tokenizer"))
        upload_tree(corpus, "gs://bkt/corpus")
        self.local_sources, self.gs_sources = [str(corpus / "*.txt")], ["gs://bkt/corpus/*.txt"]
        self.local_out = work / "prepared"
        self.runs = 0

    def fresh(self, name: str) -> Path:
        """A new directory under the scratch space (a host's cache, a checkpoint directory)."""
        self.runs += 1
        return self.work / f"{name}-{self.runs}"

    def fresh_cache(self) -> Path:
        """Point this process's cache (`DONTSTOP_CACHE`) at a new, empty directory: a host that never ran."""
        from dontstop_jax.files import CACHE_ENV

        cache = self.fresh("host-cache")
        os.environ[CACHE_ENV] = str(cache)
        return cache

    def prepare(self, sources: list[str], out_root: str):
        from dontstop_jax.data import prepare_corpus

        return prepare_corpus(sources, self.tokenizer, out_root, max_seq_length=self.seq)


def prepare_rows(s: Sides, repeats: int) -> tuple[dict, str]:
    """Row 1: a cold prepare on each side. Returns the timings and the bucket prefix of the last remote build."""
    last: dict[str, Any] = {}

    def local() -> float:
        shutil.rmtree(s.local_out, ignore_errors=True)
        seconds, last["local"] = _timed(lambda: s.prepare(s.local_sources, str(s.local_out)))
        return seconds

    def remote() -> float:
        s.fresh_cache()  # nothing to reuse here, and a new bucket prefix: nothing to copy either
        last["gs_root"] = f"gs://bkt/prepared-{s.runs}"
        seconds, last["gs"] = _timed(lambda: s.prepare(s.gs_sources, last["gs_root"]))
        return seconds

    names = {"local files -> local cache": local, "gs:// files -> gs:// cache (built in the bucket)": remote}
    times = alternate(names, repeats)
    tokens = last["local"].manifest["total_tokens"]
    assert last["gs"].manifest["total_tokens"] == tokens and last["gs"].num_blocks == last["local"].num_blocks
    rows = {
        name: {
            "seconds": t["median_s"],
            "tokens_per_s": tokens / t["median_s"],
            "mb_per_s": s.bytes / 2**20 / t["median_s"],
            "all_s": t["all_s"],
        }
        for name, t in times.items()
    }
    return rows, last["gs_root"]


def stream_rows(s: Sides, repeats: int, docs: int) -> dict:
    """Row 1b: the first `docs` documents of one line file through `iter_documents`, whose line reader prepare uses
    for .gz and bucket files (local plain files go to the workers in byte ranges). Local file vs the same file in
    the bucket."""
    import itertools

    from dontstop_jax.data import iter_documents

    def read(source: str) -> Callable[[], float]:
        def run() -> float:
            return _timed(lambda: sum(1 for _ in itertools.islice(iter_documents(source), docs)))[0]

        return run

    local = s.work / "corpus" / "part-0.txt"
    with open(local, "rb") as f:
        size = sum(len(line) for line in itertools.islice(f, docs))
    times = alternate(
        {"local line file": read(str(local)), "gs:// line file": read("gs://bkt/corpus/part-0.txt")}, repeats
    )
    return {
        "docs": docs,
        "mb": size / 2**20,
        "rows": {
            name: {
                "seconds": t["median_s"],
                "docs_per_s": docs / t["median_s"],
                "mb_per_s": size / 2**20 / t["median_s"],
                "all_s": t["all_s"],
            }
            for name, t in times.items()
        },
    }


def first_read_rows(s: Sides, gs_root: str, repeats: int) -> tuple[dict, Any, Any]:
    """Row 2: what `prepare_corpus` costs on a host once the corpus exists: opening the local cache; opening the
    one in the bucket in place. Returns the timings and both corpora."""
    last: dict[str, Any] = {}

    def local() -> float:
        seconds, last["local"] = _timed(lambda: s.prepare(s.local_sources, str(s.local_out)))
        return seconds

    def first() -> float:
        last["cache"] = s.fresh_cache()
        seconds, last["copy"] = _timed(lambda: s.prepare(s.gs_sources, gs_root))
        return seconds

    times = alternate({"local cache: open and verify": local, FRESH: first}, repeats)
    copy, local_corpus = last["copy"], last["local"]
    assert not list(last["cache"].rglob("shard-*.npy")), "the host copied the corpus"
    shard_bytes = sum((local_corpus.directory / sh["file"]).stat().st_size for sh in local_corpus.manifest["shards"])
    rows = {
        name: {"seconds": t["median_s"], "shard_mb_per_s": shard_bytes / 2**20 / t["median_s"], "all_s": t["all_s"]}
        for name, t in times.items()
    }
    return {"shard_mb": shard_bytes / 2**20, "rows": rows}, local_corpus, copy


def loader_rows(s: Sides, local_corpus, copy, batch: int, repeats: int, step_repeats: int) -> tuple[dict, Any]:
    """Row 3: the loader over each copy (alternating), then the small model's train step. Returns the timings
    and the step (whose trained state the checkpoint rows save)."""
    from bench.mlm_step import MODELS, OurStep, make_batch
    from dontstop_jax.data import MLMLoader, load_tokenizer, special_ids

    tok = load_tokenizer(s.tokenizer)
    cfg = MODELS["small"].replace(vocab_size=len(tok))

    def consume(corpus):
        it = MLMLoader(corpus, batch, 0, special_ids(tok), len(tok), prefetch=0)

        def run(n):
            for _ in range(n):
                next(it)

        return run

    loaders = time_alternating(
        {"loader on the local prepared corpus": consume(local_corpus), "loader on the corpus in gs://": consume(copy)},
        steps=50,
        repeats=repeats,
    )
    step = OurStep(cfg, make_batch(cfg, batch, s.seq))
    timed_step = time_alternating({"train step (small config)": step}, steps=2, repeats=step_repeats, warmup=1)
    tokens = batch * s.seq
    rows = {
        name: {"ms_per_batch": 1e3 * t["median_s"], "tokens_per_s": tokens / t["median_s"], "all_s": t["all_s"]}
        for name, t in {**loaders, **timed_step}.items()
    }
    return rows, step


def checkpoint_rows(s: Sides, state, repeats: int) -> dict:
    """Row 4: async save + wait, and restore (onto the same sharding) of the full train state, each side in a
    fresh directory per repeat."""
    from dontstop_jax.engine.checkpoint import Checkpointer

    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    meta = {"phase": "bench", "parent": None}

    def save(where: Callable[[], str], into: list):
        def run() -> float:
            directory = where()
            ckpt = Checkpointer(directory)

            def work():
                ckpt.save(state, data_state={"epoch": 0, "batch_in_epoch": 1}, meta=meta)
                ckpt.wait()

            seconds = _timed(work)[0]
            ckpt.close()
            into.append(directory)
            return seconds

        return run

    def restore(written: list):
        def run() -> float:
            ckpt = Checkpointer(written[-1], read_only=True)
            seconds, out = _timed(lambda: jax.block_until_ready(ckpt.restore(abstract)[0]))
            ckpt.close()
            run.restored = out  # type: ignore[attr-defined]  # read by the caller after timing
            return seconds

        return run

    local: list[str] = []
    remote: list[str] = []
    fns = {
        "save, local directory": save(lambda: str(s.fresh("ckpt")), local),
        "save, gs://": save(lambda: f"gs://bkt/ckpt-{s.fresh('ckpt').name}", remote),
        "restore, local directory": restore(local),
        "restore, gs://": restore(remote),
    }
    times = alternate(fns, repeats)
    from dontstop_jax import files

    objects = {"local": len(files.walk(local[-1])), "gs": len(files.walk(remote[-1]))}
    for name in ("restore, local directory", "restore, gs://"):  # what came back is what was saved
        jax.tree_util.tree_map(
            np.testing.assert_array_equal, jax.device_get(fns[name].restored.params), jax.device_get(state.params)
        )
    return {
        "state_mb": nbytes / 2**20,
        "files": objects,
        "rows": {
            name: {"seconds": t["median_s"], "mb_per_s": nbytes / 2**20 / t["median_s"], "all_s": t["all_s"]}
            for name, t in times.items()
        },
    }


def ratio(rows: dict, remote: str, local: str, key: str = "seconds") -> float:
    """How many times longer the bucket side takes."""
    return rows[remote][key] / rows[local][key]


def tables(p: dict) -> list[str]:
    """The four tables (markdown), for the console and RESULTS.md."""
    a = p["args"]
    prep, first, load, ckpt = p["prepare"], p["first_read"], p["loader"], p["checkpoint"]
    prep_local = next(iter(prep.values()))["seconds"]
    out = [
        f"prepare, {p['corpus_mb']:.0f} MB in {FILES} line files, seq {a['seq']} ({p['tokens']:,} tokens):\n\n"
        + markdown_table(
            ["pipeline", "seconds", "tokens/s", "MB/s", "time vs local"],
            [
                [
                    n,
                    f"{r['seconds']:.2f}",
                    f"{r['tokens_per_s']:,.0f}",
                    f"{r['mb_per_s']:.1f}",
                    f"{r['seconds'] / prep_local:.2f}x",
                ]
                for n, r in prep.items()
            ],
        )
    ]
    stream = p["stream"]
    rows = stream["rows"]
    base = rows["local line file"]["seconds"]
    out.append(
        f"`iter_documents` (how prepare reads .gz and bucket files, line by line): the "
        f"first {stream['docs']:,} documents ({stream['mb']:.1f} MB) of one line file:\n\n"
        + markdown_table(
            ["source", "seconds", "documents/s", "MB/s", "time vs local"],
            [
                [
                    n,
                    f"{r['seconds']:.3f}",
                    f"{r['docs_per_s']:,.0f}",
                    f"{r['mb_per_s']:.1f}",
                    f"{r['seconds'] / base:,.1f}x",
                ]
                for n, r in rows.items()
            ],
        )
    )
    rows = first["rows"]
    base = next(iter(rows.values()))["seconds"]
    out.append(
        f"`prepare_corpus` once the corpus exists ({first['shard_mb']:.1f} MB of shards):\n\n"
        + markdown_table(
            ["host", "seconds", "shard MB/s", "time vs local"],
            [
                [n, f"{r['seconds']:.3f}", f"{r['shard_mb_per_s']:,.0f}", f"{r['seconds'] / base:.1f}x"]
                for n, r in rows.items()
            ],
        )
    )
    step = load["train step (small config)"]["tokens_per_s"]
    base = load["loader on the local prepared corpus"]["tokens_per_s"]
    out.append(
        f"Loader (dynamic masking, no prefetch) vs the small-config train step, batch {a['batch']}, "
        f"seq {a['seq']}:\n\n"
        + markdown_table(
            ["what", "ms/batch", "batches/s", "tokens/s", "vs local loader", "vs step consumption"],
            [
                [
                    n,
                    f"{r['ms_per_batch']:.2f}",
                    f"{1e3 / r['ms_per_batch']:,.1f}",
                    f"{r['tokens_per_s']:,.0f}",
                    f"{r['tokens_per_s'] / base:.2f}x" if n.startswith("loader") else "",
                    f"{r['tokens_per_s'] / step:,.1f}x",
                ]
                for n, r in load.items()
            ],
        )
    )
    rows = ckpt["rows"]
    out.append(
        f"Checkpointer, small model's full train state ({ckpt['state_mb']:.0f} MB: params + Adam moments; "
        f"{ckpt['files']['gs']} objects in the bucket, {ckpt['files']['local']} files locally):\n\n"
        + markdown_table(
            ["operation", "seconds", "MB/s", "time vs local"],
            [
                [
                    n,
                    f"{r['seconds']:.2f}",
                    f"{r['mb_per_s']:.0f}",
                    f"{r['seconds'] / rows[n.split(',')[0] + ', local directory']['seconds']:.2f}x",
                ]
                for n, r in rows.items()
            ],
        )
    )
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=32, help=f"corpus size, split into {FILES} line files")
    p.add_argument("--repeats", type=int, default=5, help="alternating repeats of each pair (after one warm-up)")
    p.add_argument("--step-repeats", type=int, default=2, help="repeats of 2 train steps")
    p.add_argument("--stream-docs", type=int, default=500, help="documents read by the iter_documents row")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128, help="block length of the prepared corpus and of the step")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    try:
        import gcp_storage_emulator  # noqa: F401
        import gcsfs  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"bench/storage.py needs gcsfs and gcp-storage-emulator (the test extra): {e}") from None
    if str(TESTS_DIR) not in sys.path:
        sys.path.append(str(TESTS_DIR))
    from gcs_emulator import gcs_emulator

    from dontstop_jax.files import CACHE_ENV

    work = Path(args.workdir or tempfile.mkdtemp(prefix="dontstop-bench-storage-"))
    work.mkdir(parents=True, exist_ok=True)
    saved_cache = os.environ.get(CACHE_ENV)
    t = time.time()
    try:
        with gcs_emulator(work / "gcs"):
            s = Sides(work, args.mb, args.seq)
            print(f"corpus and tokenizer ready ({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
            prep, gs_root = prepare_rows(s, args.repeats)
            stream = stream_rows(s, args.repeats, args.stream_docs)
            first, local_corpus, copy = first_read_rows(s, gs_root, args.repeats)
            load, step = loader_rows(s, local_corpus, copy, args.batch, args.repeats, args.step_repeats)
            ckpt = checkpoint_rows(s, step.state, args.repeats)
            tokens = local_corpus.manifest["total_tokens"]
    finally:
        if saved_cache is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = saved_cache
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    payload = {
        "bench": "storage",
        "args": vars(args),
        "corpus_mb": s.bytes / 2**20,
        "tokens": tokens,
        "prepare": prep,
        "stream": stream,
        "first_read": first,
        "loader": load,
        "checkpoint": ckpt,
        "note": NOTE,
        "seconds": time.time() - t,
    }
    names = list(prep)
    payload["ratios"] = {  # what each is: RATIOS
        "prepare": ratio(prep, names[1], names[0]),
        "stream": ratio(stream["rows"], "gs:// line file", "local line file"),
        "first_read": ratio(first["rows"], FRESH, "local cache: open and verify"),
        "loader_copy_vs_local": ratio(
            load, "loader on the corpus in gs://", "loader on the local prepared corpus", "tokens_per_s"
        ),
        "loader_vs_step": ratio(load, "loader on the corpus in gs://", "train step (small config)", "tokens_per_s"),
        "save": ratio(ckpt["rows"], "save, gs://", "save, local directory"),
        "restore": ratio(ckpt["rows"], "restore, gs://", "restore, local directory"),
    }
    print()
    print("\n\n".join(tables(payload)))
    print("\n" + "\n".join(f"- {RATIOS[name]}: {value:,.2f}x" for name, value in payload["ratios"].items()))
    print(f"\n{NOTE} ({payload['seconds']:.0f} s)")
    print(f"written: {write_json('storage', payload)}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
