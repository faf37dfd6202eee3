"""Sharded, jitted train steps: identical results on every mesh; accumulation equals a big batch."""

import functools

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from dontstop_jax.engine import (
    DEFAULT_RULES,
    StepSpec,
    abstract_state,
    batch_sharding,
    classification_loss_sums,
    compile_eval_step,
    compile_train_step,
    create_train_state,
    default_optim_config,
    make_eval_step,
    make_mesh,
    make_optimizer,
    mlm_loss_sums,
    state_shardings,
    to_global,
)
from dontstop_jax.engine.optim import weight_decay_mask
from dontstop_jax.engine.sharding import activation_rules, check_batch_size, resolve_mesh_shape
from dontstop_jax.errors import UserError
from dontstop_jax.model import RobertaForMaskedLM, RobertaForSequenceClassification, init_params, tiny_config

CFG = tiny_config(
    vocab_size=128, hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=34
)
SEQ, SLOTS = 16, 4


def mlm_batch(seed, batch=8):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, CFG.vocab_size, (batch, SEQ)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 0, 2
    ids[1, 10:] = CFG.pad_token_id
    positions = np.stack([rng.choice(np.arange(1, 9), SLOTS, replace=False) for _ in range(batch)]).astype(np.int32)
    weights = np.ones((batch, SLOTS), np.float32)
    weights[:, -1] = 0.0  # an unused slot
    targets = np.take_along_axis(ids, positions, 1)
    masked = ids.copy()
    np.put_along_axis(masked, positions, 4, 1)
    return {
        "input_ids": masked,
        "attention_mask": (ids != 1).astype(np.int32),
        "mlm_positions": positions,
        "mlm_ids": targets,
        "mlm_weights": weights,
    }


def run_mlm(mesh_shape, devices, steps=3, accum=1, cfg=CFG, seed=0):
    mesh = make_mesh(mesh_shape, devices)
    model = RobertaForMaskedLM(cfg)
    tx, schedule = make_optimizer(default_optim_config(), total_steps=10)
    state, shardings = create_train_state(model, tx, mesh, DEFAULT_RULES, seed=seed)
    step = compile_train_step(
        StepSpec(mlm_loss_sums(model), tx, accum_steps=accum, schedule=schedule),
        shardings,
        mesh,
        DEFAULT_RULES,
    )
    losses = []
    for i in range(steps):
        state, metrics = step(state, to_global(mlm_batch(i), mesh))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state


DETERMINISTIC = CFG.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@functools.cache
def one_device_reference():
    losses, params, _ = run_mlm((1, 1, 1), jax.devices()[:1], cfg=DETERMINISTIC)
    return losses, params


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)])
def test_every_mesh_matches_one_device(mesh_shape):
    """(2,2,2) once caught an XLA layout that computed wrong gradients (see LMHead in model/roberta.py)."""
    ref_losses, ref_params = one_device_reference()
    losses, params, state = run_mlm(mesh_shape, jax.devices(), cfg=DETERMINISTIC)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, ref_params)
    assert ref_losses[-1] != ref_losses[0]  # the model really trained (lr > 0)


def test_dropout_follows_the_batch_split_not_the_parameter_layout():
    """Each batch shard draws its own dropout masks (make_train_step), so meshes with the same data x fsdp
    split train alike with dropout on, whatever their FSDP and tensor layout."""
    losses, params, _ = run_mlm((2, 2, 2), jax.devices())
    ref_losses, ref_params, _ = run_mlm((4, 1, 1), jax.devices()[:4])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, ref_params)
    assert losses != one_device_reference()[0]  # dropout is really on (without it every mesh trains alike)


def test_parameters_are_really_sharded():
    _, _, state = run_mlm((2, 2, 2), jax.devices(), steps=1)
    kernel = state.params["roberta"]["layers"]["intermediate"]["kernel"]  # [layers, embed, mlp]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (2, 16, 32)
    mu = state.opt_state[1][0].mu["roberta"]["layers"]["intermediate"]["kernel"]  # Adam moments follow params
    assert mu.sharding.spec == kernel.sharding.spec


def test_accumulation_equals_one_big_batch():
    cfg = DETERMINISTIC
    big, big_params, _ = run_mlm((2, 2, 1), jax.devices()[:4], cfg=cfg, accum=1)
    acc, acc_params, _ = run_mlm((2, 2, 1), jax.devices()[:4], cfg=cfg, accum=2)
    np.testing.assert_allclose(acc, big, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), acc_params, big_params)


