"""The plan table (docs/results/plan-table.md): `dontstop plan` for the paper's recipes on three Cloud TPU slices.

Regenerate the whole table (after merging changes to the step; no dtype flag: plan computes in bfloat16, the
TPU default). `plan` compiles a few programs per row (the configured step, the fewest accumulation steps the
compiler accepts for each layout, and any estimate that leads), a few minutes each on a 2-core box:

    JAX_PLATFORMS=cpu PYTHONPATH=. nice -n 10 python bench/plan_table.py --minutes 40

Runs the real CLI once per (recipe, slice), each in its own process, reads its report, and prints one Markdown
row per plan: mesh, HBM per chip, roofline step time and what binds it, hours for the recipe's steps, estimated
MFU, and the plan `plan` chose (the fastest fitting one; the numbers are then its plan's). Roofline estimates from
the compiled HLO, not measurements. Needs libtpu but no TPU. `--only TEXT ...` redoes the rows whose recipe or
slice contains TEXT; `--minutes M` starts no row after M minutes (the rows not rerun keep their recorded numbers);
bench/plan_table.json keeps every row's command and full report. `--refresh` compiles each recorded row's chosen
plan again alone (its lever's flags and `plan --as-configured`: the ranking is not redone), for a change to what
plan counts; the row keeps its lever and records the refresh's command. A row's "fused attention" column is the
chosen plan again with attention dropout 0 and the splash kernel (plan prints it; a change from the recipe).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = Path(__file__).with_name("plan_table.json")
TOPOLOGIES = ("v4-32", "v5litepod-64", "v5p-64")  # 16 v4 chips, 64 v5e chips, 32 v5p chips
LARGE = [
    "--config.model.hidden_size=1024",
    "--config.model.num_hidden_layers=24",
    "--config.model.num_attention_heads=16",
    "--config.model.intermediate_size=4096",
]
# ChemProt's train split: 4,169 examples. TAPT packs its text into 512-token blocks; its size in tokens is an
# assumption (about 72 RoBERTa tokens a sentence), not a count. Fine-tuning's steps are 10 epochs of
# ceil(4169 / 16) batches: --tokens 4169 x 512 makes plan count exactly those (every batch at full length).
CHEMPROT_EXAMPLES, CHEMPROT_TAPT_TOKENS = 4169, 300_000
# Fine-tuning's batch of 16 cannot spread over more than 16 data shards: the rest of the slice goes to tensor.
FINETUNE_MESH = {"v4-32": "(-1,1,1)", "v5litepod-64": "(16,1,4)", "v5p-64": "(16,1,2)"}

# (recipe, config, overrides, corpus tokens for --tokens, slices, levers cell when plan names none)
RECIPES = [
    ("DAPT roberta-base", "configs/dapt.py:biomed", [], None, TOPOLOGIES, "none (recipe: accum 32)"),
    ("DAPT roberta-large", "configs/dapt.py:biomed", LARGE, None, TOPOLOGIES, "none (recipe: accum 32)"),
    (
        "TAPT ChemProt (base)",
        "configs/tapt.py:chemprot",
        [],
        CHEMPROT_TAPT_TOKENS,
        TOPOLOGIES,
        "none (recipe: accum 4)",
    ),
    (
        "fine-tune ChemProt (base)",
        "configs/finetune.py:chemprot",
        [],
        CHEMPROT_EXAMPLES * 512,
        TOPOLOGIES,
        "none; batch 16 = 16 data shards at most",
    ),
]


def command(config: str, topology: str, overrides: list[str], tokens: int | None) -> list[str]:
    args = ["plan", "--config", config, "--topology", topology, *overrides]
    return args + (["--tokens", str(tokens)] if tokens else [])


FUSED = "\nwith fused attention"  # where plan's report gives the chosen plan's twin without attention dropout


def _line(pattern: str, text: str) -> re.Match[str]:
    """The match of `pattern` in a plan report; a report without it (its format changed) is one clear error."""
    match = re.search(pattern, text)
    if match is None:
        raise SystemExit(f"bench.plan_table: no line matching {pattern!r} in the plan report")
    return match


def parse(report: str) -> dict:
    """The numbers of the plan `plan` chose (the configured one, or the fastest fitting lever's), and under
    "fused" those of its twin with attention dropout 0 (None where plan printed none)."""
    report, _, fused = report.partition(FUSED)
    chosen = re.search(r"\nchosen: (.+)", report)
    lever = chosen.group(1) if chosen and chosen.group(1) != "as configured" else None
    text = report[chosen.end() :] if chosen and lever else report.split("\nfitting plans")[0]
    twin = None
    if fused:
        numbers = _numbers(fused)
        twin = {k: numbers[k] for k in ("step_ms", "bound", "total_gib", "hours", "mfu")}
        twin["fits"] = "\ndoes not fit" not in fused
    return {
        "fits_as_configured": "\ndoes not fit" not in report,
        "lever": lever or ("none fits" if chosen is None else ""),
        **_numbers(text),
        "fused": twin,
    }


def _numbers(text: str) -> dict:
    """One plan's numbers, from the first plan in `text`."""
    head = _line(
        r"on \S+: (\d+) (\S+) chips.*; mesh data=(\d+) fsdp=(\d+) tensor=(\d+); batch (\d+) x (\d+) "
        r"tokens, accum (\d+), (\w+), remat (\w+)",
        text,
    )
    hbm = _line(
        r"HBM per chip: +([\d.]+) GiB state\+batch, ([\d.]+) GiB temporaries, ([\d.]+) GiB total of "
        r"(\d+) GiB",
        text,
    )
    step = _line(
        r"roofline step: +([\d.]+) ms, (\w+)-bound \(compute ([\d.]+) ms, HBM >= ([\d.]+) ms, "
        r"ICI ([\d.]+) ms\)",
        text,
    )
    hours = _line(r"wall clock: +([\d.]+) h for (\d+) steps", text)
    collectives = _line(r"collectives per chip per step: (.+)", text).group(1)
    predict = re.search(r"predict step: .* ([\d.]+) GiB total", text)
    rates = _line(r"throughput: +([\d,]+) tokens/s, ([\d,]+) per chip, ([\d,]+) per host; MFU (\d+)%", text)
    return {
        "tokens_per_s": int(rates.group(1).replace(",", "")),
        "tokens_per_s_chip": int(rates.group(2).replace(",", "")),
        "tokens_per_s_host": int(rates.group(3).replace(",", "")),
        "mfu": int(rates.group(4)) / 100,
        "chips": int(head.group(1)),
        "chip": head.group(2),
        "mesh": {"data": int(head.group(3)), "fsdp": int(head.group(4)), "tensor": int(head.group(5))},
        "batch": int(head.group(6)),
        "seq": int(head.group(7)),
        "accum": int(head.group(8)),
        "dtype": head.group(9),
        "remat": head.group(10),
        "state_gib": float(hbm.group(1)),
        "temp_gib": float(hbm.group(2)),
        "total_gib": float(hbm.group(3)),
        "hbm_gib": int(hbm.group(4)),
        "predict_gib": float(predict.group(1)) if predict else None,
        "step_ms": float(step.group(1)),
        "bound": step.group(2),
        "compute_ms": float(step.group(3)),
        "hbm_ms": float(step.group(4)),
        "ici_ms": float(step.group(5)),
        "hours": float(hours.group(1)),
        "steps": int(hours.group(2)),
        "collectives": collectives,
    }


def _plan(what: str, args: list[str]) -> str:
    """The report of `dontstop ARGS` (a plan), run in its own process."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)])),
    }
    done = subprocess.run(
        [sys.executable, "-m", "dontstop_jax", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    if done.returncode not in (0, 1) or "HBM per chip" not in done.stdout:
        raise SystemExit(f"{what}: exit {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}")
    return done.stdout


def run(recipe: str, config: str, topology: str, overrides: list[str], tokens: int | None, note: str) -> dict:
    args = command(config, topology, overrides, tokens)
    t = time.time()
    report = _plan(f"{recipe} on {topology}", args)
    return {
        "recipe": recipe,
        "topology": topology,
        "command": "dontstop " + " ".join(args),
        "compile_s": round(time.time() - t),
        "note": note,
        **parse(report),
        "report": report,
    }


def refresh(r: dict) -> dict:
    """Row `r` with its recorded chosen plan compiled again alone (`plan --as-configured` with its lever's flags:
    one or two compiles, no ranking), after a change to what plan counts; its lever and command stay."""
    args = shlex.split(r["command"])[1:] + shlex.split(r["lever"] if r["lever"].startswith("--") else "")
    args.append("--as-configured")
    t = time.time()
    report = _plan(f"{r['recipe']} on {r['topology']}", args)
    return {
        **r,
        **{k: v for k, v in parse(report).items() if k not in ("fits_as_configured", "lever")},
        "refreshed": {"command": "dontstop " + shlex.join(args), "compile_s": round(time.time() - t)},
        "report": report,
    }


def _took(step_ms: float, steps: int) -> str:
    seconds = step_ms * steps / 1000
    return (
        f"{seconds / 3600:.2f} h"
        if seconds >= 360
        else f"{seconds / 60:.1f} min"
        if seconds >= 60
        else f"{seconds:.0f} s"
    )


def row(r: dict) -> str:
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1 or k == "data")
    steps = f"{r['steps'] / 1000:g}K" if r["steps"] >= 1000 else str(r["steps"])
    levers = r["lever"].replace("--config.", "") if r["lever"] else r["note"]
    mfu = f"{r['mfu']:.0%}" if "mfu" in r else "not yet rerun"  # a row from before plan estimated MFU
    twin = r.get("fused", "not yet planned")  # a row from before plan gave the fused-attention twin
    if isinstance(twin, dict):
        twin = f"{twin['step_ms']:.1f} ms, {_took(twin['step_ms'], r['steps'])}, {twin['mfu']:.0%}" + (
            "" if twin["fits"] else " (does not fit)"
        )
    return (
        f"| {r['recipe']} | {r['topology']} | {mesh} | {r['total_gib']:.2f} of {r['hbm_gib']} | "
        f"{r['step_ms']:.1f} ms, {r['bound']} | {_took(r['step_ms'], r['steps'])} ({steps} steps) | {mfu} | "
        f"{twin or '-'} | {levers} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=[], help="plan only rows whose recipe or slice contains TEXT")
    parser.add_argument("--topologies", nargs="*", default=list(TOPOLOGIES))
    parser.add_argument("--minutes", type=float, default=None, help="start no row after this many minutes")
    parser.add_argument(
        "--refresh", action="store_true", help="compile each recorded row's chosen plan again alone (see refresh)"
    )
    opts = parser.parse_args()
    started = time.time()
    known = {recipe for recipe, *_ in RECIPES}
    rows = (
        {(r["recipe"], r["topology"]): r for r in json.loads(OUT.read_text())["rows"] if r["recipe"] in known}
        if OUT.exists()
        else {}
    )
    for recipe, config, overrides, tokens, topologies, note in RECIPES:
        for topology in (t for t in topologies if t in opts.topologies):
            if opts.only and not any(t in f"{recipe} {topology}" for t in opts.only):
                continue
            if opts.minutes is not None and time.time() - started > 60 * opts.minutes:
                print(f"{recipe} on {topology}: not rerun (--minutes {opts.minutes:g})", file=sys.stderr)
                continue
            if opts.refresh:
                if (recipe, topology) not in rows:
                    continue
                r = refresh(rows[recipe, topology])
            else:
                mesh = FINETUNE_MESH[topology] if config.startswith("configs/finetune.py") else "(-1,1,1)"
                r = run(recipe, config, topology, overrides + [f"--config.mesh.shape={mesh}"], tokens, note)
            rows[recipe, topology] = r
            print(f"{row(r)}  ({r.get('refreshed', r)['compile_s']} s)", file=sys.stderr, flush=True)
            OUT.write_text(json.dumps({"rows": list(rows.values())}, indent=1) + "\n")
    order = {(recipe, t): i for i, (recipe, t) in enumerate((x[0], t) for x in RECIPES for t in x[4])}
    print(
        "| recipe | slice | mesh | GiB per chip | step (roofline), bound | run (roofline) | MFU (est.) "
        "| fused attention: step, run, MFU | levers |"
    )
    print("|:--|:--|:--|--:|--:|--:|--:|--:|:--|")
    for r in sorted(rows.values(), key=lambda r: order.get((r["recipe"], r["topology"]), len(order))):
        print(row(r))
    print(f"\n{len(rows)} plans, {sum(r['compile_s'] for r in rows.values())} s of compiling", file=sys.stderr)


if __name__ == "__main__":
    main()
