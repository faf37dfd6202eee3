"""Behavioural fine-tuning (phases/behavioral.py, engine/multitask.py): the multi-task loss against CE + gamma x MLM
computed directly, gamma 0 against plain fine-tuning bit for bit, the intermediate-task start (the target's
encoder is the intermediate task's fine-tuned one, its head fresh) and the grid's intermediate / multitask rows."""

from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dontstop_jax import config_loader
from dontstop_jax.engine import StepSpec, make_mesh, make_train_step
from dontstop_jax.engine.checkpoint import Checkpointer
from dontstop_jax.engine.multitask import mlm_weights
from dontstop_jax.engine.state import TrainState
from dontstop_jax.engine.steps import Fixed, classification_loss_sums
from dontstop_jax.errors import UserError
from dontstop_jax.model import RobertaForMaskedLM, RobertaForSequenceClassification, init_params, tiny_config
from dontstop_jax.phases import finetune as finetune_phase
from dontstop_jax.phases.behavioral import Multitask
from dontstop_jax.phases.defaults import finetune_config
from dontstop_jax.phases.grid import Grid
from dontstop_jax.train import source as sources

LABELS, PER_EPOCH = 3, 2
CFG = tiny_config(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=34,
    hidden_dropout_prob=0.1,
)
SPECIAL = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}


def multitask(**fields) -> Multitask:
    cfg = config_loader.set_fields(finetune_config(), {"multitask.method": "mlm", "train.batch_size": 4, **fields})
    return Multitask(cfg, SPECIAL, CFG.vocab_size, epochs=5, steps_per_epoch=PER_EPOCH)


def batch(seed=0, n=4, seq=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, CFG.vocab_size, (n, seq)).astype(np.int32)
    ids[:, 0], ids[:, -1], ids[1, 8:] = 0, 2, 1
    return {
        "input_ids": ids,
        "attention_mask": (ids != 1).astype(np.int32),
        "labels": rng.integers(0, LABELS, n).astype(np.int32),
        "example_weights": np.array([1, 1, 1, 0], np.float32),
    }


@functools.cache
def params():
    model = multitask().model(CFG, LABELS, None)
    return jax.device_get(jax.jit(lambda key: nn.unbox(init_params(model, key)))(jax.random.key(0)))


def placed(tree):
    """`tree` replicated on a one-axis mesh, as the Trainer's parameters are (the objective reads their mesh)."""
    return jax.device_put(tree, jax.sharding.NamedSharding(make_mesh((-1, 1, 1)), jax.sharding.PartitionSpec()))


def np_nll(logits, targets):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, targets[..., None], -1)[..., 0]


def test_gamma_anneals_geometrically_per_epoch_then_stays():
    cfg = finetune_config().multitask
    cfg.update(mlm_weight=0.4, mlm_weight_end=0.1, anneal_epochs=3)
    np.testing.assert_allclose(mlm_weights(cfg, 5), [0.4, 0.2, 0.1, 0.1, 0.1], rtol=1e-6)
    default = mlm_weights(finetune_config().multitask, 20)  # the paper's exp(linspace(-1.6, -2.3, 15))
    np.testing.assert_allclose(default[:15], np.exp(np.linspace(np.log(0.2), np.log(0.1), 15)), rtol=1e-6)
    assert default[15:].tolist() == [default[14]] * 5
    cfg.update(mlm_weight=0.0)
    with pytest.raises(UserError, match="needs both > 0; set them equal"):
        mlm_weights(cfg, 5)


def test_masked_copy_is_seeded_by_step_and_row_and_skips_filler_rows():
    b = batch()
    (first,) = multitask().batches(iter([b]), first_step=3)
    (again,) = multitask().batches(iter([b]), first_step=3)
    (other,) = multitask().batches(iter([b]), first_step=4)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["mlm_input_ids"], other["mlm_input_ids"])
    assert np.array_equal(first["input_ids"], b["input_ids"])  # the task loss reads the text unmasked
    w = first["mlm_weights"]
    assert w[3].sum() == 0 and np.all(w[:3].sum(1) >= 1)  # the filler row masks nothing
    rows, slots = np.nonzero(w)
    positions = first["mlm_positions"][rows, slots]
    assert np.array_equal(first["mlm_ids"][rows, slots], b["input_ids"][rows, positions])
    assert not np.any(np.isin(b["input_ids"][rows, positions], list(SPECIAL.values())))


