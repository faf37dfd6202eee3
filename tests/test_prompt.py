"""Prompt-based (cloze) fine-tuning and few-shot draws: the class logits against the MLM head's own scores of the
verbalizer tokens (NumPy), the template's token layout against the tokenizer, the k-per-class draws, the config's
errors, and a fine-tune through the MLM head that exports with its prompt."""

import copy
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from dontstop_jax import config_loader
from dontstop_jax.data import load_task, load_tokenizer
from dontstop_jax.data.tasks import Task, with_shots
from dontstop_jax.data.tokenizer import encode_plain
from dontstop_jax.engine.prompt import Prompt, default_prompt_config
from dontstop_jax.errors import UserError
from dontstop_jax.model import RobertaForMaskedLM, init_params, tiny_config
from dontstop_jax.phases.defaults import finetune_config
from dontstop_jax.train.workdir import fingerprint

LABELS = ["neg", "pos"]
VERBALIZER = {"neg": ["dog", "zebra"], "pos": "xylophone"}  # "zebra" and "xylophone": several tokens


def _prompt(tokenizer_dir, template="{text} It was <mask> .", verbalizer=VERBALIZER, demonstrations=False):
    cfg = ConfigDict(dict(template=template, verbalizer=verbalizer, demonstrations=demonstrations))
    return Prompt.from_config(cfg, load_tokenizer(tokenizer_dir), LABELS)


