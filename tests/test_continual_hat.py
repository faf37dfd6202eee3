"""HAT and DEMix in the continual recipe: HAT's blocked gradients, annealed slope, compensation and sparsity
regulariser against direct computations; the stages' wiring (masks handed on, experts' frozen shared
weights); a tiny end-to-end run of both (a stage's own mask file, fresh embeddings, untouched experts)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_das import CFG, zero_importance
from test_engine import mlm_batch
from tiny_hf import save_tiny_roberta

from dontstop_jax.das import hat, importance
from dontstop_jax.engine import (
    DEFAULT_RULES,
    StepSpec,
    compile_train_step,
    create_train_state,
    make_mesh,
    mlm_loss_sums,
    to_global,
)
from dontstop_jax.engine.checkpoint import Checkpointer
from dontstop_jax.errors import UserError
from dontstop_jax.phases import continual
from dontstop_jax.phases.continual import EXPERT_SHARED, HAT_DOMAIN, HAT_MASKS, Continual, synthetic_config

MESH = make_mesh((1, 1, 1), jax.devices()[:1])
S_MAX, C = 400.0, 0.75


def sigmoid(x):
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for very negative x: sigmoid 0, as it should be
        return 1 / (1 + np.exp(-x))


def test_hat_blocks_the_units_past_domains_used():
    """One step of domain 1 under a past mask of exactly 1 on head 0 of layer 0 and intermediate unit 3 of
    layer 1: their slices (incoming weights, and the output kernel's row reading unit 3) do not move; their
    neighbours and the domain's own embeddings do."""
    model, tx = hat.HatMaskedLM(CFG, domain=1), optax.adam(1e-2)
    state, shardings = create_train_state(model, tx, MESH, DEFAULT_RULES, seed=0)
    past = zero_importance(CFG)
    past["head"][0, 0] = past["intermediate"][1, 3] = 1.0
    loss, hooks = hat.hat_objective(1, past, C, S_MAX, 10)(model, state.params)
    step = compile_train_step(
        StepSpec(loss, tx, hooks=hooks),
        shardings,
        MESH,
        DEFAULT_RULES,
        donate=False,
    )
    new, _ = step(state, to_global(mlm_batch(0), MESH))
    moved = jax.tree_util.tree_map(
        lambda a, b: np.abs(np.asarray(a) - np.asarray(b)), jax.device_get(new.params), jax.device_get(state.params)
    )
    d = moved["roberta"]["layers"]
    for module in ("query", "key", "value"):
        assert d[module]["kernel"][0, :, 0].max() == 0 and d[module]["kernel"][0, :, 1].max() > 0
        assert d[module]["bias"][0, 0].max() == 0 and d[module]["bias"][0, 1].max() > 0
    assert d["attention_output"]["kernel"][0, 0].max() == 0 and d["attention_output"]["kernel"][0, 1].max() > 0
    assert d["query"]["kernel"][1, :, 0].max() > 0  # head 0 of the other layer is free
    assert d["intermediate"]["kernel"][1, :, 3].max() == 0 and d["intermediate"]["kernel"][1, :, 2].max() > 0
    assert d["intermediate"]["bias"][1, 3] == 0 and d["intermediate"]["bias"][1, 2] > 0
    assert d["output"]["kernel"][1, 3].max() == 0 and d["output"]["kernel"][1, 2].max() > 0
    assert moved["hat1_head"].max() > 0 and moved["hat1_intermediate"].max() > 0


def test_anneal_compensation_and_regulariser_against_numpy():
    total = 7
    for step in range(total + 2):  # Serra et al. eq. 3 with b - 1 = step, B = total; held at s_max after
        expected = 1 / S_MAX + (S_MAX - 1 / S_MAX) * min(step / (total - 1), 1.0)
        assert float(hat.anneal(jnp.int32(step), total, S_MAX)) == pytest.approx(expected, rel=1e-6)
    assert float(hat.anneal(0, total, S_MAX)) == pytest.approx(1 / S_MAX)

    rng = np.random.default_rng(0)
    e = {k: rng.normal(size=(2, n)).astype(np.float32) * 3 for k, n in (("head", 4), ("intermediate", 64))}
    params = {hat.param_name(2, k): v for k, v in e.items()}
    s = 5.0
    masks = jax.device_get(hat.gates(params, 2, s, S_MAX))
    clipped = {k: np.clip(v, -6, 6) for k, v in e.items()}
    for k in hat.KINDS:
        np.testing.assert_allclose(masks[k], sigmoid(s * clipped[k]), rtol=1e-5)
    # The gradient of sum(mask) w.r.t. e: sigmoid' x s, times eq. 6's factor; 0 where e is clipped.
    grads = jax.grad(lambda p: sum(jnp.sum(m) for m in hat.gates(p, 2, s, S_MAX).values()))(params)
    for k in hat.KINDS:
        sig = sigmoid(s * clipped[k])
        factor = S_MAX * (np.cosh(np.clip(s * clipped[k], -50, 50)) + 1) / (s * (np.cosh(clipped[k]) + 1))
        expected = np.where(np.abs(e[k]) < 6, s * sig * (1 - sig) * factor, 0.0)
        np.testing.assert_allclose(np.asarray(grads[hat.param_name(2, k)]), expected, rtol=1e-4, atol=1e-6)

    past = {k: rng.uniform(size=v.shape).astype(np.float32) for k, v in masks.items()}
    direct = sum(np.sum(masks[k] * (1 - past[k])) for k in hat.KINDS) / sum(np.sum(1 - past[k]) for k in hat.KINDS)
    assert float(hat.regulariser(masks, past)) == pytest.approx(direct, rel=1e-5)

    final = hat.final_masks({**params, "roberta": {"layers": {"output": {"bias": np.zeros((2, 32))}}}}, 2, S_MAX)
    np.testing.assert_allclose(final["intermediate"], sigmoid(S_MAX * clipped["intermediate"]), rtol=1e-6)
    assert final["output"].shape == (2, 32) and not final["output"].any()


def test_hat_loss_is_mlm_under_the_gates_plus_c_times_the_regulariser():
    model = hat.HatMaskedLM(CFG, domain=0)
    state, _ = create_train_state(model, optax.identity(), MESH, DEFAULT_RULES, seed=0)
    loss, hooks = hat.hat_objective(0, None, C, S_MAX, 4)(model, state.params)
    assert hooks == {}
    batch, step = mlm_batch(1), jnp.int32(2)
    total, aux = loss.loss(loss.arrays, step)(state.params, batch, jax.random.key(0), True)
    masks = hat.gates(state.params, 0, hat.anneal(step, 4, S_MAX), S_MAX)
    mlm, mlm_aux = mlm_loss_sums(model, masks)(state.params, batch, jax.random.key(0), True)
    reg = np.mean(np.concatenate([np.ravel(masks[k]) for k in hat.KINDS]))  # no past: R = mean mask
    assert float(total) == pytest.approx(float(mlm) + float(mlm_aux["weight"]) * C * reg, rel=1e-5)


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    """A 2-domain recipe whose training is replaced by a record of what it was given."""
    cfg = synthetic_config("tiny")
    cfg.workdir = str(tmp_path)
    cfg.domains = {"bio": [str(tmp_path / "bio.txt")], "cs": [str(tmp_path / "cs.txt")]}
    cfg.sequence = ["bio", "cs"]
    seen = []
    monkeypatch.setattr(continual, "pretrain", lambda phase, objective, module=None: seen.append((phase, module)))
    return Continual(cfg), seen


def test_stages_hand_on_hat_masks_and_freeze_demix_shared_weights(recipe, monkeypatch):
    run, seen = recipe
    own = iter([0.25, 0.5])
    monkeypatch.setattr(continual.sources, "resolve", lambda init: type("Source", (), {"params": None}))
    monkeypatch.setattr(
        continual.hat,
        "final_masks",
        lambda params, domain, s_max: {
            k: np.full(v.shape, next(own) if k == "head" else 0.0, np.float32) for k, v in zero_importance(CFG).items()
        },
    )
    given = []
    monkeypatch.setattr(continual.hat, "hat_objective", lambda *args: given.append(args))
    first, second = run.stages("hat", "BASE")
    assert [a[0] for a in given] == [0, 1] and given[0][1] is None
    assert float(np.mean(given[1][1]["head"])) == 0.25  # stage 2 is blocked by stage 1's mask
    assert given[1][2:] == (0.75, 400.0, run.cfg.dapt.train.steps)
    assert [m.keywords["domain"] for _, m in seen] == [0, 1] and seen[1][0].init == first
    assert float(np.mean(importance.load(continual.files.path(second) / HAT_DOMAIN)["head"])) == 0.5
    assert float(np.mean(importance.load(continual.files.path(second) / HAT_MASKS)["head"])) == 0.5  # max(.25, .5)
    assert seen[0][0].objective == "hat" and seen[0][0].hat.c == 0.75

    seen.clear()
    experts = run.stages("demix", "BASE")
    assert [p.init for p, _ in seen] == ["BASE", experts[0]]  # each expert starts from the previous one
    assert all(p.frozen == list(EXPERT_SHARED) and p.objective == "mlm" for p, _ in seen)

    run.cfg.dapt.train.steps = None
    with pytest.raises(UserError, match="dapt.train.steps"):
        run.stages("hat", "BASE")


def test_unknown_method_and_bad_hat_fields_are_user_errors():
    cfg = synthetic_config("tiny")
    cfg.methods = ["hat", "demixx"]
    with pytest.raises(UserError, match=r"unknown continual methods \['demixx'\]; choose from .*'demix'"):
        Continual(cfg)
    from dontstop_jax import config_loader

    for field, value in (("hat.s_max", 0.5), ("hat.c", -1.0)):
        with pytest.raises(UserError, match=field.replace(".", r"\.")):
            config_loader.finalize(synthetic_config("tiny"), [f"--config.{field}={value}"])


@pytest.mark.slow
def test_hat_and_demix_end_to_end(tmp_path, tiny_tokenizer_dir):
    """Two 2-step stages of each on a tiny Hugging Face base: HAT's stages save their masks and each starts its
    domain's embeddings afresh; DEMix's second stage leaves the first domain's expert bit-identical and
    changes nothing but its own FFNs."""
    base = str(save_tiny_roberta(tmp_path / "base", tiny_tokenizer_dir))
    cfg = synthetic_config("tiny")
    cfg.workdir, cfg.base = str(tmp_path / "run"), base
    for name, words in (("bio", "protein binds cell gene"), ("cs", "graph node edge tree")):
        rng = np.random.default_rng(len(name))
        (tmp_path / f"{name}.txt").write_text("\n".join(" ".join(rng.choice(words.split(), 16)) for _ in range(40)))
    cfg.domains = {d: [str(tmp_path / f"{d}.txt")] for d in ("bio", "cs")}
    cfg.sequence = ["bio", "cs"]
    cfg.dapt.data.max_seq_length = 32
    cfg.dapt.train.update(steps=2, batch_size=8, accum_steps=1)
    run = Continual(cfg)
    read = lambda workdir: Checkpointer(continual.files.path(workdir) / "checkpoints", read_only=True).read()[2]

    hat1, hat2 = run.stages("hat", base)
    p1, p2 = read(hat1), read(hat2)
    assert set(p2) == {"roberta", "lm_head", "hat1_head", "hat1_intermediate"} and "hat0_head" in p1
    assert not np.allclose(p2["hat1_head"], p1["hat0_head"])  # a fresh embedding, not the parent's
    own = [importance.load(continual.files.path(w) / HAT_DOMAIN) for w in (hat1, hat2)]
    np.testing.assert_allclose(own[0]["head"], hat.final_masks(p1, 0, S_MAX)["head"])
    accumulated = importance.load(continual.files.path(hat2) / HAT_MASKS)
    for k in hat.KINDS:
        np.testing.assert_array_equal(accumulated[k], np.maximum(own[0][k], own[1][k]))

    cfg.sequence = ["bio"]
    (demix1,) = run.stages("demix", base)
    before = read(demix1)
    cfg.sequence = ["bio", "cs"]
    assert run.stages("demix", base)[0] == demix1  # reused; only the second stage trains now
    demix2 = run.stages("demix", base)[1]
    after, second = read(demix1), read(demix2)
    jax.tree_util.tree_map(np.testing.assert_array_equal, after, before)
    ffn = ("intermediate", "output")
    for path, leaf in jax.tree_util.tree_flatten_with_path(second)[0]:
        name = "/".join(str(k.key) for k in path)
        first = np.asarray(_at(before, path))
        if any(name.startswith(f"roberta/layers/{m}/") for m in ffn):
            assert not np.array_equal(leaf, first), name
        else:
            np.testing.assert_array_equal(leaf, first, err_msg=name)


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree
