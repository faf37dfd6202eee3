"""Per-device memory of one MLM train step under each memory lever, from XLA's own accounting.

Compiles (never runs) the real jitted step ahead of time for roberta-base and roberta-large at sequence
512 on 8 devices and reads `compiled.memory_analysis()`, so it needs neither the hardware nor the memory.
Levers, applied cumulatively: bf16 compute, FSDP (parameters and optimizer state sharded over 8 devices),
rematerialisation of encoder layers, and gradient accumulation (4 micro-batches, same global batch).

    python bench/memory.py            # writes bench/memory.json and prints a Markdown table
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)

from dontstop_jax.engine import (  # noqa: E402
    DEFAULT_RULES,
    StepSpec,
    abstract_state,
    batch_sharding,
    compile_train_step,
    default_optim_config,
    make_mesh,
    make_optimizer,
    mlm_loss_sums,
    state_shardings,
)
from dontstop_jax.engine.sharding import activation_rules  # noqa: E402
from dontstop_jax.model import ModelConfig, RobertaForMaskedLM  # noqa: E402

SEQ, SLOTS, GLOBAL_BATCH = 512, 80, 64
MODELS = {
    "roberta-base": ModelConfig(),
    "roberta-large": ModelConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
}
# (name, mesh shape, model overrides, accumulation steps): each row adds one lever to the previous.
LEVERS = [
    ("fp32, data parallel", (8, 1, 1), {}, 1),
    ("+ bf16 compute", (8, 1, 1), {"dtype": "bfloat16"}, 1),
    ("+ FSDP over 8", (1, 8, 1), {"dtype": "bfloat16"}, 1),
    ("+ remat (full)", (1, 8, 1), {"dtype": "bfloat16", "remat": "full"}, 1),
    ("+ accumulation x4", (1, 8, 1), {"dtype": "bfloat16", "remat": "full"}, 4),
]


def step_memory(cfg: ModelConfig, mesh_shape, accum: int) -> dict:
    mesh = make_mesh(mesh_shape)
    model = RobertaForMaskedLM(cfg)
    tx, schedule = make_optimizer(default_optim_config(), 1000)
    shardings = state_shardings(model, tx, mesh, DEFAULT_RULES)
    spec = StepSpec(mlm_loss_sums(model), tx, accum_steps=accum, schedule=schedule)
    step = compile_train_step(spec, shardings, mesh, DEFAULT_RULES)
    rows = batch_sharding(mesh)
    batch = {
        k: jax.ShapeDtypeStruct((GLOBAL_BATCH, n), dtype, sharding=rows)
        for k, n, dtype in [
            ("input_ids", SEQ, "int32"),
            ("attention_mask", SEQ, "int32"),
            ("mlm_positions", SLOTS, "int32"),
            ("mlm_ids", SLOTS, "int32"),
            ("mlm_weights", SLOTS, "float32"),
        ]
    }
    with activation_rules(mesh, DEFAULT_RULES):
        compiled = step.__wrapped__.lower(  # type: ignore[attr-defined]  # set by functools.wraps
            abstract_state(shardings, model, tx), batch, spec.arguments
        ).compile()
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {
        "state_and_batch_gib": m.argument_size_in_bytes / 2**30,
        "temporaries_gib": m.temp_size_in_bytes / 2**30,
        "peak_gib": peak / 2**30,
    }


def main() -> None:
    results = []
    for model_name, base in MODELS.items():
        for lever, mesh_shape, overrides, accum in LEVERS:
            t = time.time()
            r = step_memory(base.replace(**overrides), mesh_shape, accum)
            results.append({"model": model_name, "lever": lever, "mesh": mesh_shape, "accum": accum, **r})
            print(
                f"{model_name:14s} {lever:22s} peak {r['peak_gib']:6.2f} GiB/device "
                f"(compiled in {time.time() - t:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
    out = Path(__file__).with_name("memory.json")
    out.write_text(
        json.dumps(
            {
                "seq": SEQ,
                "global_batch": GLOBAL_BATCH,
                "devices": 8,
                "backend": jax.default_backend(),
                "jax": jax.__version__,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"| lever (cumulative) | {' | '.join(f'{m} GiB/device' for m in MODELS)} |")
    print("|:--|" + "--:|" * len(MODELS))
    for lever, *_ in LEVERS:
        cells = [next(r for r in results if r["model"] == m and r["lever"] == lever) for m in MODELS]
        print(
            f"| {lever} | "
            + " | ".join(f"{c['peak_gib']:.2f} (state {c['state_and_batch_gib']:.2f})" for c in cells)
            + " |"
        )


if __name__ == "__main__":
    main()
