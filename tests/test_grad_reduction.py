"""One gradient reduction per optimizer step, read from the compiled program: no reduction over the batch
axes inside a while loop (the accumulation scan, the layer scan), the same collective bytes per step for 1
and 8 micro-batches, and the same parameters after 3 steps (the word embeddings included: XLA has
miscompiled scatter-accumulated embedding gradients inside loops, openxla/xla#49143)."""

import functools
import math

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from dontstop_jax.analysis.hlo import collective_ops
from dontstop_jax.engine import (
    DEFAULT_RULES,
    StepSpec,
    classification_loss_sums,
    compile_train_step,
    create_train_state,
    default_optim_config,
    make_mesh,
    make_optimizer,
    mlm_loss_sums,
    to_global,
)
from dontstop_jax.engine.sharding import BATCH_AXES, MESH_AXES, activation_rules
from dontstop_jax.errors import UserError
from dontstop_jax.model import RobertaForMaskedLM, RobertaForSequenceClassification, tiny_config

CFG = tiny_config(
    vocab_size=128,
    hidden_size=32,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=34,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
ROWS, SEQ, SLOTS = 64, 16, 4
MESHES = [(8, 1, 1), (4, 2, 1), (2, 2, 2)]
REDUCTIONS = ("all-reduce", "reduce-scatter")


def batch(kind, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, CFG.vocab_size, (ROWS, SEQ)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 0, 2
    mask = np.ones_like(ids)
    if kind == "classify":
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": (ids[:, 1] % 2).astype(np.int32),
            "example_weights": np.ones(ROWS, np.float32),
        }
    positions = np.stack([rng.choice(np.arange(1, SEQ - 1), SLOTS, replace=False) for _ in range(ROWS)])
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mlm_positions": positions.astype(np.int32),
        "mlm_ids": np.take_along_axis(ids, positions, 1),
        "mlm_weights": np.ones((ROWS, SLOTS), np.float32),
    }


@functools.cache
def compiled(kind, mesh_shape, accum, gather_once=True, reduce_dtype="float32"):
    """(mesh, executable, initial state, 3 global batches) of one train step, compiled once per session."""
    mesh = make_mesh(mesh_shape, jax.devices())
    model = RobertaForMaskedLM(CFG) if kind == "mlm" else RobertaForSequenceClassification(CFG, num_labels=2)
    loss = mlm_loss_sums(model) if kind == "mlm" else classification_loss_sums(model)
    tx, _ = make_optimizer(default_optim_config(), total_steps=10)
    state, shardings = create_train_state(model, tx, mesh, DEFAULT_RULES, seed=0)
    spec = StepSpec(loss, tx, accum_steps=accum, gather_params_once=gather_once, grad_reduce_dtype=reduce_dtype)
    step = compile_train_step(spec, shardings, mesh, DEFAULT_RULES, donate=False)
    batches = [to_global(batch(kind, seed), mesh) for seed in range(3)]
    with activation_rules(mesh, DEFAULT_RULES):
        executable = step.__wrapped__.lower(state, batches[0], spec.arguments).compile()  # type: ignore[attr-defined]
    return mesh, executable, state, batches


def over_batch_axes(group, mesh):
    """Whether a collective's device group spans devices of different batch shards (data x fsdp)."""
    coords = np.array(np.unravel_index(np.asarray(group or range(mesh.size)), mesh.devices.shape))
    batch_rows = coords[[MESH_AXES.index(a) for a in BATCH_AXES]]
    return bool((batch_rows != batch_rows[:, :1]).any())


def batch_reductions(ops, mesh):
    return [op for op in ops if op.kind in REDUCTIONS and any(over_batch_axes(g, mesh) for g in op.groups or [()])]


def per_step_bytes(ops, kinds=None):
    return sum(op.times * op.nbytes for op in ops if kinds is None or op.kind in kinds)


@pytest.mark.parametrize("mesh_shape", MESHES)
@pytest.mark.parametrize("kind", ["mlm", "classify"])
def test_one_reduction_after_the_loop_and_equal_bytes(kind, mesh_shape):
    mesh = compiled(kind, mesh_shape, 1)[0]
    texts = [compiled(kind, mesh_shape, k)[1].as_text() for k in (1, 8)]
    one, eight = map(collective_ops, texts)
    for ops in (one, eight):
        reductions = batch_reductions(ops, mesh)
        assert reductions and all(op.times == 1 for op in reductions)
        assert not [op for op in reductions if op.in_loop]
    assert texts[1].count(" while(") > texts[0].count(" while(")  # the accumulation loop is really there
    assert per_step_bytes(eight) == per_step_bytes(one)


@pytest.mark.parametrize("mesh_shape", MESHES)
@pytest.mark.parametrize("kind", ["mlm", "classify"])
def test_accumulation_matches_one_batch(kind, mesh_shape):
    """float32, no dropout: 3 steps of 8 micro-batches end where 3 steps of the whole batch do."""
    runs = []
    for accum in (1, 8):
        _, executable, state, batches = compiled(kind, mesh_shape, accum)
        for b in batches:
            state, metrics = executable(state, b, {})  # (the step's arguments: none without a schedule)
        runs.append((jax.device_get(state.params), float(metrics["loss"])))
    (one, loss_one), (eight, loss_eight) = runs
    np.testing.assert_allclose(loss_eight, loss_one, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), eight, one)
    words = lambda p: p["roberta"]["embeddings"]["word_embeddings"]["embedding"]
    start = jax.device_get(words(compiled(kind, mesh_shape, 1)[2].params))
    assert np.abs(words(one) - start).max() > 1e-4  # the embedding really trained
    np.testing.assert_allclose(words(eight), words(one), rtol=1e-5, atol=1e-6)


def test_gathering_per_micro_batch_repeats_only_the_gathers():
    """FSDP: `gather_params_once=False` all-gathers the parameters in every micro-batch (memory for traffic);
    the reductions stay one per step either way."""
    mesh = compiled("mlm", (4, 2, 1), 8)[0]
    once, each = (collective_ops(compiled("mlm", (4, 2, 1), 8, gather_once=g)[1].as_text()) for g in (True, False))
    assert not [op for op in once if op.kind == "all-gather" and op.in_loop]
    gathers = [op for op in each if op.kind == "all-gather" and op.in_loop]
    assert gathers and all(op.times == 8 for op in gathers)
    assert per_step_bytes(each, ["all-gather"]) > 4 * per_step_bytes(once, ["all-gather"])
    assert per_step_bytes(batch_reductions(each, mesh)) == per_step_bytes(batch_reductions(once, mesh))


def reduced_operands(jaxpr):
    """(dtype, shape) of every operand the traced program sums across devices (psum, reduce-scatter)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("psum", "psum_invariant", "reduce_scatter"):
            found += [(v.aval.dtype, v.aval.shape) for v in eqn.invars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, (jex.core.ClosedJaxpr, jex.core.Jaxpr)):
                    found += reduced_operands(getattr(sub, "jaxpr", sub))
    return found


def test_bfloat16_reduction_halves_the_gradient_bytes():
    """Read from the traced program: XLA's CPU compiler aborts on a bfloat16 all-reduce (StepSpec.for_phase
    refuses it there), while TPU and GPU compile it."""
    mesh = make_mesh((4, 2, 1), jax.devices())
    model = RobertaForMaskedLM(CFG)
    tx, _ = make_optimizer(default_optim_config(), total_steps=10)
    state, shardings = create_train_state(model, tx, mesh, DEFAULT_RULES, seed=0)
    operands = {}
    for dtype in ("float32", "bfloat16"):
        step = compile_train_step(
            StepSpec(mlm_loss_sums(model), tx, accum_steps=8, grad_reduce_dtype=dtype),
            shardings,
            mesh,
            DEFAULT_RULES,
        )
        with activation_rules(mesh, DEFAULT_RULES):
            traced = step.__wrapped__.trace(state, to_global(batch("mlm", 0), mesh), {})  # type: ignore[attr-defined]
            operands[dtype] = reduced_operands(traced.jaxpr)
    grads = [(d, shape) for d, shape in operands["bfloat16"] if shape]  # (the loss and weight sums are scalars)
    assert grads and all(d == jnp.bfloat16 for d, _ in grads)
    nbytes = {k: sum(d.itemsize * math.prod(shape) for d, shape in v if shape) for k, v in operands.items()}
    assert nbytes["bfloat16"] * 2 == nbytes["float32"]
    with pytest.raises(UserError, match="grad_reduce_dtype=bfloat16 cannot compile for CPU"):
        StepSpec.for_phase(
            ConfigDict({"train": {"grad_reduce_dtype": "bfloat16"}}), mlm_loss_sums(model), tx, None, "cpu"
        )
