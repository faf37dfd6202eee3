"""Continual baselines and ablations: EWC's Fisher and penalty, DER++'s buffer and loss, the DAS ablations' inputs,
BWT/FWT, and the step that takes a loss's fixed arrays as an argument."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_das import CFG, zero_importance
from test_engine import mlm_batch

from dontstop_jax import config_loader
from dontstop_jax.analysis.continual import ContinualTable, backward_transfer, forward_transfer
from dontstop_jax.das import ewc, importance, replay
from dontstop_jax.das.contrastive import das_objective
from dontstop_jax.engine import (
    DEFAULT_RULES,
    Fixed,
    StepSpec,
    compile_train_step,
    create_train_state,
    make_mesh,
    make_train_step,
    mlm_loss_sums,
    to_global,
)
from dontstop_jax.engine.sharding import activation_rules
from dontstop_jax.engine.state import TrainState
from dontstop_jax.errors import UserError
from dontstop_jax.model import RobertaForMaskedLM
from dontstop_jax.phases import continual
from dontstop_jax.phases.continual import METHODS, Continual, synthetic_config

MESH = make_mesh((1, 1, 1), jax.devices()[:1])
VOCAB = 128


class Linear:
    """A stand-in masked LM, quick to compile: logits = emb[token at the masked slot] @ w."""

    def apply(self, variables, input_ids, attention_mask, positions, deterministic=True, gates=None, rngs=None):
        p = variables["params"]
        return p["emb"][jnp.take_along_axis(input_ids, positions, 1)] @ p["w"]


def linear_params(seed):
    rng = np.random.default_rng(seed)
    return {"emb": rng.normal(size=(VOCAB, 8)).astype(np.float32), "w": rng.normal(size=(8, VOCAB)).astype(np.float32)}


def placed(tree):
    return jax.device_put(tree, NamedSharding(MESH, P()))


def mean_mlm(model, params, batch):
    total, aux = mlm_loss_sums(model)(params, batch, jax.random.key(0), True)
    return total / aux["weight"]


def test_ewc_fisher_and_penalty_against_numpy():
    model, params = Linear(), placed(linear_params(0))
    batches = [mlm_batch(i) for i in range(3)]
    fisher = jax.device_get(ewc.fisher(model, params, iter(batches), MESH, DEFAULT_RULES))
    grads = [jax.device_get(jax.grad(lambda p, b=b: mean_mlm(model, p, b))(linear_params(0))) for b in batches]
    expected = {k: np.mean([np.square(g[k]) for g in grads], 0) for k in fisher}
    for k in fisher:
        np.testing.assert_allclose(fisher[k], expected[k], rtol=1e-5, atol=1e-12)
    assert fisher["w"].min() >= 0 and fisher["w"].max() > 0
    np.testing.assert_allclose(
        ewc.mean([fisher, {k: 3 * v for k, v in fisher.items()}])["w"], 2 * fisher["w"], rtol=1e-6
    )

    theta, anchor = linear_params(0), linear_params(1)
    direct = sum(np.sum(fisher[k].astype(np.float64) * (theta[k] - anchor[k]) ** 2) for k in theta)
    assert float(ewc.penalty(theta, anchor, fisher)) == pytest.approx(direct, rel=1e-5)
    # The loss: MLM sum + weight x lam/2 x penalty, so the step's division leaves mean MLM + lam/2 x penalty.
    batch = mlm_batch(5)
    mlm_sum, aux = mlm_loss_sums(model)(theta, batch, jax.random.key(1), True)
    loss = ewc.ewc_loss_sums(model, 10.0)({"anchor": anchor, "fisher": fisher}, jnp.asarray(0))
    total, _ = loss(theta, batch, jax.random.key(1), True)
    assert float(total) == pytest.approx(float(mlm_sum) + float(aux["weight"]) * 5.0 * direct, rel=1e-5)


def test_fixed_arrays_reach_the_step_as_an_argument():
    """An EWC step with its arrays passed as `fixed`: the loss includes their penalty, and the program holds
    no copy of them (closed over, they would be baked in as constants)."""
    model, tx, lam = Linear(), optax.sgd(0.1), 2.0
    params = placed(linear_params(0))
    state = TrainState(
        step=placed(np.int32(0)),
        params=params,
        opt_state=placed(tx.init(linear_params(0))),
        rng=placed(jax.random.key_data(jax.random.key(0))),
    )
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    arrays = placed(
        {
            "anchor": linear_params(1),
            "fisher": {k: np.full(v.shape, 0.5, np.float32) for k, v in linear_params(0).items()},
        }
    )
    loss = ewc.ewc_loss_sums(model, lam)
    batch = to_global(mlm_batch(0), MESH)
    with activation_rules(MESH, DEFAULT_RULES):
        texts = [
            make.lower(state, batch, *extra).as_text()
            for make, extra in (
                (jax.jit(make_train_step(StepSpec(loss(arrays, jnp.asarray(0)), tx))), ()),
                (jax.jit(make_train_step(StepSpec(Fixed(loss, arrays), tx))), ({"fixed": arrays},)),
            )
        ]
    longest = [max(len(line) for line in t.splitlines()) for t in texts]
    assert longest[0] > 2 * 4 * VOCAB * 8 > longest[1]  # closed over, a 128x8 float32 array is 8192 hex digits
    spec = StepSpec(Fixed(loss, arrays), tx)
    step = compile_train_step(spec, shardings, MESH, DEFAULT_RULES)
    _, metrics = step(state, batch)
    penalty = sum(np.sum(0.5 * (linear_params(0)[k] - linear_params(1)[k]) ** 2) for k in ("emb", "w"))
    expected = float(mean_mlm(model, linear_params(0), mlm_batch(0))) + lam / 2 * penalty
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)


def test_derpp_buffer_sampling_fill_and_loss():
    rows = 13
    idx = [np.asarray(replay.replay_indices(jax.random.key(7), rows, 64)) for _ in range(2)]
    np.testing.assert_array_equal(idx[0], idx[1])  # a function of the key alone
    assert idx[0].min() >= 0 and idx[0].max() < rows and len(set(idx[0])) > 5  # bounded, and not constant
    assert not np.array_equal(idx[0], np.asarray(replay.replay_indices(jax.random.key(8), rows, 64)))

    domains = [{"input_ids": np.arange(10) + 100 * d, "logits": np.ones((10, 2)) * d} for d in range(3)]
    buf = replay.fill(domains, 8)  # shares 3, 3, 2: the first rows of each domain
    np.testing.assert_array_equal(buf["input_ids"], [0, 1, 2, 100, 101, 102, 200, 201])
    assert replay.fill(domains[:1], 8)["input_ids"].tolist() == list(range(8))

    model, params = Linear(), linear_params(0)
    recorded = replay.record(model, placed(linear_params(1)), iter([mlm_batch(1), mlm_batch(2)]), MESH, DEFAULT_RULES)
    assert recorded["logits"].shape == (16, 4, VOCAB) and recorded["input_ids"].shape == (16, 16)
    alpha, beta, batch, rng = 0.3, 0.5, mlm_batch(3), jax.random.key(4)
    with activation_rules(MESH, DEFAULT_RULES):
        total, aux = replay.derpp_loss_sums(model, alpha, beta, 6)(placed(recorded), jnp.asarray(0))(
            params, batch, rng, True
        )
    # Directly: the same two buffer samples (the loss's key split), MSE over the vocabulary at real slots.
    _, r_a, r_b, _, _ = jax.random.split(rng, 5)
    a = {k: v[np.asarray(replay.replay_indices(r_a, 16, 6))] for k, v in recorded.items()}
    b = {k: v[np.asarray(replay.replay_indices(r_b, 16, 6))] for k, v in recorded.items() if k != "logits"}
    logits = params["emb"][np.take_along_axis(a["input_ids"], a["mlm_positions"], 1)] @ params["w"]
    sq = np.mean((logits - np.asarray(a["logits"], np.float32)) ** 2, -1)
    mse = np.sum(sq * a["mlm_weights"]) / np.sum(a["mlm_weights"])
    mlm_sum, mlm_aux = mlm_loss_sums(model)(params, batch, rng, True)
    expected = float(mlm_sum) + float(mlm_aux["weight"]) * (alpha * mse + beta * float(mean_mlm(model, params, b)))
    assert mse > 0 and float(total) == pytest.approx(expected, rel=1e-4)
    assert float(aux["weight"]) == float(mlm_aux["weight"])


def test_das_objective_inputs_and_random_importance():
    model = RobertaForMaskedLM(CFG)
    params, _ = create_train_state(model, optax.identity(), MESH, DEFAULT_RULES, seed=0)
    params = params.params
    batch = mlm_batch(0)
    value = lambda loss: float(jax.jit(lambda p: loss(p, batch, jax.random.key(0), True)[0])(params))
    plain = value(mlm_loss_sums(model))
    past = {k: np.full(v.shape, 0.5, np.float32) for k, v in zero_importance(CFG).items()}
    for contrast, weight in ((None, 1.0), (past, 0.0)):  # no contrast: plain MLM, still soft-masked
        fixed, hooks = das_objective(past, contrast, weight, 0.05)(model, params)
        assert isinstance(fixed, Fixed) and hooks == {} and fixed.hooks is not None
        assert value(fixed.loss(fixed.arrays, jnp.asarray(0))) == pytest.approx(plain)
        assert set(fixed.hooks(fixed.arrays)) == {"grad_transform", "update_transform"}
    fixed, hooks = das_objective(None, past, 1.0, 0.05)(model, params)
    assert isinstance(fixed, Fixed) and hooks == {} and fixed.hooks is not None and fixed.hooks(fixed.arrays) == {}
    assert value(fixed.loss(fixed.arrays, jnp.asarray(0))) != pytest.approx(plain)
    loss, hooks = das_objective(None, None, 1.0, 0.05)(model, params)  # nothing to mask or contrast: plain MLM
    assert not isinstance(loss, Fixed) and hooks == {} and value(loss) == pytest.approx(plain)

    raw = {k: np.asarray(np.random.default_rng(0).uniform(size=v.shape), np.float32) for k, v in past.items()}
    shuffled = importance.shuffled(raw, (0, 1, 0))
    for k in importance.UNITS:  # each layer: the same values, other units
        np.testing.assert_array_equal(np.sort(shuffled[k], 1), np.sort(raw[k], 1))
        assert not np.array_equal(shuffled[k], raw[k])
        np.testing.assert_array_equal(importance.shuffled(raw, (0, 1, 0))[k], shuffled[k])


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    """A 2-domain recipe whose training and measuring are replaced by records of what they were given."""
    cfg = synthetic_config("tiny")
    cfg.workdir = str(tmp_path)
    cfg.domains = {"bio": [str(tmp_path / "bio.txt")], "cs": [str(tmp_path / "cs.txt")]}
    cfg.sequence = ["bio", "cs"]
    seen: dict[str, list] = {"pretrain": [], "das": []}
    monkeypatch.setattr(continual, "pretrain", lambda phase, objective: seen["pretrain"].append((phase, objective)))
    monkeypatch.setattr(continual, "das_objective", lambda *args: seen["das"].append(args))
    level = {"kl": 0.1, "mlm": 0.2}

    def fake_importance(self, init, phase, proxy, dropout=None):  # a different constant per (proxy, stage)
        kind = "kl" if proxy is importance.kl_loss else "mlm"
        level[kind] += 0.1
        return {k: np.full(v.shape, level[kind], np.float32) for k, v in zero_importance(CFG).items()}

    monkeypatch.setattr(Continual, "importance", fake_importance)
    return Continual(cfg), seen


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].train is Continual.das_stage])
def test_das_ablations_change_what_each_stage_gets(recipe, method):
    run, seen = recipe
    run.stages(method, "BASE")
    (mask1, contrast1, weight1, _), (mask2, contrast2, weight2, _) = seen["das"]
    head = lambda imp: None if imp is None else float(np.mean(imp["head"]))
    general, bio = 0.2, 0.3  # the fake KL and MLM importances
    expect = {  # (stage-1 mask, stage-1 contrast, stage-2 mask, stage-2 contrast)
        "das": (general, general, bio, bio),
        "das_no_contrast": (general, general, bio, bio),
        "das_no_general": (None, None, bio, bio),
        "das_past_contrast": (general, None, bio, bio),
    }
    if method == "das_random":  # constants permuted are the same constants: the values, on other units
        assert head(mask1) == pytest.approx(general) and head(mask2) == pytest.approx(bio)
    else:
        assert [head(x) for x in (mask1, contrast1, mask2, contrast2)] == pytest.approx(expect[method])
    assert weight1 == weight2 == (0.0 if method == "das_no_contrast" else 1.0)
    phases = [phase for phase, _ in seen["pretrain"]]
    assert [p.das.general for p in phases] == [method != "das_no_general"] * 2
    # Every ablation trains its own phases: none reuses another's workdir.
    other = Continual(run.cfg)
    seen["pretrain"].clear()
    other.stages("das", "BASE")
    if method != "das":
        assert not {p.workdir for p in phases} & {p.workdir for p, _ in seen["pretrain"]}


def test_regularised_methods_share_ncl_first_stage_and_set_their_objective(recipe):
    run, seen = recipe
    for method in ("ncl", "ewc", "derpp", "adapter_one"):
        run.stages(method, "BASE")
    (ncl1, _), (ncl2, _), (ewc1, _), (ewc2, ewc_obj), (derpp1, _), (derpp2, _), (ad1, _), (ad2, _) = seen["pretrain"]
    assert ncl1.workdir == ewc1.workdir == derpp1.workdir  # nothing to regularise on the first domain
    assert (ewc2.objective, ewc2.ewc.lam, derpp2.objective, derpp2.derpp.buffer_size) == ("ewc", 5000.0, "derpp", 200)
    assert ewc2.init == ncl1.workdir and ewc2.workdir != ncl2.workdir
    assert ad1.peft.method == ad2.peft.method == "houlsby" and ad1.init == ad2.init == "BASE"


def test_methods_and_fields_are_validated(tmp_path):
    cfg = synthetic_config("tiny")
    cfg.methods = ["das", "ewcc"]
    with pytest.raises(UserError, match=r"unknown continual methods \['ewcc'\]; choose from .*'derpp'"):
        Continual(cfg)
    for field, value in (("das.contrast", "pst"), ("derpp.alpha", -1.0), ("derpp.batch_size", 0)):
        with pytest.raises(UserError, match=field.replace(".", r"\.")):
            config_loader.finalize(synthetic_config("tiny"), [f"--config.{field}={value}"])


def test_bwt_and_fwt_against_a_score_matrix():
    # R[stage, task]: task i belongs to stage i's domain; NaN = not yet learned.
    R = np.array([[0.60, np.nan, np.nan], [0.50, 0.70, np.nan], [0.55, 0.65, 0.80]])
    before = {"t1": 0.52, "t2": 0.61}  # t1 after stage 0, t2 after stage 1 (before their domains)
    base = {"t0": 0.40, "t1": 0.50, "t2": 0.58}
    tasks = ["t0", "t1", "t2"]
    curve = {t: [None if np.isnan(x) else float(x) for x in R[:, i]] for i, t in enumerate(tasks)}
    bwt = np.mean([R[2, 0] - R[0, 0], R[2, 1] - R[1, 1]])
    fwt = np.mean([before["t1"] - base["t1"], before["t2"] - base["t2"]])
    assert backward_transfer(curve) == pytest.approx(bwt)
    assert forward_transfer({"t0": None, **before}, base) == pytest.approx(fwt)
    records = [
        {"method": "m", "stage": s, "task": t, "seed": seed, "score": v + 0.01 * seed, "when": "after"}
        for t, c in curve.items()
        for s, v in enumerate(c)
        if v is not None
        for seed in (0, 2)
    ]
    records += [
        {"method": "m", "stage": tasks.index(t) - 1, "task": t, "seed": 0, "score": v, "when": "before"}
        for t, v in before.items()
    ]
    records += [
        {"method": "base", "stage": -1, "task": t, "seed": 0, "score": v, "when": "base"} for t, v in base.items()
    ]
    table = ContinualTable.from_records(records, ["m"], ["x", "y", "z"], tasks)
    assert table.backward_transfer("m") == pytest.approx(bwt)  # the seed offsets cancel
    assert table.forward_transfer("m") == pytest.approx(fwt)
    assert table.scores["m"]["t1"] == pytest.approx([None, 0.71, 0.66])
    assert f"| m | {100 * (R[2].mean() + 0.01):.1f} | " in table.to_markdown()
    assert table.to_json()["fwt"]["m"] == pytest.approx(fwt)
