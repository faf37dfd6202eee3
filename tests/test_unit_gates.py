"""Fixed unit gates of a fine-tune (finetune's `unit_gates`, a HAT task's domain mask): the gated-off units
take no part in training, the scores are those of the model with those units zeroed directly in its weights,
and `dontstop export` writes a plain RoBERTa with the same logits (transformers)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dontstop_jax import config_loader
from dontstop_jax.analysis import classification_metrics
from dontstop_jax.data import load_task, load_tokenizer, tokenize_split
from dontstop_jax.errors import UserError
from dontstop_jax.model import RobertaForSequenceClassification, gates
from dontstop_jax.phases.defaults import finetune_config
from dontstop_jax.phases.export import _load, export
from dontstop_jax.phases.finetune import finetune
from dontstop_jax.train import source as sources

LAYERS, HEADS, MLP = 2, 4, 64  # tiny_hf's model


def on_off():
    """Binary gates with units on and off in every layer, in the layout of a HAT stage's hat_domain_mask.npz
    (its "output" is 0 and is not a gate)."""
    rng = np.random.default_rng(3)
    head = np.array([[1, 0, 1, 0], [0, 1, 1, 0]], np.float32)
    inter = (rng.uniform(size=(LAYERS, MLP)) < 0.5).astype(np.float32)
    return {"head": head, "intermediate": inter, "output": np.zeros((LAYERS, 32), np.float32)}


def zero_units(params, g):
    """The off units zeroed in their incoming weights: a head's value projection (its context is then 0) and an
    intermediate unit's kernel column and bias (gelu(0) = 0). Independent of the gates and of `gates.fold`."""
    params = jax.tree_util.tree_map(np.array, params)  # writable host copies
    layers = params["roberta"]["layers"]
    for layer in range(LAYERS):
        for h in np.flatnonzero(g["head"][layer] == 0):
            layers["value"]["kernel"][layer, :, h] = 0
            layers["value"]["bias"][layer, h] = 0
        off = g["intermediate"][layer] == 0
        layers["intermediate"]["kernel"][layer][:, off] = 0
        layers["intermediate"]["bias"][layer][off] = 0
    return params


@pytest.fixture(scope="module")
def gated(tmp_path_factory, tiny_tokenizer_dir):
    """A 4-step fine-tune of tiny_hf's model under on_off() gates, without weight decay."""
    pytest.importorskip("torch")
    from tiny_hf import save_tiny_roberta, write_biomed_data

    root = tmp_path_factory.mktemp("gates")
    write_biomed_data(root / "corpus", root / "task", corpus_docs=0)
    hf = save_tiny_roberta(root / "hf", tiny_tokenizer_dir)
    np.savez(root / "gates.npz", **on_off())
    cfg = config_loader.lock(
        config_loader.set_fields(
            finetune_config(),
            {
                "workdir": str(root / "ft"),
                "init": str(hf),
                "task.path": str(root / "task"),
                "unit_gates": str(root / "gates.npz"),
                "data.max_seq_length": 32,
                "train.batch_size": 8,
                "train.epochs": 2,
                "train.steps_per_epoch": 2,
                "optim.learning_rate": 1e-2,
                "optim.weight_decay": 0.0,
            },
        )
    )
    return finetune(cfg), root, hf


