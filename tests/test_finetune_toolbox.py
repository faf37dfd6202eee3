"""The fine-tuning toolbox: R3F and SMART regularisers (values against NumPy, the noise's injection point),
EMA / SWA weight averaging (against the recursion over the saved weights, checkpointed and handed on) and
structured pruning of the top layers (against transformers' hidden states of the unpruned model)."""

import copy
import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dontstop_jax import config_loader
from dontstop_jax.engine import DEFAULT_RULES, abstract_state, classification_loss_sums, create_train_state, make_mesh
from dontstop_jax.engine.checkpoint import Checkpointer
from dontstop_jax.engine.regularizers import Regularizer, ascent_step, symmetric_kl
from dontstop_jax.errors import UserError
from dontstop_jax.model import RobertaForSequenceClassification, RobertaModel, init_params, tiny_config
from dontstop_jax.phases import finetune as finetune_phase
from dontstop_jax.phases.defaults import finetune_config
from dontstop_jax.train import source as sources
from dontstop_jax.train.trainer import Averaging

LABELS = 3
CFG = tiny_config(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=34,
)
MODEL = RobertaForSequenceClassification(CFG, LABELS)


@functools.cache
def params():
    return jax.device_get(nn.unbox(init_params(MODEL, jax.random.key(0))))


def batch(seed=0, n=4, seq=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, CFG.vocab_size, (n, seq)).astype(np.int32)
    ids[:, 0], ids[1, 8:] = 0, CFG.pad_token_id
    return {
        "input_ids": ids,
        "attention_mask": (ids != CFG.pad_token_id).astype(np.int32),
        "labels": rng.integers(0, LABELS, n).astype(np.int32),
        "example_weights": np.array([1, 1, 1, 0], np.float32),
    }


@jax.jit
def _apply(p, ids, mask, noise):
    return MODEL.apply({"params": p}, ids, mask, embedding_noise=noise)


def logits(p, b, noise=None):
    return np.asarray(_apply(p, b["input_ids"], b["attention_mask"], noise), np.float64)


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_symmetric_kl(a, b):
    la, lb = np_log_softmax(a), np_log_softmax(b)
    return np.sum(np.exp(la) * (la - lb), -1) + np.sum(np.exp(lb) * (lb - la), -1)


def np_nll(z, y):
    return -np_log_softmax(z)[np.arange(len(y)), y]


def test_symmetric_kl_matches_numpy():
    a, b = np.random.default_rng(1).normal(size=(2, 5, 7)) * 3
    np.testing.assert_allclose(symmetric_kl(jnp.asarray(a), jnp.asarray(b)), np_symmetric_kl(a, b), rtol=1e-5)
    assert float(jnp.max(jnp.abs(symmetric_kl(jnp.asarray(a), jnp.asarray(a))))) < 1e-6


def test_embedding_noise_goes_onto_the_word_embeddings():
    """A noise vector c at every position equals adding c to every row of the word-embedding table."""
    b, c = batch(), np.random.default_rng(2).normal(size=CFG.hidden_size).astype(np.float32) * 0.1
    shifted = copy.deepcopy(params())
    table = shifted["roberta"]["embeddings"]["word_embeddings"]["embedding"]
    shifted["roberta"]["embeddings"]["word_embeddings"]["embedding"] = table + c
    noise = np.broadcast_to(c, b["input_ids"].shape + (CFG.hidden_size,))
    np.testing.assert_allclose(logits(params(), b, noise), logits(shifted, b), atol=1e-5)
    assert np.abs(logits(params(), b, noise) - logits(params(), b)).max() > 1e-4


def _regularized_loss(reg, teacher=None):
    """(loss sum, expected sum) for one deterministic call of the regularised loss at a fixed key."""
    b = batch()
    rng = jax.random.key(7)
    loss = jax.jit(lambda p, t: classification_loss_sums(MODEL, reg)(p, b, rng, True, t))
    loss_sum, aux = loss(params(), teacher)
    assert float(aux["weight"]) == 3.0
    return float(loss_sum), b, rng


