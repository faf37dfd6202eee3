"""Data pipeline: prepare speed vs the `run_mlm.py` recipe, loader vs step throughput and vs a TPU host's
consumption, prepare's peak memory.

1. prepare (tokenize + pack into 512-token blocks) vs transformers' examples/pytorch/language-modeling/run_mlm.py
   recipe (`datasets.load_dataset("text")` -> `map(tokenize, batched, num_proc=cores)` -> `map(group_texts)`),
   same generated corpus, same byte-level BPE tokenizer, alternating, median of repeats.
2. MLMLoader batches/s (dynamic masking, whole-word too) vs the tokens/s our small-config train step consumes,
   and the end-to-end loop (loader -> device -> step) with and without the loader's background prefetch.
3. (`--loader-host`, alone) The loader's tokens/s on one core at sequence 512 (today's counter-based masking vs the
   per-row generators it had before, bench/per_row_loader.py, alternating) beside the tokens/s one host of
   `dontstop plan`'s roberta-base DAPT run on v5p-64 consumes (bench/plan_table.json: global tokens per step /
   roofline step time / hosts; the faster of the chosen plan and its fused-attention twin); the target is 2x.
4. Peak RSS of a `prepare_corpus` subprocess on a >= 2 GB generated corpus (streamed; must stay bounded).

    python -m bench.data_pipeline                  # ~64 MB ratio corpus, 2 GB RSS corpus
    python -m bench.data_pipeline --rss-gb 0       # skip the 2 GB part
    python -m bench.data_pipeline --loader-host    # part 3 only (a 64 MB corpus)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import BENCH_DIR, markdown_table, time_alternating, write_json

SEQ = 512
PLAN_ROW = ("DAPT roberta-base", "v5p-64")  # (recipe, topology) of bench/plan_table.json the loader must feed
HOST_RATE_TARGET = 2.0  # the loader on one core must reach this multiple of a host's consumption


def write_corpus(path: Path, megabytes: float, seed: int = 0, vocab: int = 30_000) -> int:
    """One document per line: Zipf-distributed pseudo-words, 20-400 words per document. Returns bytes written."""
    rng = np.random.default_rng(seed)
    syllables = np.array(["ka", "to", "ri", "mu", "sen", "lo", "pa", "dri", "vo", "qui", "ne", "sta", "bel", "or"])
    lengths = rng.integers(1, 5, vocab)
    words = np.array(["".join(rng.choice(syllables, n)) for n in lengths])
    target, written = int(megabytes * 2**20), 0
    with open(path, "w") as f:
        while written < target:
            ids = np.minimum(rng.zipf(1.2, 200_000), vocab) - 1
            cuts = np.cumsum(rng.integers(20, 400, 2000))
            docs = [" ".join(words[d]) for d in np.split(ids, cuts[cuts < len(ids)]) if len(d)]
            text = "\n".join(docs) + "\n"
            f.write(text)
            written += len(text)
    return written


def make_tokenizer(corpus: Path, out: Path) -> Path:
    from dontstop_jax.synthetic.tokenizer import save_tokenizer, train_bpe

    sample = out.with_suffix(".sample.txt")
    with open(corpus) as src, open(sample, "w") as dst:
        dst.writelines(itertools.islice(src, 5000))
    save_tokenizer(train_bpe([sample], vocab_size=8000), out, probe_texts=["kato rimu"])
    return out


def ours_prepare(corpus: Path, tokenizer: Path, work: Path):
    from dontstop_jax.data import prepare_corpus

    def run(n: int) -> None:
        for _ in range(n):
            shutil.rmtree(work / "ours", ignore_errors=True)
            prepared = prepare_corpus([str(corpus)], tokenizer, work / "ours", max_seq_length=SEQ)
        run.blocks = prepared.num_blocks  # type: ignore[attr-defined]  # read by the caller after timing

    return run


def run_mlm_recipe(corpus: Path, tokenizer: Path, work: Path, num_proc: int):
    """What run_mlm.py does without --line_by_line: tokenize every line, concatenate, cut into SEQ blocks."""
    import datasets
    from transformers import PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer))

    def tokenize(examples):
        return tok(examples["text"], return_special_tokens_mask=True)

    def group_texts(examples):
        joined = {k: list(itertools.chain(*examples[k])) for k in examples}
        total = len(joined["input_ids"]) // SEQ * SEQ
        return {k: [t[i : i + SEQ] for i in range(0, total, SEQ)] for k, t in joined.items()}

    def run(n: int) -> None:
        for _ in range(n):
            cache = work / "hf_cache"
            shutil.rmtree(cache, ignore_errors=True)
            raw = datasets.load_dataset("text", data_files={"train": str(corpus)}, cache_dir=str(cache))["train"]
            tokenized = raw.map(tokenize, batched=True, num_proc=num_proc, remove_columns=["text"])
            grouped = tokenized.map(group_texts, batched=True, num_proc=num_proc)
        run.blocks = len(grouped)  # type: ignore[attr-defined]  # read by the caller after timing

    return run


def prepare_ratio(corpus: Path, tokenizer: Path, work: Path, repeats: int) -> dict:
    cores = len(os.sched_getaffinity(0))
    fns = {
        "ours: prepare_corpus": ours_prepare(corpus, tokenizer, work),
        f"run_mlm.py recipe (datasets.map, num_proc={cores})": run_mlm_recipe(corpus, tokenizer, work, cores),
    }
    times = time_alternating(fns, steps=1, repeats=repeats, warmup=1)
    mb = corpus.stat().st_size / 2**20
    return {
        name: {
            "seconds": t["median_s"],
            "mb_per_s": mb / t["median_s"],
            "blocks": fns[name].blocks,
            "all_s": t["all_s"],
        }
        for name, t in times.items()
    }


def loader_vs_step(corpus: Path, tokenizer: Path, work: Path, batch: int, seq: int, repeats: int) -> dict:
    """Loader tokens/s (alone, plain and whole-word) vs the small-config step's consumption, and the real loop."""
    from bench.mlm_step import MODELS, OurStep, make_batch
    from dontstop_jax.data import MLMLoader, load_tokenizer, prepare_corpus, special_ids, word_start_table
    from dontstop_jax.engine import to_global

    prepared = prepare_corpus([str(corpus)], tokenizer, work / "loader", max_seq_length=seq)
    tok = load_tokenizer(tokenizer)
    cfg = MODELS["small"].replace(vocab_size=len(tok))

    def loader(prefetch: int, whole_word: bool = False) -> MLMLoader:
        return MLMLoader(
            prepared,
            batch,
            0,
            special_ids(tok),
            len(tok),
            whole_word=whole_word,
            prefetch=prefetch,
            word_starts_table=word_start_table(tok) if whole_word else None,
        )

    def consume(it):
        def run(n):
            for _ in range(n):
                next(it)

        return run

    step = OurStep(cfg, make_batch(cfg, batch, seq))

    def loop(prefetch: int):
        """The pretrain loop's data path: loader -> to_global -> step (step state kept by `ours`)."""
        it, run_state = loader(prefetch), OurStep(cfg, make_batch(cfg, batch, seq))

        def run(n):
            for _ in range(n):
                run_state.step_with(to_global(next(it), run_state.mesh))
            run_state.sync()

        return run

    fns = {
        "loader (dynamic masking, no prefetch)": consume(loader(0)),
        "loader (whole-word masking, no prefetch)": consume(loader(0, whole_word=True)),
        "train step (small config)": step,
        "loop: loader + step, prefetch=0": loop(0),
        "loop: loader + step, prefetch=2 (default)": loop(2),
    }
    times = time_alternating(fns, steps=5, repeats=repeats)
    return {
        name: {"ms_per_batch": 1e3 * t["median_s"], "tokens_per_s": batch * seq / t["median_s"]}
        for name, t in times.items()
    }


