"""DAS: gate gradients are true gradients, soft-masks hit exactly their units, sharded steps match one device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_engine import CFG as ENGINE_CFG  # the same tiny model and MLM batches
from test_engine import mlm_batch

from dontstop_jax.analysis.continual import ContinualTable, forgetting
from dontstop_jax.das import contrastive, importance, softmask
from dontstop_jax.engine import (
    DEFAULT_RULES,
    StepSpec,
    compile_train_step,
    create_train_state,
    default_optim_config,
    make_mesh,
    make_optimizer,
    make_train_step,
    to_global,
)
from dontstop_jax.engine.sharding import activation_rules
from dontstop_jax.model import RobertaForMaskedLM

CFG = ENGINE_CFG.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def model_and_params(cfg, mesh):
    model = RobertaForMaskedLM(cfg)
    state, _ = create_train_state(model, optax.identity(), mesh, DEFAULT_RULES, seed=0)
    return model, state.params


def test_gate_gradients_match_finite_differences():
    cfg = CFG.replace(initializer_range=0.2)  # gradients well above float32 finite-difference noise
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    model, params = model_and_params(cfg, mesh)
    batch = mlm_batch(0)
    measured = importance.measure(importance.mlm_loss(model), cfg, params, [batch], mesh, DEFAULT_RULES)
    tokens = batch["attention_mask"].sum()

    loss = importance.mlm_loss(model)
    global_batch = to_global(batch, mesh)
    with activation_rules(mesh, DEFAULT_RULES):
        f = jax.jit(lambda g: loss(params, g, global_batch, jax.random.key(0)))
        ones = jax.device_get(importance.ones_gates(cfg))
        eps = 1e-2
        rng = np.random.default_rng(0)
        picks = [("head", layer, h) for layer in range(2) for h in range(4)]
        picks += [("intermediate", int(la), int(i)) for la, i in zip(rng.integers(0, 2, 8), rng.integers(0, 64, 8))]
        picks += [("output", int(la), int(d)) for la, d in zip(rng.integers(0, 2, 8), rng.integers(0, 32, 8))]
        for kind, layer, unit in picks:

            def shifted(delta, kind=kind, layer=layer, unit=unit):
                gates = {k: v.copy() for k, v in ones.items()}
                gates[kind][layer, unit] += delta
                return float(f(gates))

            fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
            np.testing.assert_allclose(
                measured[kind][layer, unit] * tokens, abs(fd), rtol=2e-2, atol=1e-4, err_msg=f"{kind}[{layer}, {unit}]"
            )
    assert all(v.max() * tokens > 3e-2 for v in measured.values())  # the comparison is not between zeros


def test_kl_proxy_needs_active_dropout():
    """Two views without dropout are identical: KL and its gradient vanish, so the proxy must enable dropout."""
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    measured = {}
    for rate in (0.0, 0.1):
        cfg = CFG.replace(hidden_dropout_prob=rate, attention_probs_dropout_prob=rate)
        model, params = model_and_params(cfg, mesh)
        measured[rate] = importance.measure(importance.kl_loss(model), cfg, params, [mlm_batch(1)], mesh, DEFAULT_RULES)
    for kind in importance.UNITS:
        assert np.all(measured[0.1][kind] > 0)
        assert measured[0.0][kind].max() < 1e-6 * measured[0.1][kind].max()  # zero up to float rounding


def test_normalize_accumulate_and_files(tmp_path):
    raw = {
        "head": np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]),
        "intermediate": np.array([[0.0, 4.0]]),
        "output": np.array([[2.0, 0.0]]),
    }
    norm = importance.normalize(raw)
    z = np.tanh(np.sqrt(1.5))
    np.testing.assert_allclose(norm["head"], [[z, 0.0, z], [0.0, 0.0, 0.0]], rtol=1e-6)  # per layer
    np.testing.assert_allclose(norm["intermediate"], [[np.tanh(1.0), np.tanh(1.0)]], rtol=1e-6)
    other = {k: np.full_like(v, 0.5, dtype=np.float32) for k, v in norm.items()}
    acc = importance.accumulate(norm, other)
    np.testing.assert_allclose(acc["head"], [[z, 0.5, z], [0.5, 0.5, 0.5]], rtol=1e-6)
    importance.save(tmp_path / "imp.npz", acc)
    loaded = importance.load(tmp_path / "imp.npz")
    assert all(np.array_equal(loaded[k], acc[k]) for k in importance.UNITS)
    assert [p.name for p in tmp_path.iterdir()] == ["imp.npz"]


def zero_importance(cfg):
    return {k: np.zeros(v.shape, np.float32) for k, v in jax.device_get(importance.ones_gates(cfg)).items()}


def test_softmask_scales_exactly_the_units_slices():
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    _, params = model_and_params(CFG, mesh)
    rng = np.random.default_rng(0)
    grads = jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), jax.device_get(params))
    imp = zero_importance(CFG)
    imp["head"][1, 2] = 1.0
    imp["intermediate"][0, 5] = 0.75
    imp["output"][1, 7] = 1.0
    masked = softmask.apply(grads, softmask.unit_masks(imp, params))

    expected = jax.tree_util.tree_map(np.copy, grads)
    layers = expected["roberta"]["layers"]
    for m in ("query", "key", "value"):
        layers[m]["kernel"][1, :, 2, :] = 0.0
        layers[m]["bias"][1, 2, :] = 0.0
    layers["attention_output"]["kernel"][1, 2, :, :] = 0.0
    layers["intermediate"]["kernel"][0, :, 5] *= np.float32(0.25)
    layers["intermediate"]["bias"][0, 5] *= np.float32(0.25)
    layers["output"]["kernel"][1, :, 7] = 0.0
    layers["output"]["bias"][1, 7] = 0.0
    # Everything else (attention-output bias, LayerNorms, embeddings, LM head) is bit-for-bit unchanged.
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(masked), expected)


def run_das(mesh, past, steps=2):
    cfg = CFG.replace(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = RobertaForMaskedLM(cfg)
    tx, _ = make_optimizer(default_optim_config(), total_steps=10)
    state, shardings = create_train_state(model, tx, mesh, DEFAULT_RULES, seed=0)
    initial = jax.device_get(state.params)
    loss_sums, hooks = contrastive.das_objective(past, past, weight=0.5, temperature=0.05)(model, state.params)
    step = compile_train_step(StepSpec(loss_sums, tx, hooks=hooks), shardings, mesh, DEFAULT_RULES)
    losses = []
    for i in range(steps):
        state, metrics = step(state, to_global(mlm_batch(i), mesh))
        losses.append(float(metrics["loss"]))
    return losses, initial, jax.device_get(state.params), state.params


def test_every_stage_of_a_das_sequence_runs_one_program():
    """The importance (soft-masks and contrast gates) reaches the step as its `Fixed` argument: two stages' steps,
    under different importance, lower to one program (closed over, each stage compiled its own)."""
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    model = RobertaForMaskedLM(CFG)
    tx, _ = make_optimizer(default_optim_config(), total_steps=10)
    state, _ = create_train_state(model, tx, mesh, DEFAULT_RULES, seed=0)
    batch = to_global(mlm_batch(0), mesh)
    texts = []
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        past = {k: rng.uniform(0, 0.9, v.shape).astype(np.float32) for k, v in zero_importance(CFG).items()}
        loss_sums, hooks = contrastive.das_objective(past, past, weight=0.5, temperature=0.05)(model, state.params)
        spec = StepSpec(loss_sums, tx, hooks=hooks)
        with activation_rules(mesh, DEFAULT_RULES):
            texts.append(jax.jit(make_train_step(spec)).lower(state, batch, spec.arguments).as_text())
    assert texts[0] == texts[1]


@pytest.mark.slow
def test_masked_das_step_on_8_devices_matches_one_device_per_batch_shard():
    """DAS's contrast is in-batch and dropout is drawn per batch shard (make_train_step): the reference splits
    the batch as (2, 2, 2) does, 4 ways, with the masks and parameters whole on each device."""
    past = {
        k: np.random.default_rng(1).uniform(0, 0.9, v.shape).astype(np.float32) for k, v in zero_importance(CFG).items()
    }
    past["head"][0, 1] = 1.0  # head 1 of layer 0: fully protected
    ref_losses, initial, ref_params, _ = run_das(make_mesh((4, 1, 1), jax.devices()[:4]), past)
    losses, _, params, sharded = run_das(make_mesh((2, 2, 2), jax.devices()), past)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, ref_params)

    masks = softmask.shard_masks(softmask.unit_masks(past, sharded), sharded)
    kernel = sharded["roberta"]["layers"]["intermediate"]["kernel"]  # [layers, embed, mlp]: (None, fsdp, tensor)
    assert masks["intermediate"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
    assert kernel.sharding.spec[2] == "tensor"
    q0, q = initial["roberta"]["layers"]["query"]["kernel"], params["roberta"]["layers"]["query"]["kernel"]
    np.testing.assert_array_equal(q[0, :, 1], q0[0, :, 1])  # protected head: not moved, not even decayed
    assert np.abs(q[0, :, 0] - q0[0, :, 0]).max() > 1e-4  # its neighbour trained
    assert ref_losses[0] != ref_losses[1]


def test_info_nce_and_mean_pool_against_a_loop():
    rng = np.random.default_rng(0)
    a, p, n = (rng.normal(size=(4, 8)).astype(np.float32) for _ in range(3))
    unit = lambda x: x / np.linalg.norm(x)
    expected = []
    for i in range(4):
        sims = np.array([unit(a[i]) @ unit(c) for c in list(p) + list(n)]) / 0.05
        expected.append(-(sims[i] - np.log(np.exp(sims - sims.max()).sum()) - sims.max()))
    np.testing.assert_allclose(
        contrastive.info_nce(jnp.asarray(a), jnp.asarray(p), jnp.asarray(n), 0.05), np.mean(expected), rtol=1e-5
    )

    hidden = rng.normal(size=(2, 3, 4)).astype(np.float32)
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    pooled = np.asarray(contrastive.mean_pool(jnp.asarray(hidden), jnp.asarray(mask)))
    np.testing.assert_allclose(pooled[0], hidden[0, :2].mean(0), rtol=1e-6)  # padding ignored
    np.testing.assert_allclose(pooled[1], hidden[1].mean(0), rtol=1e-6)


def test_forgetting_rate_and_table():
    curve: dict[str, list[float | None]] = {"a": [0.8, 0.7, 0.6], "b": [None, 0.9, 0.95], "c": [None, None, 0.5]}
    assert forgetting(curve) == pytest.approx(((0.8 - 0.6) + (0.9 - 0.95)) / 2)
    records = [
        {"method": "ncl", "stage": s, "task": t, "seed": seed, "score": v + 0.01 * seed}
        for t, c in curve.items()
        for s, v in enumerate(c)
        if v is not None
        for seed in (0, 2)
    ]
    table = ContinualTable.from_records(records, ["ncl"], ["x", "y", "z"], list(curve))
    assert table.scores["ncl"]["a"] == pytest.approx([0.81, 0.71, 0.61])
    assert table.average("ncl", 2) == pytest.approx((0.61 + 0.96 + 0.51) / 3)
    assert table.forgetting("ncl") == pytest.approx(0.075)
    assert "| ncl | 3: z | 61.0 | 96.0 | 51.0 | 69.3 |" in table.to_markdown()