def test_classification_step_learns_and_evaluates():
    mesh = make_mesh((4, 2, 1), jax.devices())
    model = RobertaForSequenceClassification(CFG, num_labels=2)
    tx, _ = make_optimizer(ConfigDict(dict(default_optim_config(), learning_rate=3e-3, warmup_fraction=0.0)), 40)
    state, shardings = create_train_state(model, tx, mesh, DEFAULT_RULES, seed=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, CFG.vocab_size, (16, SEQ)).astype(np.int32)
    labels = (rng.random(16) < 0.5).astype(np.int32)
    ids[:, 1] = np.where(labels == 1, 7, 8)  # the label is written in token 1
    batch = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "labels": labels,
        "example_weights": np.ones(16, np.float32),
    }
    step = compile_train_step(StepSpec(classification_loss_sums(model), tx), shardings, mesh, DEFAULT_RULES)
    evaluate = compile_eval_step(make_eval_step(classification_loss_sums(model)), shardings.params, mesh, DEFAULT_RULES)
    before = evaluate(state.params, to_global(batch, mesh))
    for _ in range(40):
        state, _ = step(state, to_global(batch, mesh))
    after = evaluate(state.params, to_global(batch, mesh))
    assert float(after["loss_sum"]) < 0.2 * float(before["loss_sum"])
    assert float(after["correct"]) == 16.0


def test_pretrained_params_replace_random_ones_and_new_head_is_fresh():
    mesh = make_mesh((-1, 1, 1), jax.devices()[:2])
    mlm = RobertaForMaskedLM(CFG)
    tx, _ = make_optimizer(default_optim_config(), 10)
    src, _ = create_train_state(mlm, tx, mesh, DEFAULT_RULES, seed=1)
    cls = RobertaForSequenceClassification(CFG, num_labels=3)
    dst, _ = create_train_state(cls, tx, mesh, DEFAULT_RULES, seed=2, pretrained=jax.device_get(src.params))
    np.testing.assert_array_equal(
        dst.params["roberta"]["layers"]["query"]["kernel"], src.params["roberta"]["layers"]["query"]["kernel"]
    )
    assert dst.params["classifier"]["out_proj"]["kernel"].shape == (CFG.hidden_size, 3)


def test_weight_decay_skips_biases_and_layer_norms():
    mask = weight_decay_mask(
        {"dense": {"kernel": 1, "bias": 1}, "LayerNorm": {"scale": 1, "bias": 1}, "word_embeddings": {"embedding": 1}}
    )
    assert mask == {
        "dense": {"kernel": True, "bias": False},
        "LayerNorm": {"scale": False, "bias": False},
        "word_embeddings": {"embedding": True},
    }


def test_schedule_numbers_are_an_argument_and_give_optax_rates():
    """Two schedules lower to one program (their numbers are the step's argument, so phases that differ only in
    them share a compiled step), and the rates are optax's warm-up + linear decay bit for bit, as arguments or
    as constants (a division by a constant compiles to a product with its reciprocal)."""
    mesh, model = make_mesh((1, 1, 1), jax.devices()[:1]), RobertaForMaskedLM(CFG)
    rows = batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rows) for k, v in mlm_batch(0).items()}
    texts = []
    for peak, steps in ((1e-3, 10), (5e-4, 37)):
        tx, schedule = make_optimizer(ConfigDict(dict(default_optim_config(), learning_rate=peak)), steps)
        shardings = state_shardings(model, tx, mesh, DEFAULT_RULES)
        spec = StepSpec(mlm_loss_sums(model), tx, schedule=schedule)
        step = compile_train_step(spec, shardings, mesh, DEFAULT_RULES)
        with activation_rules(mesh, DEFAULT_RULES):
            lowered = step.__wrapped__.lower(abstract_state(shardings, model, tx), batch, spec.arguments)  # type: ignore[attr-defined]
        texts.append(lowered.as_text())
        warmup = max(1, round(0.06 * steps))
        linear = [optax.linear_schedule(0.0, peak, warmup), optax.linear_schedule(peak, 0.0, steps - warmup)]
        expected = jax.jit(optax.join_schedules(linear, [warmup]))
        as_argument, as_constant = jax.jit(schedule), jax.jit(functools.partial(schedule, values=None))
        for count in map(np.int32, range(steps + 2)):
            rate = expected(count)
            assert as_argument(count, schedule.values) == rate and as_constant(count) == rate, (peak, count)
    assert texts[0] == texts[1]


def test_frozen_parameters_get_no_optimizer_state_and_do_not_move():
    params = {"a": {"kernel": np.ones((3, 3), np.float32)}, "b": {"kernel": np.ones((3, 3), np.float32)}}
    tx, _ = make_optimizer(
        default_optim_config(), 10, trainable=lambda p: {"a": {"kernel": True}, "b": {"kernel": False}}
    )
    opt_state = tx.init(params)
    sizes = sum(x.size for x in jax.tree_util.tree_leaves(opt_state) if hasattr(x, "size"))
    assert sizes < 2 * 9 + 5  # Adam moments for `a` only (plus counters)
    grads = jax.tree_util.tree_map(np.ones_like, params)
    for _ in range(3):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    assert np.all(np.asarray(params["b"]["kernel"]) == 1.0) and np.all(np.asarray(params["a"]["kernel"]) != 1.0)