def test_r3f_penalty_is_the_symmetric_kl_to_the_noisy_pass():
    reg = Regularizer("r3f", weight=2.0, noise="uniform", noise_scale=0.05)
    got, b, rng = _regularized_loss(reg)
    noise_key = jax.random.split(jax.random.fold_in(rng, 1), 3)[0]  # the regulariser's noise, redrawn here
    noise = np.asarray(
        jax.random.uniform(noise_key, b["input_ids"].shape + (CFG.hidden_size,), jnp.float32, -0.05, 0.05)
    )
    assert np.abs(noise).max() <= 0.05 and np.abs(noise).max() > 0.04
    clean, noisy = logits(params(), b), logits(params(), b, noise)
    w = b["example_weights"]
    expected = np.sum((np_nll(clean, b["labels"]) + 2.0 * np_symmetric_kl(clean, noisy)) * w)
    assert np_symmetric_kl(clean, noisy).min() > 0
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_smart_penalty_after_one_projected_ascent_step(norm="inf"):
    """(The l2 projection is checked on its own in test_ascent_step_projects_per_example.)"""
    reg = Regularizer("smart", weight=3.0, noise_scale=0.01, step_size=0.1, radius=0.02, norm=norm, bregman_weight=0.5)
    teacher = jax.tree_util.tree_map(lambda x: x * 0.9, params())
    got, b, rng = _regularized_loss(reg, teacher)
    noise_key, _, _ = jax.random.split(jax.random.fold_in(rng, 1), 3)
    shape = b["input_ids"].shape + (CFG.hidden_size,)
    delta0 = np.asarray(0.01 * jax.random.normal(noise_key, shape, jnp.float32), np.float64)
    clean = logits(params(), b)
    # the ascent direction, differentiated here directly
    target = jnp.asarray(clean, jnp.float32)
    g = np.asarray(
        jax.jit(
            jax.grad(lambda d: jnp.sum(symmetric_kl(target, _apply(params(), b["input_ids"], b["attention_mask"], d))))
        )(jnp.asarray(delta0, jnp.float32)),
        np.float64,
    )
    if norm == "inf":
        step = g / np.abs(g).max(axis=(1, 2), keepdims=True)
        delta = np.clip(delta0 + 0.1 * step, -0.02, 0.02)
        assert np.isclose(np.abs(delta).max(), 0.02)
        # the ascent step raised the divergence over the random start (same-size perturbations)
        kl = lambda d: np_symmetric_kl(clean, logits(params(), b, d.astype(np.float32)))[:3].sum()
        assert kl(delta) > kl(np.clip(delta0, -0.02, 0.02))
    else:
        step = g / np.sqrt((g**2).sum(axis=(1, 2), keepdims=True))
        delta = delta0 + 0.1 * step
        delta = delta * np.minimum(1, 0.02 / np.sqrt((delta**2).sum(axis=(1, 2), keepdims=True)))
        np.testing.assert_allclose(np.sqrt((delta**2).sum(axis=(1, 2))), 0.02, rtol=1e-5)
    adv = logits(params(), b, delta.astype(np.float32))
    w = b["example_weights"]
    expected = np.sum(
        (
            np_nll(clean, b["labels"])
            + 3.0 * np_symmetric_kl(clean, adv)
            + 0.5 * np_symmetric_kl(clean, logits(teacher, b))
        )
        * w
    )
    np.testing.assert_allclose(got, expected, rtol=2e-5)