def test_gated_fine_tune_trains_and_scores_only_the_units_that_are_on(gated):
    summary, root, hf = gated
    g = on_off()
    meta, cfg, params = _load(str(root / "ft"), None)  # the dev-selected step, as scored
    base = sources.resolve(str(hf)).params["roberta"]["layers"]
    layers = params["roberta"]["layers"]
    moved = lambda name, part: np.abs(np.asarray(layers[name][part]) - np.asarray(base[name][part]))
    for layer in range(LAYERS):  # an off unit's weights get no gradient: with no weight decay they stay the base's
        heads, units = g["head"][layer] == 1, g["intermediate"][layer] == 1
        for name in ("query", "key", "value"):
            assert (
                moved(name, "kernel")[layer][:, ~heads].max() == 0 and moved(name, "kernel")[layer][:, heads].max() > 0
            )
        assert moved("attention_output", "kernel")[layer][~heads].max() == 0
        assert moved("intermediate", "kernel")[layer][:, ~units].max() == 0
        assert moved("intermediate", "kernel")[layer][:, units].max() > 0
        assert moved("output", "kernel")[layer][~units].max() == 0 and moved("output", "kernel")[layer][units].max() > 0

    task, tok = load_task(str(root / "task")), load_tokenizer(str(hf))
    texts, labels = task.splits["test"]
    rows = tokenize_split(texts, tok, 32)
    ids = np.ones((len(rows), 32), np.int32)  # pad id 1
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    mask = (ids != 1).astype(np.int32)
    plain = RobertaForSequenceClassification(cfg, 2)
    zeroed = np.asarray(plain.apply({"params": zero_units(params, g)}, jnp.asarray(ids), jnp.asarray(mask)))
    gated_logits = RobertaForSequenceClassification(cfg, 2, gates.load(str(root / "gates.npz"), cfg)).apply(
        {"params": params}, jnp.asarray(ids), jnp.asarray(mask)
    )
    ungated = np.asarray(plain.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(np.asarray(gated_logits), zeroed, atol=1e-6)  # measured: equal
    assert np.abs(ungated - zeroed).max() > 2e-5  # the gates matter (tiny_hf's random units are small)
    assert summary["test"] == pytest.approx(classification_metrics(np.asarray(labels), zeroed.argmax(-1), 2))

    # Export folds the gates into the kernels: transformers' logits are the zeroed model's.
    import torch
    import transformers

    out = export(str(root / "ft"), str(root / "exported"))
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(theirs, zeroed, atol=1e-6)  # measured: 4e-8 (ungated: 1.3e-4 away)
    assert meta["config"]["unit_gates"] == str(root / "gates.npz")


def test_unit_gates_that_do_not_fit_the_model_are_user_errors(tmp_path):
    from dontstop_jax.model import tiny_config

    cfg = tiny_config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    assert gates.load("", cfg) is None
    with pytest.raises(UserError, match="does not exist"):
        gates.load(str(tmp_path / "missing.npz"), cfg)
    np.savez(tmp_path / "short.npz", head=np.ones((2, 4)))
    with pytest.raises(UserError, match=r"lacks \['intermediate'\]"):
        gates.load(str(tmp_path / "short.npz"), cfg)
    np.savez(tmp_path / "wide.npz", head=np.ones((2, 4)), intermediate=np.ones((2, 128)))
    with pytest.raises(UserError, match=r"\['intermediate'\] have shapes \[\(2, 128\)\] but the model needs"):
        gates.load(str(tmp_path / "wide.npz"), cfg)
    with pytest.raises(UserError, match=r"unit_gates='runs/hat-bio' must be an \.npz"):
        config_loader.finalize(finetune_config(), ["--config.unit_gates=runs/hat-bio"])


def test_continual_hat_fine_tunes_each_task_under_its_domains_mask(tmp_path, monkeypatch):
    """Continual.run's wiring (no training): a HAT task after any stage is fine-tuned from that stage's model under
    its own domain's mask; its forward-transfer fine-tune and every other method's are ungated."""
    from dontstop_jax.phases import continual

    cfg = continual.synthetic_config("tiny")
    cfg.workdir, cfg.methods, cfg.seeds = str(tmp_path), ["hat", "ncl"], [0]
    cfg.domains = {d: [f"/corpora/{d}.txt"] for d in ("bio", "cs", "news")}
    cfg.tasks = {
        f"{d}_topic": dict(path=f"/tasks/{d}", domain=d, metric="macro_f1", text_field="text", label_field="label")
        for d in ("bio", "cs", "news")
    }
    run = continual.Continual(cfg)
    monkeypatch.setattr(continual.Continual, "base", lambda self: "BASE")
    monkeypatch.setattr(continual.Continual, "stages", lambda self, m, base: [f"{m}{i}" for i in range(3)])
    seen = []

    def finetune(phase):
        seen.append(phase)
        return {"test": {"macro_f1": 0.5}}

    monkeypatch.setattr(continual, "finetune", finetune)
    run.run()
    got = {(p.init, p.task.path, p.unit_gates) for p in seen}
    domains = {"/tasks/bio": 0, "/tasks/cs": 1, "/tasks/news": 2}
    after = {(f"hat{s}", path, f"hat{k}/{continual.HAT_DOMAIN}") for path, k in domains.items() for s in range(k, 3)}
    before = {("hat0", "/tasks/cs", ""), ("hat1", "/tasks/news", "")}
    assert {g for g in got if g[0].startswith("hat")} == after | before
    assert all(g[2] == "" for g in got if not g[0].startswith("hat"))
