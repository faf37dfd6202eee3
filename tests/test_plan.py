"""`dontstop plan` compiles a tiny model's real step for a TPU slice on this CPU machine (needs libtpu: in the
test extra; the test session's JAX_PLATFORMS=cpu keeps every other process from looking for a TPU)."""

import dataclasses

import pytest

from dontstop_jax import cli
from dontstop_jax.engine import topology

TINY = [
    "--config",
    "configs/tapt.py",
    "--config.model.hidden_size=64",
    "--config.model.num_hidden_layers=2",
    "--config.model.num_attention_heads=2",
    "--config.model.intermediate_size=128",
    "--config.data.max_seq_length=64",
    "--config.model.vocab_size=512",  # roberta-base's 50265 rows: a third more compile time for a TPU slice
]


def test_unknown_topology_is_one_error_line(capsys):
    assert cli.main(["plan", "--topology", "v9-8", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown TPU topology 'v9-8'; supported: v4-8,") and len(err.splitlines()) == 1


def test_accelerator_names_map_to_topologies():
    assert topology.parse("v4-32")[1:] == ("v4:2x2x4", (2, 2, 1))  # 32 TensorCores = 16 chips
    assert topology.parse("v5litepod-16")[1:] == ("v5e:4x4", (2, 2, 1))
    assert topology.parse("v5p-128")[1] == "v5p:4x4x4"
    assert topology.parse("v6e-64")[1] == "v6e:8x8"


def test_tiny_step_fits_and_prints_its_plan(capsys):
    """No dtype flag: a TPU plan computes in bfloat16. Accumulation 1 leaves the FSDP levers to rank (with and
    without gathering the parameters once per step)."""
    pytest.importorskip("libtpu")
    assert (
        cli.main(
            [
                "plan",
                "--topology",
                "v5litepod-8",
                *TINY,
                "--config.train.batch_size=64",
                "--config.train.accum_steps=1",
                "--tokens=300000",  # TAPT's steps come from the corpus size: the wall clock in hours
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for row in (
        "8 v5e chips",
        "bfloat16",
        "HBM per chip",
        "FLOPs",
        "HBM traffic",
        "collectives",
        "roofline step",
        "per chip, ",
        "per host; MFU",
        "wall clock:     0.00 h for 7400 steps",  # 100 epochs of 74 batches of 64 x 64
        "fitting plans, fastest first (3 of 3 fit; 3 compiled, the others estimated)",
        "3. ",
        "--config.train.gather_params_once=True",
        "chosen: ",
        # the recipe's attention dropout 0.1: the chosen plan again, on the fused kernel
        "with fused attention (attention dropout 0: faster, and a change from RoBERTa's recipe): ",
        "--config.model.attention_probs_dropout_prob=0.0 --config.model.attention_impl=splash",
        "attention fused (splash)",
    ):
        assert row in out, row
    from bench.plan_table import parse  # the plan table reads the chosen plan and its twin from the report

    chosen = parse(out)
    assert chosen["lever"].startswith("--config.mesh.shape='(1, 8, 1)'") and chosen["mesh"]["fsdp"] == 8
    twin = chosen["fused"]
    assert twin["fits"] and twin["bound"] in ("compute", "HBM", "ICI") and 0 <= twin["mfu"] < 1, twin


def test_as_configured_plans_the_configured_step_alone(capsys):
    """--as-configured tries no lever; with attention dropout 0 already there is no fused twin to add."""
    pytest.importorskip("libtpu")
    flags = ["--config.train.batch_size=64", "--config.model.attention_probs_dropout_prob=0.0"]
    assert cli.main(["plan", "--as-configured", "--topology", "v5litepod-8", *TINY, *flags]) == 0
    out = capsys.readouterr().out
    assert "fitting plans, fastest first (1 of 1 fit; 1 compiled, the others estimated)" in out
    assert "chosen: as configured" in out and "attention fused (splash)" in out and "with fused" not in out


def test_loops_count_as_often_as_they_run():
    """XLA's cost analysis counts a while body once; hlo.count multiplies it by the loop's trip count."""
    import jax
    import jax.numpy as jnp

    from dontstop_jax.analysis import hlo

    def f(w, x):
        return jax.lax.scan(lambda c, wl: (jnp.tanh(c @ wl), None), x, w)[0].sum()

    compiled = jax.jit(f).lower(jnp.ones((5, 32, 32)), jnp.ones((16, 32))).compile()
    text = compiled.as_text()
    assert text is not None
    counted = hlo.count(text)
    assert counted.flops == 5 * 2 * 16 * 32 * 32
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    assert xla is not None
    assert xla["flops"] < counted.flops / 4  # XLA: the body once
    assert counted.bytes_accessed >= 5 * 32 * 32 * 4  # every layer's weights read once


ON_CHIP = """HloModule m

ENTRY %main (p0: f32[1024], p1: f32[1024]) -> f32[1024] {
  %p0 = f32[1024]{0} parameter(0)
  %p1 = f32[1024]{0:S(1)} parameter(1)
  %buffer = f32[4096]{0} custom-call(), custom_call_target="AllocateBuffer"
  %prefetch = (f32[1024]{0:S(1)}, f32[1024]{0}, u32[]) copy-start(%p0)
  %fetched = f32[1024]{0:S(1)} copy-done(%prefetch)
  %part = f32[256]{0:S(1)} slice(%p0), slice={[0:256]}
  %reducing = f32[1024]{0} all-reduce-start(%p0), replica_groups={}
  %reduced = f32[1024]{0} all-reduce-done(%reducing)
  ROOT %sum = f32[1024]{0} add(%fetched, %p1)
}
"""


def test_hbm_traffic_leaves_out_on_chip_arrays_and_allocations():
    """What XLA:TPU keeps in on-chip memory (a layout's S(1)) is no HBM traffic, and an allocation moves nothing;
    a prefetch reads its source from HBM once (its result tuple holds the source too), a slice into on-chip
    memory reads its part of HBM, an all-reduce reads and writes its array, and the sum writes its result."""
    from dontstop_jax.analysis import hlo

    prefetch, part, reduce, total = 1024 * 4 + 4, 256 * 4, 2 * 1024 * 4, 1024 * 4  # + the copy's u32 context
    assert hlo.count(ON_CHIP).bytes_accessed == prefetch + part + reduce + total


def test_a_reduce_scatter_counts_the_array_it_reduces():
    """A reduce-scatter moves its whole operand over the links (each device keeps a share), and XLA:TPU compiles a
    large one as an "all-reduce-scatter" fusion around an all-reduce: both count as one reduce-scatter of the
    whole array, so `plan` neither takes a share for the traffic nor doubles it as an all-reduce's."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from dontstop_jax.analysis import hlo

    def reduced(devices, shape):
        mesh = Mesh(np.array(devices).reshape(-1, 4), ("data", "fsdp"))
        once = jax.shard_map(
            lambda g: jax.lax.psum(jax.lax.psum_scatter(g, "fsdp", scatter_dimension=0, tiled=True), "data"),
            mesh=mesh,
            in_specs=P(),
            out_specs=P("fsdp"),
            check_vma=False,
        )
        array = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, P()))
        text = jax.jit(once).lower(array).compile().as_text()
        assert text is not None
        return hlo.collectives(text)

    assert reduced(jax.devices(), (64, 256)) == {"reduce-scatter": (1, 64 * 256 * 4), "all-reduce": (1, 16 * 256 * 4)}
    pytest.importorskip("libtpu")
    from dontstop_jax.engine import topology

    on_tpu = reduced(topology.devices("v5litepod-16")[1], (4096, 1024))
    assert on_tpu["reduce-scatter"] == (1, 4128 * 1024 * 4)  # XLA:TPU pads the rows to 4 x 1032
    assert on_tpu["all-reduce"] == (1, 1024 * 1024 * 4)  # over data, the fsdp share only


def test_step_that_does_not_fit_names_the_lever_and_its_plan(capsys, monkeypatch):
    pytest.importorskip("libtpu")
    # About 10.5 MiB per chip at accumulation 1, 6.2 MiB at 2 (fsdp and full remat already applied).
    small = dataclasses.replace(topology.CHIPS["v5litepod"], hbm_bytes=8 << 20)
    monkeypatch.setitem(topology.CHIPS, "v5litepod", small)
    assert (
        cli.main(
            [
                "plan",
                "--topology",
                "v5litepod-8",
                *TINY,
                "--config.train.batch_size=1024",
                "--config.train.accum_steps=1",
                "--config.mesh.shape=(1,-1,1)",
                "--config.model.remat=full",
            ]
        )
        == 1
    )
    out = capsys.readouterr().out
    assert "does not fit\nfitting plans, fastest first (1 of 2 fit; 2 compiled, the others estimated)" in out
    assert "chosen: --config.train.accum_steps=2\n" in out and "accum 2," in out
    assert out.count("HBM per chip") == 3  # the configured step, the chosen one and its fused-attention twin


def test_a_step_the_compiler_refuses_does_not_fit_and_gets_a_lever(capsys, monkeypatch):
    """The TPU compiler rejects a program whose temporaries exceed HBM (RESOURCE_EXHAUSTED) instead of compiling
    it: plan reads that as "does not fit" and tries the levers. No libtpu: the CPU devices stand in for the slice."""
    import jax

    from dontstop_jax.phases import plan as plan_phase

    real = plan_phase.compile_phase

    def compile_phase(cfg, devices):
        if cfg.mesh.shape[0] != 1:  # data parallel: "too big"; the FSDP lever compiles for real
            raise jax.errors.JaxRuntimeError(
                "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                "required for HLO temporaries (20.13G) exceeds available HBM (15.75G)."
            )
        return real(cfg, devices)

    monkeypatch.setattr(plan_phase, "compile_phase", compile_phase)
    monkeypatch.setattr(topology, "devices", lambda name, slices=1: (topology.CHIPS["v5litepod"], jax.devices()[:8]))
    assert cli.main(["plan", "--topology", "v5litepod-8", *TINY, "--config.train.batch_size=64"]) == 1
    out = capsys.readouterr().out
    assert "does not compile: RESOURCE_EXHAUSTED: Ran out of memory on HBM" in out
    assert "does not fit\n" in out and "chosen: --config.mesh.shape='(1, 8, 1)'" in out and "mesh data=1 fsdp=8" in out


def test_compute_takes_the_model_flops_where_the_compiled_count_misses_a_kernel(capsys, monkeypatch):
    """XLA counts only part of a Pallas kernel's FLOPs (splash attention): a count below the model's would make
    compute look faster than the model's own FLOPs allow, and MFU exceed 100%. The roofline takes the model's.
    No libtpu: the CPU devices stand in for the slice, and the compiled count is made to miss nearly everything."""
    import jax

    from dontstop_jax.phases import plan as plan_phase

    real = plan_phase.compile_phase

    def compile_phase(cfg, devices):
        train, predict, params = real(cfg, devices)
        return dataclasses.replace(train, flops=1.0), predict, params

    monkeypatch.setattr(plan_phase, "compile_phase", compile_phase)
    monkeypatch.setattr(topology, "devices", lambda name, slices=1: (topology.CHIPS["v5litepod"], jax.devices()[:8]))
    flags = ["--config.train.batch_size=64", "--config.model.attention_probs_dropout_prob=0.0"]
    assert cli.main(["plan", "--as-configured", "--topology", "v5litepod-8", *TINY, *flags]) == 0
    out = capsys.readouterr().out
    assert "1 FLOPs (model " in out and "which the roofline takes: a kernel XLA cannot count" in out
    mfu = int(out.split("MFU ")[1].split("%")[0])
    assert 0 < mfu <= 100, out


def test_fused_attention_plans_the_splash_kernel_for_a_tpu_slice(monkeypatch):
    """Attention dropout 0 on a TPU (no attention_impl flag): the step compiles with the Pallas splash kernel."""
    pytest.importorskip("libtpu")
    from dontstop_jax.analysis import plan as analysis
    from dontstop_jax.config_loader import load

    texts, real = [], analysis.count

    def count(text):
        texts.append(text)
        return real(text)

    monkeypatch.setattr(analysis, "count", count)
    cfg = load(
        "configs/tapt.py",
        TINY[2:]
        + [
            "--config.data.max_seq_length=128",
            "--config.train.batch_size=64",
            "--config.train.accum_steps=1",
            "--config.model.attention_probs_dropout_prob=0.0",
        ],
        platform="tpu",
    )
    assert (cfg.model.attention_impl, cfg.model.dtype) == ("splash", "bfloat16")
    analysis.compile_phase(cfg, topology.devices("v5litepod-8")[1])
    assert any("tpu_custom_call" in text for text in texts)


def test_fine_tuning_plans_without_train_steps():
    """A fine-tune config has epochs, no train.steps: its train and predict steps still compile (CPU here)."""
    import jax

    from dontstop_jax.analysis.plan import compile_phase
    from dontstop_jax.config_loader import load

    cfg = load("configs/finetune.py", TINY[2:] + ["--config.train.batch_size=8"])
    train, predict, params = compile_phase(cfg, jax.devices()[:8])
    assert predict is not None and train.total_bytes > 0 and params > 0


def test_the_model_comes_from_a_phase_workdir_without_its_weights(tmp_path):
    """A plan from a phase (e.g. TAPT after a roberta-large DAPT) takes the architecture its checkpoint recorded,
    also from a checkpoint written before the vocabulary was padded (no `vocab_pad_multiple`: 1)."""
    import optax

    from dontstop_jax.analysis.plan import model_config
    from dontstop_jax.config_loader import load
    from dontstop_jax.engine import DEFAULT_RULES, create_train_state, make_mesh
    from dontstop_jax.engine.checkpoint import Checkpointer
    from dontstop_jax.model import RobertaForMaskedLM, tiny_config

    arch = tiny_config(vocab_size=97, vocab_pad_multiple=1, num_hidden_layers=3)
    state, _ = create_train_state(RobertaForMaskedLM(arch), optax.sgd(0.1), make_mesh((-1, 1, 1)), DEFAULT_RULES, 0)
    recorded = {k: v for k, v in dataclasses.asdict(arch).items() if k != "vocab_pad_multiple"}
    ckpt = Checkpointer(tmp_path / "dapt" / "checkpoints")
    ckpt.save(state, data_state={}, meta={"model_config": recorded})
    ckpt.close()
    cfg = load("configs/tapt.py", [f"--config.init={tmp_path / 'dapt'}", "--config.model.dtype=bfloat16"])
    planned = model_config(cfg)
    assert (planned.num_hidden_layers, planned.vocab_size, planned.padded_vocab_size) == (3, 97, 97)
    assert planned.dtype == "bfloat16"


def test_a_count_between_two_compiled_ones_is_estimated_from_them():
    """plan compiles few accumulation counts and estimates those between: FLOPs, HBM traffic and collectives are
    affine in the count, temporaries in its inverse. The estimate at 2 from the compiles at 1 and 4 is the compiled
    step at 2 within 10% (CPU devices here)."""
    import jax

    from dontstop_jax.analysis.plan import between, compile_phase
    from dontstop_jax.config_loader import load

    costs = {
        a: compile_phase(
            load("configs/tapt.py", TINY[2:] + ["--config.train.batch_size=64", f"--config.train.accum_steps={a}"]),
            jax.devices()[:8],
        )[0]
        for a in (1, 2, 4)
    }
    estimate = between((1, costs[1]), (4, costs[4]), 2)
    for field in ("flops", "bytes_accessed", "temp_bytes", "total_bytes"):
        assert getattr(estimate, field) == pytest.approx(getattr(costs[2], field), rel=0.1), field
    assert estimate.collectives.keys() == costs[2].collectives.keys()
    for kind, exact in costs[2].collectives.items():
        assert estimate.collectives[kind] == pytest.approx(exact, rel=0.1), kind