def test_ascent_step_projects_per_example():
    delta, grad = np.zeros((2, 3, 4), np.float32), np.random.default_rng(3).normal(size=(2, 3, 4)).astype(np.float32)
    grad[1] *= 100  # the normalisation is per example: the step does not depend on the gradient's scale
    out = np.asarray(ascent_step(jnp.asarray(delta), jnp.asarray(grad), 1.0, 10.0, "l2"))
    np.testing.assert_allclose(out, grad / np.sqrt((grad**2).sum(axis=(1, 2), keepdims=True)), rtol=1e-5)
    start = np.full((2, 3, 4), 0.3, np.float32)  # l2 projection: shrink each example onto the ball
    out = np.asarray(ascent_step(jnp.asarray(start), jnp.asarray(grad), 0.5, 0.2, "l2"))
    step = start + 0.5 * grad / np.sqrt((grad**2).sum(axis=(1, 2), keepdims=True))
    np.testing.assert_allclose(out, step * 0.2 / np.sqrt((step**2).sum(axis=(1, 2), keepdims=True)), rtol=1e-5)
    out = np.asarray(ascent_step(jnp.asarray(start), jnp.asarray(grad), 0.5, 0.2, "inf"))
    step = start + 0.5 * grad / np.abs(grad).max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(out, np.clip(step, -0.2, 0.2), rtol=1e-6)


