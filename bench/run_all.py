"""Run every benchmark with its recorded settings and rewrite bench/RESULTS.md from the fresh numbers.

    python -m bench.run_all              # CPU suite (~27 min on 2 cores); on a GPU host it runs the GPU rows
    python -m bench.run_all --quick      # smaller shapes, a smoke run of the whole chain (~8 min)

Each script also runs alone (see its docstring) and writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

from bench import classify_step, data_pipeline, mlm_step, prepare_hosts, storage
from bench.common import BENCH_DIR, gpu_section, machine, markdown_table, with_gpu_section

# (name, script, arguments, quick arguments). MLM rows: the CPU shapes and roberta-base.
CPU_RUNS = [
    (
        "mlm small seq128",
        mlm_step,
        "--model small --seq 128 --batch 32 --levers",
        "--model small --seq 64 --batch 8 --levers --repeats 2",
    ),
    (
        "mlm base seq128",
        mlm_step,
        "--model base --seq 128 --batch 8 --steps 2 --repeats 3",
        "--model base --seq 64 --batch 2 --steps 1 --repeats 2",
    ),
    (
        "mlm base seq512",
        mlm_step,
        "--model base --seq 512 --batch 2 --steps 2 --repeats 3",
        "--model base --seq 128 --batch 1 --steps 1 --repeats 2",
    ),
    ("classification", classify_step, "", "--seq 32 --batch 8 --examples 64 --max-len 128 --repeats 1 --steps 1"),
    (
        "classification parts",
        classify_step,
        "--breakdown --repeats 5",
        "--breakdown --seq 32 --batch 8 --repeats 1 --steps 1",
    ),
    ("data pipeline", data_pipeline, "", "--mb 4 --repeats 1 --rss-gb 0.05 --batch 8 --seq 64"),
    ("loader per core", data_pipeline, "--loader-host --repeats 5", "--loader-host --mb 4 --repeats 1"),
    ("storage", storage, "", "--mb 4 --repeats 1 --step-repeats 1 --stream-docs 100 --batch 8 --seq 64"),
]
GPU_RUNS = [
    (
        "mlm base seq512 bf16",
        mlm_step,
        "--model base --seq 512 --batch 64 --dtype bfloat16 --levers --steps 5",
        "--model base --seq 512 --batch 8 --dtype bfloat16 --steps 2 --repeats 2",
    ),
    (
        "mlm base seq512 bf16, no attention dropout",
        mlm_step,
        "--model base --seq 512 --batch 64 --dtype bfloat16 --attention-dropout 0 --steps 5",
        "--model base --seq 512 --batch 8 --dtype bfloat16 --attention-dropout 0 --steps 2 --repeats 2",
    ),
]

# What each lever was expected to do before it was measured (the measured outcome sits beside it).
PREDICTIONS = {
    "logits at all positions": "masked-only logits skip the vocabulary projection for 85% of positions: "
    "the LM head dominates a small model, so >2x slower without it on CPU",
    "no attention dropout (fused dot_product_attention)": "on CPU little change (XLA fuses either way); on GPU the "
    "cuDNN flash kernel needs no dropout and is much faster",
    "no donation": "no speed change on CPU (saves a copy of params + Adam state in memory, see memory.json)",
    "host sync every step": "small on CPU (the step dominates); on GPU it leaves the device idle between steps",
    "bfloat16 compute": "slower on CPU (no bf16 matmul units, converts); ~2x faster on GPU tensor cores",
    "float32 compute": "on GPU, ~2x slower than bf16",
}


def mlm_section(name: str, p: dict) -> str:
    a = p["args"]
    rows = []
    base = next(r for r in p["results"] if r["name"] == "ours (default)")
    for r in p["results"]:
        outcome = f"{r['ours_speedup']:.2f}x our default's time"
        rows.append(
            [
                r["name"],
                f"{r['median_s'] * 1e3:.1f}",
                f"{r['tokens_per_s']:,.0f}",
                outcome,
                f"{100 * r['mfu']:.1f}%" if "mfu" in r else "",
                PREDICTIONS.get(r["name"], ""),
            ]
        )
    hf = next((r for r in p["results"] if r["name"].startswith("transformers")), None)
    ratio = f"**ours / transformers tokens/s = {hf['median_s'] / base['median_s']:.2f}x**. " if hf else ""
    return (
        f"### {name}: {a['model']}, seq {a['seq']}, batch {a['batch']}, {a['dtype']}\n\n{ratio}"
        f"Matmul peak measured in the same run: {p['matmul_peak_flops'] / 1e12:.3f} TFLOP/s; model FLOPs per step "
        f"{p['model_flops_per_step'] / 1e12:.3f} T.\n\n"
        + markdown_table(["step", "ms/step", "tokens/s", "time vs ours", "MFU", "prediction (before measuring)"], rows)
    )


def classify_section(p: dict) -> str:
    a = p["args"]
    step = p["step"]
    ours = step["ours"]
    rows = [[n, f"{1e3 * t:.1f}", f"{a['batch'] * a['seq'] / t:,.0f}", f"{t / ours:.2f}x"] for n, t in step.items()]
    epoch = p["epoch"]
    base = epoch["ours, length buckets (default)"]
    erows = [[n, f"{t:.1f}", f"{p['useful_tokens'] / t:,.0f}", f"{t / base:.2f}x"] for n, t in epoch.items()]
    return (
        f"### Classification step: {a['model']}, seq {a['seq']}, batch {a['batch']}\n\n"
        + markdown_table(["step", "ms/step", "tokens/s", "time vs ours"], rows)
        + f"\n\nOne epoch of {a['examples']} examples with task-like lengths (log-normal, median 40, max "
        f"{a['max_len']}); prediction: bucketing roughly halves the epoch time vs padding to the maximum.\n\n"
        + markdown_table(["batching", "s/epoch", "useful tokens/s", "time vs bucketed"], erows)
    )


def data_section(p: dict) -> str:
    prep = p["prepare"]
    ours = prep["ours: prepare_corpus"]["seconds"]
    rows = [
        [n, f"{r['seconds']:.1f}", f"{r['mb_per_s']:.2f}", r["blocks"], f"{r['seconds'] / ours:.2f}x"]
        for n, r in prep.items()
    ]
    load = p["loader"]
    step = load["train step (small config)"]["tokens_per_s"]
    lrows = [
        [n, f"{r['ms_per_batch']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / step:.1f}x"]
        for n, r in load.items()
    ]
    out = (
        f"### Data pipeline\n\nprepare on a {p['args']['mb']:.0f} MB generated corpus (512-token blocks):\n\n"
        + markdown_table(["pipeline", "seconds", "MB/s", "blocks", "time vs ours"], rows)
        + f"\n\nLoader vs the small-config train step (batch {p['args']['batch']}, seq {p['args']['seq']}); "
        "prediction: the loader (numpy masking in a background thread) is >10x faster than the step, and "
        "prefetch hides it completely:\n\n"
        + markdown_table(["what", "ms/batch", "tokens/s", "vs step consumption"], lrows)
    )
    if rss := p.get("prepare_rss"):
        out += f"\n\n{data_pipeline.rss_line(rss)}."
    return out


def classify_parts_section(p: dict) -> str:
    a, t = p["args"], p["parts"]
    parts = [n.removeprefix("ours ") for n in t if n.startswith("ours ")]
    rows = [
        [
            part,
            f"{1e3 * t['ours ' + part]:.1f}",
            f"{1e3 * t['transformers ' + part]:.1f}",
            f"{t['transformers ' + part] / t['ours ' + part]:.2f}x",
        ]
        for part in parts
    ]
    return (
        f"Where the fixed-shape difference comes from ({a['model']}, seq {a['seq']}, batch {a['batch']}, both "
        "sides without dropout, alternating):\n\n"
        + markdown_table(["part", "ours ms", "transformers ms", "transformers time / ours"], rows)
    )


def storage_section(p: dict) -> str:
    r = p["ratios"]
    return (
        "### Storage: gs:// (local GCS emulator) vs local disk\n\n"
        f"{p['note']} Bucket time / local time: prepare {r['prepare']:.2f}x (documents streamed in-process "
        f"{r['stream']:,.0f}x), a fresh host's first read "
        f"{r['first_read']:.1f}x, checkpoint save {r['save']:.2f}x, restore {r['restore']:.2f}x. The loader on "
        f"the corpus read in place in the bucket runs at {r['loader_copy_vs_local']:.2f}x the local one's tokens/s, "
        f"{r['loader_vs_step']:,.0f}x what the train step consumes.\n\n" + "\n\n".join(storage.tables(p))
    )


def memory_section() -> str:
    path = BENCH_DIR / "memory.json"
    if not path.exists():
        return ""
    m = json.loads(path.read_text())
    models = list(dict.fromkeys(r["model"] for r in m["results"]))
    levers = list(dict.fromkeys(r["lever"] for r in m["results"]))
    rows = [
        [lever]
        + [
            f"{next(r['peak_gib'] for r in m['results'] if r['model'] == mo and r['lever'] == lever):.2f}"
            for mo in models
        ]
        for lever in levers
    ]
    return (
        f"### Memory per device (python bench/memory.py; XLA's compiled-program accounting, seq {m['seq']}, "
        f"global batch {m['global_batch']}, {m['devices']} devices)\n\n"
        + markdown_table(["lever (cumulative)"] + [f"{mo} GiB" for mo in models], rows)
    )


def prepare_hosts_section() -> str:
    """bench/prepare_hosts.py's last runs (not part of run_all: it needs the emulator and several processes)."""
    records = [json.loads(p.read_text()) for p in sorted((BENCH_DIR / "results").glob("prepare_hosts_*.json"))]
    return "".join(
        f"{'### Preparation by every host (python -m bench.prepare_hosts)' if i == 0 else ''}\n\n"
        f"{r['date']}. {prepare_hosts.table(r)}"
        for i, r in enumerate(records)
    ).strip()


