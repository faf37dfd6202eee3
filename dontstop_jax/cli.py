"""The `dontstop` command: prepare, pretrain (DAPT/TAPT), finetune, grid, export, plan, and the offline demo."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import TYPE_CHECKING

from dontstop_jax.errors import EXIT_FAULT, EXIT_INTERRUPTED, EXIT_USER, Fault, Interrupted, UserError
from dontstop_jax.files import describe_fault

if TYPE_CHECKING:  # loaded with the config, after quiet_platform()
    from ml_collections import ConfigDict

EPILOG = """examples:
  dontstop demo                                   # the offline synthetic benchmark: grid + table (~15 min)
  dontstop pretrain --config configs/dapt.py:biomed --config.init=/models/roberta-base \\
      --config.data.sources='["/data/s2orc/*.txt"]'
  dontstop finetune --config configs/finetune.py:chemprot --config.init=runs/dapt-biomed \\
      --config.task.path=/data/chemprot
  dontstop select --config configs/select.py:knn --config.k=500 --config.task.path=/data/chemprot \\
      --config.sources='["/data/s2orc/*.txt"]'
  dontstop grid --config configs/grid.py:paper --config.base=/models/roberta-base
  dontstop continual --config configs/continual.py:synthetic  # DAS vs sequential DAPT on 3 synthetic domains
  dontstop export --from runs/finetune-chemprot --to exported/chemprot
  dontstop analyze --config configs/analyze.py:synthetic   # after the demo: overlap, MLM loss, curves, plots
  dontstop finetune --config configs/finetune.py:chemprot --config.peft.method=lora --config.peft.lora_rank=8
  dontstop plan --config configs/dapt.py:biomed --topology v5litepod-64  # plans bfloat16, the TPU default
  dontstop config --config configs/finetune.py:chemprot --diff  # the fields set, their meaning, what counts