def test_multitask_loss_is_ce_plus_gamma_times_mlm_computed_directly():
    task = multitask(**{"multitask.mlm_weight": 0.4, "multitask.mlm_weight_end": 0.1, "multitask.anneal_epochs": 3})
    (b,) = task.batches(iter([batch(1)]), first_step=3)
    fixed = task.objective(None)(task.model(CFG, LABELS, None), placed(params()))[0]
    assert isinstance(fixed, Fixed)
    build, gammas = fixed.loss, task.gammas
    step = 3  # epoch 1 of PER_EPOCH-step epochs: gamma 0.2
    loss_sum, aux = jax.jit(lambda p, b: build(gammas, jnp.asarray(step, jnp.int32))(p, b, jax.random.key(0), True))(
        params(), b
    )
    # Directly: the classifier and the masked LM, each with its own part of the parameters, and NumPy losses.
    p = params()
    logits = np.asarray(
        jax.jit(RobertaForSequenceClassification(CFG, LABELS).apply)(
            {"params": {k: p[k] for k in ("roberta", "classifier")}}, b["input_ids"], b["attention_mask"]
        ),
        np.float64,
    )
    w = b["example_weights"]
    ce = np.sum(np_nll(logits, b["labels"]) * w) / w.sum()
    vocab = np.asarray(
        jax.jit(RobertaForMaskedLM(CFG).apply)(
            {"params": {k: p[k] for k in ("roberta", "lm_head")}},
            b["mlm_input_ids"],
            b["attention_mask"],
            b["mlm_positions"],
        ),
        np.float64,
    )[..., : CFG.vocab_size]
    mw = b["mlm_weights"]
    mlm = np.sum(np_nll(vocab, b["mlm_ids"]) * mw) / mw.sum()
    assert float(aux["weight"]) == 3
    np.testing.assert_allclose(float(loss_sum) / 3, ce + 0.2 * mlm, rtol=1e-5)
    assert abs(0.2 * mlm) > 0.1  # the MLM term is a real part of the loss


@pytest.mark.xla_defaults  # bit for bit: two programs, compiled as real runs compile them
def test_gamma_zero_trains_exactly_as_plain_fine_tuning():
    """One dropout-on train step of the two-head model with gamma 0 gives the plain classifier's step bit for
    bit (its encoder and head; the LM head only moves by weight decay)."""
    task = multitask(**{"multitask.mlm_weight": 0.0, "multitask.mlm_weight_end": 0.0})
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    (b,) = task.batches(iter([batch(2)]), first_step=0)
    plain_b = {k: b[k] for k in ("input_ids", "attention_mask", "labels", "example_weights")}

    def one_step(loss, p, data):
        state = TrainState(
            step=jnp.int32(0), params=p, opt_state=tx.init(p), rng=jax.random.key_data(jax.random.key(5))
        )
        spec = StepSpec(loss, tx)
        return jax.device_get(jax.jit(make_train_step(spec))(state, data, spec.arguments))

    two = task.objective(None)(task.model(CFG, LABELS, None), placed(params()))[0]
    assert isinstance(two, Fixed)
    (after, metrics) = one_step(two, params(), b)
    plain_params = {k: params()[k] for k in ("roberta", "classifier")}
    (plain, plain_metrics) = one_step(
        classification_loss_sums(RobertaForSequenceClassification(CFG, LABELS)), plain_params, plain_b
    )
    for k in ("roberta", "classifier"):
        jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(x, y), after.params[k], plain.params[k])
    assert metrics["loss"] == plain_metrics["loss"] and metrics["grad_norm"] == plain_metrics["grad_norm"]
    assert (
        np.abs(after.params["classifier"]["dense"]["kernel"] - plain_params["classifier"]["dense"]["kernel"]).max()
        > 1e-4
    )  # the step did train