def test_mesh_errors_are_clear():
    assert resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
    with pytest.raises(UserError, match="cannot fit 8 devices"):
        resolve_mesh_shape((-1, 3, 1), 8)
    with pytest.raises(UserError, match="needs 16 devices"):
        resolve_mesh_shape((4, 4, 1), 8)
    mesh = make_mesh((2, 2, 2), jax.devices())
    with pytest.raises(UserError, match="not divisible by the data-parallel size 4"):
        check_batch_size(10, mesh)
    with pytest.raises(UserError, match="16 is not divisible by train.accum_steps 32"):
        check_batch_size(16, mesh, "train.batch_size", accum_steps=32)
    with pytest.raises(UserError, match="= 2 rows per micro-batch .* use a batch size that is a multiple of 32"):
        check_batch_size(16, mesh, "train.batch_size", accum_steps=8)
    check_batch_size(32, mesh, "train.batch_size", accum_steps=8)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_rematerialisation_changes_memory_not_results(remat):
    cfg = CFG.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base, base_params, _ = run_mlm((1, 1, 1), jax.devices()[:1], steps=2, cfg=cfg)
    rem, rem_params, _ = run_mlm((1, 1, 1), jax.devices()[:1], steps=2, cfg=cfg.replace(remat=remat))
    np.testing.assert_allclose(rem, base, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), rem_params, base_params)


def test_bfloat16_compute_keeps_float32_parameters_and_close_loss():
    cfg = CFG.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    f32, _, _ = run_mlm((1, 1, 1), jax.devices()[:1], steps=1, cfg=cfg)
    bf16, params, _ = run_mlm((1, 1, 1), jax.devices()[:1], steps=1, cfg=cfg.replace(dtype="bfloat16"))
    assert params["roberta"]["layers"]["query"]["kernel"].dtype == np.float32
    assert abs(bf16[0] - f32[0]) < 0.05 * f32[0]


def test_chain_hooks_applies_each_source_in_turn():
    from dontstop_jax.engine import chain_hooks

    double, add_one, halve = (lambda t: t * 2), (lambda t: t + 1), (lambda t: t / 2)
    hooks = chain_hooks({"grad_transform": double}, {}, {"grad_transform": add_one, "update_transform": halve})
    assert hooks["grad_transform"](3.0) == 7.0  # add_one(double(3))
    assert hooks["update_transform"](3.0) == 1.5
    assert chain_hooks({}, {"grad_transform": None}) == {}  # type: ignore[typeddict-item]  # None on purpose


def test_vocabulary_padding_changes_neither_loss_nor_gradients():
    """100 real ids in a 128-row table vs the same weights in a 100-row table: the same loss, accuracy and
    gradients on the real rows; the padding rows get no gradient, so they stay zero through training."""
    padded_cfg = CFG.replace(vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    plain_cfg = padded_cfg.replace(vocab_pad_multiple=1)
    assert (padded_cfg.padded_vocab_size, plain_cfg.padded_vocab_size) == (128, 100)
    padded = nn.unbox(init_params(RobertaForMaskedLM(padded_cfg), jax.random.key(0)))
    word = padded["roberta"]["embeddings"]["word_embeddings"]["embedding"]
    assert word.shape == (128, 32) and not np.asarray(word[100:]).any()  # padding rows start at zero
    cut = lambda t: jax.tree_util.tree_map_with_path(
        lambda p, x: x[:100] if p[-1].key in ("embedding", "bias") and x.shape[:1] == (128,) else x, t
    )
    batch = mlm_batch(0)
    batch["mlm_ids"] = np.minimum(batch["mlm_ids"], 99)
    batch["input_ids"] = np.minimum(batch["input_ids"], 99)
    rng = jax.random.key(1)
    grad = lambda cfg, p: jax.value_and_grad(mlm_loss_sums(RobertaForMaskedLM(cfg)), has_aux=True)(p, batch, rng, True)
    (loss_p, aux_p), grads_p = grad(padded_cfg, padded)
    (loss_u, aux_u), grads_u = grad(plain_cfg, cut(padded))
    np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-6)
    assert float(aux_p["correct"]) == float(aux_u["correct"])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), cut(grads_p), grads_u)
    assert not np.asarray(grads_p["roberta"]["embeddings"]["word_embeddings"]["embedding"][100:]).any()
    assert not np.asarray(grads_p["lm_head"]["bias"][100:]).any()
    logits = RobertaForMaskedLM(padded_cfg).apply({"params": padded}, batch["input_ids"], batch["attention_mask"])
    assert np.all(np.asarray(jax.nn.softmax(logits, -1))[..., 100:] == 0.0)  # padding ids are never predicted