def plan_host_rate(path: Path = BENCH_DIR / "plan_table.json") -> dict:
    """Tokens/s one host consumes in the plan of PLAN_ROW, or in its fused-attention twin where that fits and is
    faster (the loader must keep up with either): batch x seq / roofline step time / hosts, where hosts = chips /
    chips per host of the topology (engine/topology.py, what `plan` compiles for)."""
    from dontstop_jax.engine.topology import parse

    row = next(r for r in json.loads(path.read_text())["rows"] if (r["recipe"], r["topology"]) == PLAN_ROW)
    hosts = row["chips"] // math.prod(parse(row["topology"])[2])
    twin = row.get("fused") or {}
    fused = bool(twin.get("fits")) and twin["step_ms"] < row["step_ms"]
    step_ms = twin["step_ms"] if fused else row["step_ms"]
    return {
        "recipe": row["recipe"] + (" with fused attention" if fused else ""),
        "topology": row["topology"],
        "command": row["command"],
        "hosts": hosts,
        "host_batch": row["batch"] // hosts,
        "seq": row["seq"],
        "step_ms": step_ms,
        "tokens_per_s": row["batch"] * row["seq"] / (step_ms / 1e3) / hosts,
    }


def loader_vs_host(corpus: Path, tokenizer: Path, work: Path, repeats: int) -> dict:
    """Loader tokens/s on one core (this thread pinned to one CPU), old per-row vs counter-based masking, plain and
    whole-word, building one host's rows of the plan's batch at its sequence length."""
    from bench.per_row_loader import PerRowLoader
    from dontstop_jax.data import MLMLoader, load_tokenizer, prepare_corpus, special_ids, word_start_table

    host = plan_host_rate()
    prepared = prepare_corpus([str(corpus)], tokenizer, work / "loader_host", max_seq_length=host["seq"])
    tok = load_tokenizer(tokenizer)
    table = word_start_table(tok)

    def consume(cls, whole_word: bool):
        it = cls(
            prepared,
            host["host_batch"],
            0,
            special_ids(tok),
            len(tok),
            whole_word=whole_word,
            prefetch=0,
            word_starts_table=table if whole_word else None,
        )

        def run(n):
            for _ in range(n):
                next(it)

        return run

    fns = {
        f"{name}, {kind}": consume(cls, whole_word)
        for kind, whole_word in (("dynamic", False), ("whole-word", True))
        for name, cls in (("per-row generators (before)", PerRowLoader), ("counter-based (now)", MLMLoader))
    }
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})  # this thread only: one core, as one of a host's loader threads would get
    try:
        cpu = time_alternating(fns, steps=5, repeats=repeats, clock=time.thread_time)
        wall = time_alternating(fns, steps=5, repeats=repeats, warmup=0)
    finally:
        os.sched_setaffinity(0, cores)
    tokens = host["host_batch"] * host["seq"]
    rows = {
        name: {
            "cpu_ms_per_batch": 1e3 * cpu[name]["median_s"],
            "tokens_per_s": tokens / cpu[name]["median_s"],
            "wall_ms_per_batch": 1e3 * wall[name]["median_s"],
            "wall_tokens_per_s": tokens / wall[name]["median_s"],
        }
        for name in fns
    }
    for r in rows.values():
        r["vs_host"] = r["tokens_per_s"] / host["tokens_per_s"]
    return {"plan": host, "rows": rows, "target": HOST_RATE_TARGET}