def _loaded(overrides):
    return config_loader.finalize(finetune_config(), [f"--config.{k}={v}" for k, v in overrides.items()])


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("regularizer.method", "r3d", "must be one of none, r3f, smart"),
        ("regularizer.norm", "l1", "must be one of inf, l2"),
        ("averaging.method", "polyak", "must be one of none, ema, swa"),
        ("averaging.ema_decay", "1.0", "must be in (0, 1)"),
        ("regularizer.nosie", "normal", "no field 'nosie'"),
        ("train.prune_top_layers", "-1", "must be >= 0"),
    ],
)
def test_bad_toolbox_fields_are_one_line_errors(field, value, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _loaded({field: value})


def test_swa_start_after_the_last_epoch_is_refused():
    cfg = _loaded({"averaging.method": "swa", "averaging.swa_start": 4, "train.epochs": 3})
    with pytest.raises(UserError, match="swa_start=4 is after"):
        finetune_phase._averaging(cfg, None)
    cfg = _loaded({"averaging.method": "ema", "regularizer.method": "smart"})
    reg = Regularizer.from_config(cfg.regularizer)
    assert finetune_phase._averaging(cfg, reg) == Averaging({"ema": 0.999, "teacher": 0.99}, "teacher", "ema")


def test_pruned_encoder_is_the_first_layers_of_the_original(tmp_path, small_tokenizer_dir):
    """The pruned model's last hidden states are transformers' hidden states after layer L - k of the full model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.RobertaModel(
        transformers.RobertaConfig(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=34,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ),
        add_pooling_layer=False,
    ).eval()
    with torch.no_grad():  # weights large enough that every layer moves the hidden states
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(tmp_path / "hf")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src := Path(small_tokenizer_dir) / f).exists():
            (tmp_path / "hf" / f).write_bytes(src.read_bytes())
    source = sources.resolve(str(tmp_path / "hf"))
    pruned = sources.prune_top_layers(source, 2)
    assert pruned.config.num_hidden_layers == 1 and source.config.num_hidden_layers == 3
    b = batch()
    ours = RobertaModel(pruned.config).apply({"params": pruned.params["roberta"]}, b["input_ids"], b["attention_mask"])
    with torch.no_grad():
        out = hf(
            torch.tensor(b["input_ids"], dtype=torch.long),
            attention_mask=torch.tensor(b["attention_mask"]),
            output_hidden_states=True,
        )
    real = b["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], out.hidden_states[1].numpy()[real], atol=2e-5)
    assert np.abs(out.hidden_states[1].numpy() - out.hidden_states[3].numpy())[real].max() > 0.1
    with pytest.raises(UserError, match="at least one"):
        sources.prune_top_layers(source, 3)


@pytest.fixture(scope="module")
def hf_and_task(tmp_path_factory, tiny_tokenizer_dir):
    pytest.importorskip("torch")
    from tiny_hf import save_tiny_roberta, write_biomed_data

    root = tmp_path_factory.mktemp("toolbox")
    write_biomed_data(root / "corpus", root / "task", corpus_docs=0)
    return save_tiny_roberta(root / "hf", tiny_tokenizer_dir), root / "task", root


def _finetune(hf_and_task, monkeypatch, name, **fields):
    """Run a 3-epoch, one-step-per-epoch fine-tune; returns (summary, [(step, params, averages) per save])."""
    hf, task, root = hf_and_task
    cfg = config_loader.lock(
        config_loader.set_fields(
            finetune_config(),
            {
                "name": name,
                "workdir": str(root / name),
                "init": str(hf),
                "task.path": str(task),
                "data.max_seq_length": 32,
                "train.batch_size": 8,
                "train.epochs": 3,
                "train.steps_per_epoch": 1,
                "optim.learning_rate": 1e-2,
                **fields,
            },
        )
    )
    saved, save = [], Checkpointer.save

    def record(self, state, **kw):
        saved.append((int(state.step), *jax.device_get((state.params, state.averages))))
        save(self, state, **kw)

    monkeypatch.setattr(Checkpointer, "save", record)
    return finetune_phase.finetune(cfg), saved


def _close(a, b):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


@pytest.mark.slow
def test_ema_and_smart_teacher_follow_their_recursions_pruned(hf_and_task, monkeypatch):
    summary, saved = _finetune(
        hf_and_task,
        monkeypatch,
        "ema",
        **{
            "averaging.method": "ema",
            "averaging.ema_decay": 0.5,
            "regularizer.method": "smart",
            "regularizer.bregman_decay": 0.8,
            "train.prune_top_layers": 1,
        },
    )
    assert [s for s, *_ in saved] == [1, 2, 3] and summary["weights"] == "ema"
    for (_, _, before), (_, params, after) in zip(saved, saved[1:]):  # one step between saves
        _close(after["ema"], jax.tree_util.tree_map(lambda a, p: 0.5 * a + 0.5 * p, before["ema"], params))
        _close(after["teacher"], jax.tree_util.tree_map(lambda a, p: 0.8 * a + 0.2 * p, before["teacher"], params))
    assert (
        np.abs(
            saved[-1][2]["ema"]["classifier"]["out_proj"]["kernel"] - saved[-1][1]["classifier"]["out_proj"]["kernel"]
        ).max()
        > 1e-4
    )
    ckpt = Checkpointer(hf_and_task[2] / "ema" / "checkpoints", read_only=True)
    step, meta, handed_on = ckpt.read(first=summary["best_step"])  # what an export or the next phase reads
    assert meta["model_config"]["num_hidden_layers"] == 1 and meta["weights"] == "ema"
    _close(handed_on, next(a["ema"] for s, _, a in saved if s == step))


@pytest.mark.slow
def test_swa_is_the_mean_of_the_end_of_epoch_weights(hf_and_task, monkeypatch):
    summary, saved = _finetune(
        hf_and_task,
        monkeypatch,
        "swa",
        **{"averaging.method": "swa", "averaging.swa_start": 2, "regularizer.method": "r3f"},
    )
    assert summary["weights"] == "swa"
    _close(saved[0][2]["swa"], saved[0][1])  # before swa_start: the weights themselves
    _close(saved[-1][2]["swa"], jax.tree_util.tree_map(lambda a, b: (a + b) / 2, saved[1][1], saved[2][1]))


def test_averages_checkpoint_and_resume(tmp_path):
    """A state's averages are saved as their own items and restored onto their shardings (a resumed run)."""
    mesh = make_mesh((-1, 1, 1))
    tx = optax.sgd(0.1)
    state, shardings = create_train_state(MODEL, tx, mesh, DEFAULT_RULES, 0, averages=("swa", "teacher"))
    state = state.replace(
        averages={
            "swa": jax.tree_util.tree_map(lambda x: x + 1, state.params),
            "teacher": jax.tree_util.tree_map(lambda x: x * 2, state.params),
        }
    )
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(state, data_state={}, meta={"weights": "swa"})
    restored, _, _ = ckpt.restore(abstract_state(shardings, MODEL, tx, ("swa", "teacher")))
    _close(jax.device_get(restored.averages), jax.device_get(state.averages))
    assert (
        restored.averages["teacher"]["classifier"]["dense"]["kernel"].sharding
        == shardings.params["classifier"]["dense"]["kernel"]
    )
    _close(ckpt.read()[2], jax.device_get(state.averages["swa"]))  # what the next phase reads
    ckpt.close()