def describe_machine(info: dict) -> str:
    return (
        f"{info['cpu']}, {info['cores']} cores, backend {info['backend']} ({info['device']}); jax {info['jax']}, "
        f"torch {info.get('torch', '-')}, transformers {info.get('transformers', '-')}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default=None, help="comma-separated run names to (re)run; others are read from JSON")
    p.add_argument("--report-only", action="store_true", help="run nothing: rewrite RESULTS.md from the JSON")
    args = p.parse_args(argv)
    runs = GPU_RUNS if jax.default_backend() == "gpu" else CPU_RUNS
    state_path = BENCH_DIR / "results" / "run_all.json"
    previous = json.loads(state_path.read_text()) if state_path.exists() else {}
    payloads, commands = previous.get("payloads", {}), previous.get("commands", {})
    machines = previous.get("machines", {})  # each run's machine: an --only run may be on another box
    for name, script, full, quick in runs:
        if args.report_only or (args.only and name not in args.only.split(",")):
            continue
        argv_run = (quick if args.quick else full).split()
        print(
            f"== {name}: python -m bench.{script.__name__.split('.')[-1]} {' '.join(argv_run)}",
            file=sys.stderr,
            flush=True,
        )
        t = time.time()
        payloads[name] = script.main(argv_run)
        commands[name] = f"python -m bench.{script.__name__.split('.')[-1]} {' '.join(argv_run)}"
        machines[name] = machine()
        print(f"   ({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
    state_path.parent.mkdir(exist_ok=True)
    tmp = state_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"payloads": payloads, "commands": commands, "machines": machines}, indent=1))
    os.replace(tmp, state_path)

    sections = []
    for name, payload in payloads.items():
        if payload["bench"] == "mlm_step":
            sections.append(mlm_section(name, payload))
        elif payload["bench"] == "classify_step":
            sections.append(classify_section(payload))
        elif payload["bench"] == "classify_breakdown":
            sections.append(classify_parts_section(payload))
        elif payload["bench"] == "data_pipeline":
            sections.append(data_section(payload))
        elif payload["bench"] == "loader_host":
            sections.append(f"### Loader vs a TPU host\n\n{data_pipeline.host_table(payload['loader_host'])}")
        elif payload["bench"] == "storage":
            sections.append(storage_section(payload))
    sections.append(prepare_hosts_section())
    sections.append(memory_section())
    by_machine: dict[str, list[str]] = {}
    for name in payloads:
        by_machine.setdefault(describe_machine(machines.get(name) or machine()), []).append(name)
    where = (
        f"Machine: {next(iter(by_machine))}"
        if len(by_machine) == 1
        else "Machines: " + "; ".join(f"{m} ({', '.join(names)})" for m, names in by_machine.items())
    )
    header = (
        f"# Benchmark results\n\nRegenerated by `python -m bench.run_all` on {time.strftime('%Y-%m-%d')}"
        f"{' (--quick shapes)' if args.quick else ''}. {where}. Every ratio is measured in one process, alternating "
        "the two sides repeat by repeat after warm-up (medians).\n\nCommands:\n\n"
        + "\n".join(f"- {n}: `{c}`" for n, c in commands.items())
        + "\n\n"
    )
    notes = (BENCH_DIR / "NOTES.md").read_text() if (BENCH_DIR / "NOTES.md").exists() else ""
    out = BENCH_DIR / "RESULTS.md"
    text = header + notes + "\n\n".join(s for s in sections if s) + "\n"
    if gpu := gpu_section(out.read_text() if out.exists() else ""):  # bench/gpu.sh's rows survive a CPU rerun
        text = with_gpu_section(text, gpu)
    out.write_text(text)
    print(f"written: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