def host_table(result: dict) -> str:
    """Markdown: the loader rows beside the plan's per-host rate, with the speed-up over the per-row loader."""
    host, rows = result["plan"], result["rows"]
    before = {
        kind: r["tokens_per_s"]
        for name, r in rows.items()
        if name.startswith("per-row")
        for kind in [name.split(", ")[1]]
    }
    table = [
        [
            name,
            f"{r['cpu_ms_per_batch']:.1f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['tokens_per_s'] / before[name.split(', ')[1]]:.2f}x",
            f"{r['vs_host']:.2f}x",
            "yes" if r["vs_host"] >= result["target"] else "no",
            f"{r['wall_tokens_per_s']:,.0f}",
        ]
        for name, r in rows.items()
    ]
    return (
        f"Loader on one core, {host['host_batch']} rows x {host['seq']} tokens (one host's share of batch "
        f"{host['host_batch'] * host['hosts']}) vs what one of the {host['hosts']} hosts of `{host['command']}` "
        f"{'(its fused-attention twin) ' if 'fused' in host['recipe'] else ''}consumes: "
        f"{host['tokens_per_s']:,.0f} tokens/s ({host['step_ms']} ms roofline step, "
        f"bench/plan_table.json); target {result['target']:g}x. Per core = per second of the loading thread's "
        "CPU time (pinned to one core; other jobs on the box do not count), wall-clock rate beside it:\n\n"
        + markdown_table(
            [
                "loader",
                "CPU ms/batch",
                "tokens/s per core",
                "vs per-row",
                "vs host consumption",
                f">= {result['target']:g}x",
                "wall tokens/s",
            ],
            table,
        )
    )