@pytest.mark.parametrize(
    "value, match", [(None, "intermediate_from=''"), ("b", "intermediate_from='b'"), ("zz", "intermediate_from='zz'")]
)
def test_intermediate_from_must_name_another_task_of_the_grid(value, match):
    task = dict(
        path="x", metric="macro_f1", text_field="text", label_field="label", irrelevant_domain="cs", domain="bio"
    )
    cfg = _grid_config(
        ["intermediate"],
        a=dict(task, intermediate_from="b"),
        b=dict(task, **({} if value is None else {"intermediate_from": value})),
    )
    with pytest.raises(
        UserError,
        match=match + ": the intermediate variants fine-tune on another task of the "
        r"grid before b; set it to one of \['a'\]",
    ):
        Grid(cfg)


def test_misspelled_variant_and_multitask_method_are_errors():
    task = dict(path="x", metric="macro_f1", domain="bio", irrelevant_domain="cs")
    with pytest.raises(UserError, match=r"unknown variants \['multitsk'\]; choose from .*'multitask'"):
        Grid(_grid_config(["multitsk"], a=task))
    with pytest.raises(UserError, match="multitask.method='aux' must be one of none, mlm"):
        config_loader.load("configs/finetune.py:chemprot", ["--config.multitask.method=aux"])
    with pytest.raises(UserError, match="has no field 'mlm_weigth'"):
        config_loader.load("configs/finetune.py:chemprot", ["--config.multitask.mlm_weigth=0.1"])


def _grid_config(variants, **tasks):
    return config_loader.load(
        "configs/grid.py:paper",
        [
            f"--config.tasks={tasks!r}",
            "--config.domains={'bio': ['c.txt'], 'cs': ['d.txt']}",
            f"--config.variants={variants!r}",
        ],
    )


def test_grid_intermediate_and_multitask_rows(tmp_path, monkeypatch, tiny_tokenizer_dir):
    """The grid's plan with its phases stubbed: b's intermediate rows (every seed) start from a's fine-tune of
    the first seed, the very phase of a's baseline row, with a fresh head; multitask rows start from the base
    with the auxiliary MLM on; dapt_intermediate's a fine-tune starts from b's domain DAPT."""
    from tiny_hf import save_tiny_roberta, write_biomed_data

    from dontstop_jax.phases import grid as grid_module

    write_biomed_data(tmp_path / "corpus", tmp_path / "a", corpus_docs=10)
    write_biomed_data(tmp_path / "corpus2", tmp_path / "b", corpus_docs=20)
    base = str(save_tiny_roberta(tmp_path / "base", tiny_tokenizer_dir))
    tuned, pretrained = {}, []

    def finetune(phase):
        tuned[phase.workdir] = phase
        return {"dev": {"macro_f1": 0.5}, "test": {"macro_f1": 0.5}}

    monkeypatch.setattr(grid_module, "pretrain", lambda phase: pretrained.append(phase.workdir))
    monkeypatch.setattr(grid_module, "finetune", finetune)
    task = dict(metric="macro_f1", text_field="text", label_field="label", irrelevant_domain="cs", domain="bio")
    cfg = _grid_config(
        ["baseline", "intermediate", "dapt_intermediate", "multitask"],
        a=dict(task, path=str(tmp_path / "a"), intermediate_from="b"),
        b=dict(task, path=str(tmp_path / "b"), intermediate_from="a"),
    )
    cfg.unlock()
    cfg.update(dict(workdir=str(tmp_path / "grid"), base=base, seeds=[0, 1]))
    Grid(config_loader.lock(cfg)).run()

    rows = {p.name: p for p in tuned.values()}
    a_first = rows["a-baseline-s0"]  # a's baseline row, seed 0
    assert a_first.init == base and not a_first.train.fresh_head
    for seed in (0, 1):
        b_run = rows[f"b-intermediate-s{seed}"]
        assert b_run.init == a_first.workdir and b_run.train.fresh_head and b_run.multitask.method == "none"
        assert rows[f"b-dapt_intermediate-s{seed}"].init == rows["a-dapt_of_b-s0"].workdir
        assert rows[f"b-multitask-s{seed}"].init == base and rows[f"b-multitask-s{seed}"].multitask.method == "mlm"
    assert rows["a-dapt_of_b-s0"].init == pretrained[0] and "dapt-bio" in pretrained[0]
    # 2 tasks x 4 variants x 2 seeds, plus each task's fine-tune from the DAPT start; a's intermediate is its
    # baseline s0 row (and b's is b's)
    assert len(tuned) == 2 * 4 * 2 + 2 and len(set(pretrained)) == 1
    records = json.loads((tmp_path / "grid" / "records.json").read_text())["records"]
    assert {r["variant"] for r in records} == {"baseline", "intermediate", "dapt_intermediate", "multitask"}