Every --config.a.b=value must name an existing field; `dontstop config --config F:ARG` lists them with their meaning."""


def parser() -> argparse.ArgumentParser:
    """The argument parser (also what docs/reference/cli.md is generated from)."""
    p = argparse.ArgumentParser(
        prog="dontstop", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the paper's grid on the built-in synthetic benchmark, offline")
    demo.add_argument(
        "--scale",
        default="default",
        choices=["default", "tiny"],
        help="default: the real demo (~15 min on 2 cores); tiny: a 1-minute smoke run",
    )
    for name, text in [
        ("prepare", "tokenize and pack a pretraining corpus into cached shards"),
        ("pretrain", "run a DAPT or TAPT masked-LM phase"),
        ("finetune", "fine-tune on a labeled task with early stopping on dev"),
        ("select", "select domain documents for TAPT (kNN-TAPT, RAND-TAPT, DSIR, curated)"),
        ("grid", "run a grid of variants x tasks x seeds and write the results table"),
        ("continual", "continual DAP-training over a domain sequence (DAS and baselines)"),
        ("analyze", "vocabulary overlap, per-domain MLM loss, training curves and result plots"),
    ]:
        sp = sub.add_parser(name, help=text)
        sp.add_argument("--config", required=True, help="configs/FILE.py or configs/FILE.py:ARG")
    config = sub.add_parser("config", help="print a resolved config: each field, its doc, whether it changes results")
    config.add_argument("--config", required=True, help="configs/FILE.py or configs/FILE.py:ARG")
    config.add_argument("--diff", action="store_true", help="only the fields that differ from their declared default")
    export = sub.add_parser("export", help="write a phase's model as a Hugging Face directory")
    export.add_argument("--from", dest="source", required=True, help="a finished phase's workdir")
    export.add_argument("--to", required=True, help="output directory (must not exist)")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: best, else latest)")
    export.add_argument(
        "--peft-only",
        action="store_true",
        help="write only what a parameter-efficient phase trained, as one small .safetensors file",
    )
    plan = sub.add_parser("plan", help="compile a phase's step for a TPU slice here: memory, FLOPs, step time")
    plan.add_argument("--config", required=True, help="configs/FILE.py or configs/FILE.py:ARG")
    plan.add_argument("--topology", required=True, help="Cloud TPU accelerator type, e.g. v4-32, v5litepod-16")
    plan.add_argument("--slices", type=int, default=1, help="number of slices (mesh.dcn_shape spans them)")
    plan.add_argument("--tokens", type=int, default=None, help="corpus tokens, for the hours of an epochs-based run")
    plan.add_argument(
        "--as-configured", action="store_true", help="plan the configured step only (no levers tried: fewer compiles)"
    )
    for sp in sub.choices.values():
        sp.add_argument("--compilation-cache", default=None, help="persistent XLA cache directory")
    return p


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.command == "config":  # reads a config only: no runtime, no accelerator
        from dontstop_jax import config_loader
        from dontstop_jax.explain import explain

        print(explain(config_loader.load(args.config, overrides), args.diff))
        return 0
    from dontstop_jax import runtime
    from dontstop_jax.train.loop import StopSignal

    runtime.setup(args.compilation_cache)
    # For the whole command, so a signal between phases stops the next one at its start. Installed after
    # joining a multi-process run: jax.distributed's preemption notifier would replace an earlier handler.
    with StopSignal():
        return _command(args, overrides)


def checked_config(args: argparse.Namespace, overrides: list[str]) -> ConfigDict | None:
    """The command's config, loaded, overridden and checked (export: its arguments checked; it has no config):
    every check a command makes before any work (the docs' commands are checked with it too)."""
    from dontstop_jax import config_loader

    if args.command == "export":
        if overrides:
            raise UserError(f"export takes no --config overrides, got {overrides}")
        config_loader.check_url(args.source, "--from")
        config_loader.check_url(args.to, "--to")
        return None
    if args.command == "demo":
        from dontstop_jax.phases import synthetic

        return config_loader.finalize(synthetic.get_config(args.scale), overrides)
    return config_loader.load(args.config, overrides, platform="tpu" if args.command == "plan" else None)


def _command(args: argparse.Namespace, overrides: list[str]) -> int:
    """Run one command; its exit code (plan: 1 when the step does not fit)."""
    cfg = checked_config(args, overrides)
    if cfg is None:  # export
        from dontstop_jax.phases.export import export, export_delta

        print((export_delta if args.peft_only else export)(args.source, args.to, step=args.step))
        return 0
    if args.command in ("demo", "grid"):
        from dontstop_jax.phases.grid import Grid
        from dontstop_jax.phases.synthetic import materialize

        table = Grid(materialize(cfg) if "synthetic" in cfg else cfg).run()
        print(table.to_markdown())
        print(f"\nwritten: {cfg.workdir}/results.md, results.csv, results.json")
    elif args.command == "continual":
        from dontstop_jax.phases.continual import Continual
        from dontstop_jax.phases.synthetic import materialize

        table = Continual(materialize(cfg) if "synthetic" in cfg else cfg).run()
        print(table.to_markdown())
        print(f"\nwritten: {cfg.workdir}/continual.md, continual.json")
    elif args.command == "prepare":
        from dontstop_jax.phases.pretrain import prepare
        from dontstop_jax.train.source import resolve_phase

        corpus = prepare(cfg, resolve_phase(cfg))
        print(f"{corpus.directory}: {corpus.num_blocks} blocks of {corpus.max_seq_length} tokens")
    elif args.command == "pretrain":
        from dontstop_jax.phases.pretrain import pretrain

        _print_summary(pretrain(cfg))
    elif args.command == "finetune":
        from dontstop_jax.phases.finetune import finetune

        _print_summary(finetune(cfg))
    elif args.command == "analyze":
        from dontstop_jax.analysis.report import analyze

        print(f"written: {analyze(cfg)}/summary.md (+ CSV and PNG files)")
    elif args.command == "plan":
        from dontstop_jax.phases.plan import plan

        fits, report = plan(cfg, args.topology, args.slices, args.tokens, levers=not args.as_configured)
        print(report)
        return 0 if fits else 1
    elif args.command == "select":
        from dontstop_jax.phases.select import select

        _print_summary(select(cfg))
    return 0


def _print_summary(summary: dict) -> None:
    """A phase's summary as JSON on stdout (progress goes to stderr), e.g. `dontstop finetune ... | jq .test`."""
    print(json.dumps(summary, indent=1, sort_keys=True))


def quiet_platform(env: dict | os._Environ = os.environ) -> None:
    """Run on the CPU when this machine has no TPU and no GPU (JAX_PLATFORMS=cpu, unless set): with libtpu
    installed, JAX would otherwise try the TPU first and print dozens of libtpu start-up lines. A TPU VM (its
    /dev/accel* or /dev/vfio devices, or the TPU variables of its environment) and a GPU host keep JAX's own
    choice. Must run before JAX is imported."""
    if "JAX_PLATFORMS" in env:
        return
    tpu = (
        any(
            name in env
            for name in (
                "TPU_NAME",
                "TPU_ACCELERATOR_TYPE",
                "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS",
                "CLOUD_TPU_TASK_ID",
            )
        )
        or env.get("DONTSTOP_TPU") == "1"
        or bool(glob.glob("/dev/accel*"))
        or os.path.isdir("/dev/vfio")
    )
    gpu = any(os.path.exists(d) for d in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd"))
    if not (tpu or gpu):
        env["JAX_PLATFORMS"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when done, 75 when interrupted (SIGTERM/SIGINT: the running phase checkpointed; rerunning the
    command continues), 1 on a fault (filesystem, another process) or when `plan` finds the step does not fit,
    2 on bad input. Errors end with one line on stderr, never a traceback."""
    args, overrides = parser().parse_known_args(argv)
    quiet_platform()
    try:
        code = _run(args, overrides)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER
    except Interrupted as stopped:
        print(stopped, file=sys.stderr)
        return EXIT_INTERRUPTED
    except Fault as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAULT
    except Exception as err:  # noqa: BLE001 (filesystem faults become one line; anything else is a bug: re-raise)
        if (fault := describe_fault(err)) is None:
            raise
        print(f"error: {fault}", file=sys.stderr)
        # Exit now: Orbax's background writers, failing on the same fault, would print tracebacks from native
        # threads while the interpreter shuts down. Committed checkpoints are complete; a half-written one is
        # a temporary directory that restores ignore.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_FAULT)
    except KeyboardInterrupt:
        print(
            "stopped at once by a second signal; rerun the same command to continue from the last checkpoint",
            file=sys.stderr,
        )
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