def test_prompt_logits_are_the_mlm_heads_scores_of_the_verbalizer_tokens(tiny_tokenizer_dir):
    """Class logit = the MLM head's logits at the mask, averaged over each word's tokens, then over the label's
    words: computed here from RobertaForMaskedLM's full logits with NumPy."""
    tok = load_tokenizer(tiny_tokenizer_dir)
    prompt = _prompt(tiny_tokenizer_dir)
    texts = ["the quick brown fox", "hello world, this is a tiny tokenizer for unit tests and more words"]
    encoded = prompt.encode(texts, 24)
    # Layout: <s> text " It was" <mask> " ." </s>, the text cut to what the template leaves.
    tail = encode_plain(tok, [" ."])[0]
    assert encoded[0].tolist() == [0, *encode_plain(tok, [texts[0] + " It was"])[0], 4, *tail, 2]
    assert len(encoded[1]) == 24 and encoded[1][-2 - len(tail)] == 4
    words = {w: encode_plain(tok, [" " + w])[0] for w in ("dog", "zebra", "xylophone")}
    assert len(words["zebra"]) > 1 and len(words["xylophone"]) > 1

    cfg = tiny_config(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=34,
    )
    params = jax.device_get(
        nn.unbox(jax.jit(init_params, static_argnums=0)(RobertaForMaskedLM(cfg), jax.random.key(0)))
    )
    ids = np.full((2, 24), cfg.pad_token_id, np.int32)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = e
    mask = (ids != cfg.pad_token_id).astype(np.int32)
    ours = np.asarray(jax.jit(prompt.model(cfg).apply)({"params": params}, ids, mask))
    vocab = np.asarray(jax.jit(RobertaForMaskedLM(cfg).apply)({"params": params}, ids, mask), np.float64)  # [2,24,V]
    at_mask = vocab[np.arange(2), np.argmax(ids == 4, axis=1)]
    score = lambda word: at_mask[:, words[word]].mean(-1)  # noqa: E731
    expected = np.stack([(score("dog") + score("zebra")) / 2, score("xylophone")], -1)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_demonstrations_follow_the_query_with_one_labeled_example_per_class(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    prompt = _prompt(tiny_tokenizer_dir, template="{text} <mask>", verbalizer={"neg": "dog", "pos": "fox"})
    train = (["the lazy dog", "the quick fox", "a dog"], np.array([0, 1, 0]))
    out = prompt.encode(["the lazy dog"], 64, demonstrations=train, seed=0)[0].tolist()
    enc = lambda s: encode_plain(tok, [s])[0]  # noqa: E731
    assert out == [0, *enc("the lazy dog"), 4, *enc("a dog"), *enc(" dog"), *enc("the quick fox"), *enc(" fox"), 2]


def test_few_shot_draws_k_per_class_for_train_and_dev():
    labels = np.repeat([0, 1, 2], [30, 20, 40])
    texts = [str(i) for i in range(len(labels))]
    task = Task("t", ["a", "b", "c"], {s: (texts, labels) for s in ("train", "dev", "test")}, [])
    few = with_shots(task, 8, seed=3)
    for split in ("train", "dev"):
        assert np.bincount(few.splits[split][1]).tolist() == [8, 8, 8]
        assert [labels[int(t)] for t in few.splits[split][0]] == few.splits[split][1].tolist()
    assert few.splits["train"][0] != few.splits["dev"][0]  # drawn separately
    assert with_shots(task, 8, seed=3).splits["dev"][0] == few.splits["dev"][0]
    assert with_shots(task, 8, seed=4).splits["train"][0] != few.splits["train"][0]
    assert few.splits["test"][0] == texts
    with pytest.raises(UserError, match="only 20 of one class; use at most 20 shots"):
        with_shots(task, 21, seed=0)


@pytest.mark.parametrize(
    "verbalizer, match",
    [
        ({"neg": "dog"}, r"no word for label\(s\) \['pos'\]"),
        ({"neg": "dog", "pos": "fox", "Pos": "x"}, r"names \['Pos'\], which are not labels"),
        ({"neg": "dog", "pos": []}, "'pos' must be a word or a non-empty list"),
    ],
)
def test_a_verbalizer_must_name_every_label_and_no_other(tiny_tokenizer_dir, verbalizer, match):
    with pytest.raises(UserError, match=match):
        _prompt(tiny_tokenizer_dir, verbalizer=verbalizer)


@pytest.mark.parametrize(
    "override, match",
    [
        ("--config.head=promt", "head='promt' must be one of classifier, prompt"),
        ("--config.prompt.template={text} was", "prompt.template='{text} was' needs exactly one {text} and one <mask>"),
        ("--config.prompt.verbalizer={'method': 'x', 'head': 'y'}", None),  # labels are not config fields
        ("--config.task.shots=-1", "task.shots=-1 must be >= 0"),
    ],
)
def test_prompt_fields_are_checked_when_the_config_loads(override, match):
    if match is None:
        assert config_loader.load("configs/finetune.py:chemprot", [override]).prompt.verbalizer.head == "y"
        return
    with pytest.raises(UserError, match=match.replace("{", r"\{").replace("(", r"\(")):
        config_loader.load("configs/finetune.py:chemprot", [override])


def test_the_prompt_section_counts_only_with_the_prompt_head():
    cfg = finetune_config()
    changed = config_loader.set_fields(copy.deepcopy(cfg), {"prompt.verbalizer": {"a": "b"}})
    assert fingerprint(changed) == fingerprint(cfg)
    prompted = config_loader.set_fields(copy.deepcopy(cfg), {"head": "prompt"})
    assert fingerprint(prompted) != fingerprint(config_loader.set_fields(copy.deepcopy(changed), {"head": "prompt"}))
    assert default_prompt_config().template == "{text} It was <mask> ."


@pytest.mark.slow
def test_prompt_fine_tuning_with_bitfit_exports_an_mlm_with_its_prompt(tmp_path, tiny_tokenizer_dir):
    """A few-shot prompt fine-tune from a Hugging Face MLM (BitFit: the LM head and biases train): the dev
    history, the best checkpoint's test score, and an export that transformers reads as RobertaForMaskedLM
    whose logits at the mask give the phase's test predictions."""
    torch = pytest.importorskip("torch")
    import transformers
    from tiny_hf import save_tiny_roberta, write_biomed_data

    from dontstop_jax.analysis import classification_metrics
    from dontstop_jax.phases.export import export
    from dontstop_jax.phases.finetune import finetune

    write_biomed_data(tmp_path / "corpus", tmp_path / "task", corpus_docs=0)
    hf = save_tiny_roberta(tmp_path / "hf", tiny_tokenizer_dir)
    verbalizer = {"ACTIVATOR": "protein", "INHIBITOR": ["lazy dog", "cell"]}
    cfg = config_loader.lock(
        config_loader.set_fields(
            finetune_config(),
            {
                "workdir": str(tmp_path / "ft"),
                "init": str(hf),
                "task.path": str(tmp_path / "task"),
                "task.shots": 8,
                "data.max_seq_length": 48,
                "train.batch_size": 8,
                "train.epochs": 2,
                "optim.learning_rate": 1e-2,
                "peft.method": "bitfit",
                "head": "prompt",
                "prompt.verbalizer": verbalizer,
            },
        )
    )
    summary = finetune(cfg)
    assert summary["train_examples"] == 16 and summary["epochs_run"] == 2 and summary["test"]["accuracy"] > 0
    out = export(str(tmp_path / "ft"), str(tmp_path / "out"))
    saved = json.loads((out / "prompt.json").read_text())
    assert saved["verbalizer"] == {"ACTIVATOR": ["protein"], "INHIBITOR": ["lazy dog", "cell"]}
    assert saved["label_names"] == ["ACTIVATOR", "INHIBITOR"] and saved["template"] == "{text} It was <mask> ."
    mlm = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    tok, task = load_tokenizer(str(out)), load_task(str(tmp_path / "task"))
    prompt = Prompt.from_config(ConfigDict(dict(default_prompt_config(), verbalizer=verbalizer)), tok, task.label_names)
    texts, labels = task.splits["test"]
    preds = []
    for e in prompt.encode(texts, 48):
        with torch.no_grad():
            logits = mlm(torch.tensor(e[None], dtype=torch.long)).logits[0, int(np.argmax(e == 4))].numpy()
        preds.append(np.argmax((logits[prompt.label_ids] * prompt.label_weights).sum(-1)))
    ours = classification_metrics(labels, np.array(preds), 2)
    assert ours["accuracy"] == pytest.approx(summary["test"]["accuracy"])


def test_grid_crosses_heads_with_shots(tmp_path, monkeypatch, tiny_tokenizer_dir):
    """A few-shot grid with its fine-tunes stubbed: every (head, shots, seed) runs once with its fields, the rows
    are "baseline" and "baseline/prompt", the references are scored on the same k-per-class draws, and the
    learning curve's columns are the shots (the examples in all in brackets)."""
    from tiny_hf import save_tiny_roberta, write_biomed_data

    from dontstop_jax.phases import grid as grid_module

    write_biomed_data(tmp_path / "corpus", tmp_path / "bio", corpus_docs=0)
    tuned = []

    def finetune(phase):
        tuned.append(phase)
        score = {"macro_f1": 0.5 + 0.1 * (phase.head == "prompt") + 0.01 * phase.seed}
        return {"dev": score, "test": score}

    monkeypatch.setattr(grid_module, "finetune", finetune)
    task = dict(
        path=str(tmp_path / "bio"),
        metric="macro_f1",
        text_field="text",
        label_field="label",
        irrelevant_domain="cs",
        domain="bio",
    )
    cfg = config_loader.load(
        "configs/grid.py:paper",
        [
            f"--config.tasks={dict(bio=task)!r}",
            "--config.domains={'bio': ['c.txt'], 'cs': ['d.txt']}",
            "--config.variants=['baseline']",
            "--config.heads=['classifier', 'prompt']",
            "--config.shots=[4]",
            "--config.seeds=[0, 1]",
            f"--config.workdir={tmp_path / 'grid'}",
            f"--config.base={save_tiny_roberta(tmp_path / 'base', tiny_tokenizer_dir)}",
        ],
    )
    grid_module.Grid(cfg).run()
    assert sorted((p.head, p.task.shots, p.task.train_size, p.seed) for p in tuned) == [
        ("classifier", 4, 0, 0),
        ("classifier", 4, 0, 1),
        ("prompt", 4, 0, 0),
        ("prompt", 4, 0, 1),
    ]
    saved = json.loads((tmp_path / "grid" / "records.json").read_text())
    assert {(r["variant"], r["shots"], r["train_size"]) for r in saved["records"]} == {
        ("baseline", 4, 4),
        ("baseline/prompt", 4, 4),
    }
    assert {(r["shots"], r["draw"], r["train_examples"]) for r in saved["references"]} == {(4, 0, 8), (4, 1, 8)}
    curve = (tmp_path / "grid" / "learning_curve.md").read_text()
    assert "| bio (macro_f1) | 4 (8) |" in curve and "| baseline/prompt | 60.5 ± 0.7 |" in curve
    assert (tmp_path / "grid" / "results-k4.md").exists()
    with pytest.raises(UserError, match="shots and numbered train_sizes"):
        grid_module.Grid(config_loader.set_fields(copy.deepcopy(cfg), {"train_sizes": [8]})).train_sizes()