@pytest.mark.slow
def test_intermediate_start_is_the_first_tasks_fine_tuned_encoder(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """Fine-tune task a (2 labels), then task b (3 labels) from it with a fresh head and the auxiliary MLM: b's
    starting encoder is a's dev-selected checkpoint's, its classifier the initializer's (a kept head with the
    wrong label count is refused), and b's summary names a's checkpoint as its parent."""
    from tiny_hf import save_tiny_roberta, write_biomed_data

    from dontstop_jax.train import trainer as trainer_module

    write_biomed_data(tmp_path / "corpus", tmp_path / "a", corpus_docs=0)
    (tmp_path / "b").mkdir()
    for split in ("train", "dev", "test"):  # b: the same texts, three labels (kinase / tumor / neither)
        rows = [json.loads(line) for line in (tmp_path / "a" / f"{split}.jsonl").read_text().splitlines()]
        (tmp_path / "b" / f"{split}.jsonl").write_text(
            "".join(
                json.dumps(
                    {"text": r["text"], "label": "k" if "kinase" in r["text"] else "t" if "tumor" in r["text"] else "n"}
                )
                + "\n"
                for r in rows
            )
        )
    base = save_tiny_roberta(tmp_path / "hf", tiny_tokenizer_dir)

    def cfg(name, init, path, **fields):
        return config_loader.lock(
            config_loader.set_fields(
                finetune_config(),
                {
                    "name": name,
                    "workdir": str(tmp_path / name),
                    "init": str(init),
                    "task.path": str(path),
                    "data.max_seq_length": 32,
                    "train.batch_size": 8,
                    "train.epochs": 1,
                    "train.steps_per_epoch": 2,
                    "optim.learning_rate": 1e-2,
                    **fields,
                },
            )
        )  # (step 1 trains: step 0 is the warm-up's, at lr 0)

    a = finetune_phase.finetune(cfg("a", base, tmp_path / "a"))
    with pytest.raises(
        UserError, match="has a classification head for 2 labels and this task has 3; set train.fresh_head=True"
    ):
        finetune_phase.finetune(cfg("b_kept", tmp_path / "a", tmp_path / "b"))
    starts, create = [], trainer_module.create_train_state

    def record(module, *args, **kwargs):
        state, shardings = create(module, *args, **kwargs)
        starts.append((module, jax.device_get(state.params)))
        return state, shardings

    monkeypatch.setattr(trainer_module, "create_train_state", record)
    b = finetune_phase.finetune(
        cfg("b", tmp_path / "a", tmp_path / "b", seed=3, **{"train.fresh_head": True, "multitask.method": "mlm"})
    )
    ((model, start),) = starts
    _, meta, a_params = Checkpointer(tmp_path / "a" / "checkpoints", read_only=True).read(first=a["best_step"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, start["roberta"], a_params["roberta"])
    base_layers = sources.resolve(str(base)).params["roberta"]["layers"]
    assert np.abs(start["roberta"]["layers"]["output"]["bias"] - base_layers["output"]["bias"]).max() > 1e-4
    fresh = jax.device_get(jax.jit(lambda key: nn.unbox(init_params(model, key)))(jax.random.key(3)))
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8), start["classifier"], fresh["classifier"]
    )  # the initializer's draw for seed 3
    assert (
        start["classifier"]["out_proj"]["kernel"].shape == (32, 3) != a_params["classifier"]["out_proj"]["kernel"].shape
    )
    assert "lm_head" in start and b["parent"] == f"checkpoint:{tmp_path / 'a' / 'checkpoints'}@{a['best_step']}"