def _status_mb(pid: int | str, field: str) -> float:
    """A `VmRSS`/`VmHWM` line of /proc/<pid>/status in MB (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024
    except (OSError, StopIteration):
        return 0.0


def _children() -> list[str]:
    pids = []
    for task in Path("/proc/self/task").iterdir():
        try:
            pids += (task / "children").read_text().split()
        except OSError:
            pass
    return pids


def measure_prepare(corpus: str, tokenizer: str, out: str) -> None:
    """Run prepare_corpus in this (fresh) process and print JSON with its time and memory.

    Peak memory is read from the kernel's high-water mark of this process (`VmHWM`) plus the resident memory
    of its encoding workers, sampled every 50 ms (the largest sum of parent + workers seen). Not
    `getrusage().ru_maxrss`: Linux carries it over from the parent through fork and exec, so a child of a
    9 GB benchmark process reports 9 GB before doing anything.
    """
    import threading

    from dontstop_jax.data import prepare_corpus

    peak = {"total": 0.0, "workers": 0.0}
    done = threading.Event()

    def sample():
        while not done.wait(0.05):
            workers = [_status_mb(pid, "VmRSS") for pid in _children()]
            peak["workers"] = max([peak["workers"], *workers])
            peak["total"] = max(peak["total"], _status_mb("self", "VmRSS") + sum(workers))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.time()
    prepared = prepare_corpus([corpus], tokenizer, out, max_seq_length=SEQ)
    seconds = time.time() - t
    done.set()
    sampler.join()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "blocks": prepared.num_blocks,
                "peak_rss_mb": _status_mb("self", "VmHWM"),
                "worker_peak_rss_mb": peak["workers"],
                "total_peak_rss_mb": peak["total"],
            }
        )
    )


def prepare_peak_rss(work: Path, gigabytes: float, tokenizer: Path) -> dict:
    big = work / "big.txt"
    t = time.time()
    size = write_corpus(big, gigabytes * 1024, seed=1)
    generated_s = time.time() - t
    from dontstop_jax.data import parse_source
    from dontstop_jax.data.prepare import default_workers

    workers = default_workers([parse_source(str(big))])  # what prepare_corpus uses
    code = (
        f"from bench.data_pipeline import measure_prepare; "
        f"measure_prepare({str(big)!r}, {str(tokenizer)!r}, {str(work / 'big_prepared')!r})"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    big.unlink()
    return {
        "corpus_gb": size / 2**30,
        "generate_s": generated_s,
        **result,
        "workers": workers,
        "mb_per_s": size / 2**20 / result["seconds"],
    }


def rss_line(rss: dict) -> str:
    return (
        f"prepare on {rss['corpus_gb']:.2f} GB of generated text: {rss['seconds']:.0f} s ({rss['mb_per_s']:.1f} MB/s), "
        f"{rss['blocks']:,} blocks; peak memory {rss['total_peak_rss_mb']:.0f} MB in all (main process "
        f"{rss['peak_rss_mb']:.0f} MB, {rss['workers']} encoding worker(s) of at most "
        f"{rss['worker_peak_rss_mb']:.0f} MB each)"
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=64, help="corpus size for the prepare ratio")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rss-gb", type=float, default=2.0, help="corpus size for the peak-RSS run (0 skips it)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--loader-host", action="store_true", help="only the loader vs a TPU host's consumption")
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dontstop-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus = work / "corpus.txt"
        write_corpus(corpus, args.mb)
        tokenizer = make_tokenizer(corpus, work / "tokenizer")
        if args.loader_host:
            host = loader_vs_host(corpus, tokenizer, work, args.repeats)
        else:
            prep = prepare_ratio(corpus, tokenizer, work, args.repeats)
            load = loader_vs_step(corpus, tokenizer, work, args.batch, args.seq, args.repeats)
            rss = prepare_peak_rss(work, args.rss_gb, tokenizer) if args.rss_gb > 0 else None
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.loader_host:
        print(f"\n{host_table(host)}")
        payload = {"bench": "loader_host", "args": vars(args), "loader_host": host}
        print(f"written: {write_json('loader_host', payload)}", file=sys.stderr)
        return payload
    ours_s = prep["ours: prepare_corpus"]["seconds"]
    print(f"\nprepare, {args.mb:.0f} MB corpus, seq {SEQ}")
    print(
        markdown_table(
            ["pipeline", "seconds", "MB/s", "blocks", "time / ours"],
            [
                [n, f"{r['seconds']:.1f}", f"{r['mb_per_s']:.2f}", r["blocks"], f"{r['seconds'] / ours_s:.2f}x"]
                for n, r in prep.items()
            ],
        )
    )
    step_tps = load["train step (small config)"]["tokens_per_s"]
    print(f"\nloader vs train step, batch {args.batch}, seq {args.seq}")
    print(
        markdown_table(
            ["what", "ms/batch", "tokens/s", "vs step consumption"],
            [
                [n, f"{r['ms_per_batch']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / step_tps:.1f}x"]
                for n, r in load.items()
            ],
        )
    )
    if rss:
        print(f"\n{rss_line(rss)}")
    payload = {"bench": "data_pipeline", "args": vars(args), "prepare": prep, "loader": load, "prepare_rss": rss}
    print(f"written: {write_json('data_pipeline', payload)}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
