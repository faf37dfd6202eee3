"""Low-resource learning curves and Transfer-TAPT in the grid (phases/grid.py, analysis/curve.py): stratified
deterministic train draws, the static word vectors reference, per-size tables, the learning-curve table and plot,
and the provenance of a transfer_tapt fine-tune (it starts from the TAPT phase of the task it transfers from)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dontstop_jax import config_loader
from dontstop_jax.analysis import results_table
from dontstop_jax.analysis.curve import learning_curves, to_markdown
from dontstop_jax.analysis.reference import BAG_OF_WORDS, STATIC_VECTORS, mean_embeddings, static_vectors_predict
from dontstop_jax.data.tasks import stratified_draw
from dontstop_jax.errors import UserError
from dontstop_jax.phases.defaults import finetune_config
from dontstop_jax.phases.grid import Grid
from dontstop_jax.train.workdir import fingerprint, result_fields

LABELS = np.array([0] * 50 + [1] * 30 + [2] * 15 + [3] * 5)


def test_draws_are_stratified_deterministic_and_keep_every_class():
    draw = stratified_draw(LABELS, 10, seed=3)
    assert len(draw) == 10 and len(set(draw)) == 10
    # shares 5, 3, 1.5, 0.5 -> floors 5, 3, 1 and the at-least-one rule for class 3: 10 exactly
    assert np.bincount(LABELS[draw]).tolist() == [5, 3, 1, 1]
    assert np.array_equal(draw, stratified_draw(LABELS, 10, seed=3))
    assert not np.array_equal(draw, stratified_draw(LABELS, 10, seed=4))
    for size in (4, 7, 33, 99, 100):
        counts = np.bincount(LABELS[stratified_draw(LABELS, size, seed=0)], minlength=4)
        assert counts.sum() == size and counts.min() >= 1
        assert np.all(np.abs(counts - size * np.bincount(LABELS) / len(LABELS)) < 1 + 1e-9)  # each class ~its share
    for size in (3, 101):
        with pytest.raises(UserError, match=f"a train size of {size} cannot keep all 4 classes"):
            stratified_draw(LABELS, size, seed=0)


def test_static_vectors_average_the_embedding_rows_and_fit_like_scikit_learn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 32))
    embed = mean_embeddings(table, lambda texts: [[int(w) for w in t.split()] for t in texts])
    assert np.allclose(embed(["1 2 2", ""]), [(table[1] + 2 * table[2]) / 3, np.zeros(32)])
    # Two classes whose texts draw tokens from different halves of the vocabulary.
    labels = rng.integers(0, 2, 300)
    texts = [" ".join(map(str, rng.integers(25 * y, 25 * y + 25, 6))) for y in labels]
    x = embed(texts)
    (ours,) = static_vectors_predict(x[:200], labels[:200], [x[200:]], 2)
    centred = x - x[:200].mean(0)
    rows = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    sk = linear_model.LogisticRegression(C=1.0).fit(rows[:200], labels[:200]).predict(rows[200:])
    assert np.mean(ours == sk) >= 0.97 and np.mean(ours == labels[200:]) >= 0.9


def _records():
    """Two variants on train sizes 8 and all, two seeds each; references per draw on 8, one on all."""
    scores = {
        ("tapt", 8): [0.5, 0.6],
        ("tapt", "all"): [0.8, 0.9],
        ("transfer_tapt", 8): [0.4, 0.44],
        ("transfer_tapt", "all"): [0.7, 0.72],
    }
    records = [
        {"task": "t", "variant": v, **({} if n == "all" else {"train_size": n}), "seed": s, "metrics": {"macro_f1": x}}
        for (v, n), xs in scores.items()
        for s, x in enumerate(xs)
    ]
    references = [
        {
            "task": "t",
            "reference": BAG_OF_WORDS,
            "train_size": 8,
            "draw": d,
            "train_examples": 8,
            "test": {"macro_f1": x},
        }
        for d, x in enumerate([0.3, 0.5])
    ]
    references.append({"task": "t", "reference": BAG_OF_WORDS, "train_examples": 400, "test": {"macro_f1": 0.75}})
    return records, references


def test_learning_curve_points_are_the_seed_means_and_the_plot_is_written(tmp_path):
    records, references = _records()
    curves = learning_curves(records, references, {"t": "macro_f1"}, ["tapt", "transfer_tapt"])
    assert curves["sizes"] == [8, "all"]
    lines = {line["name"]: line["points"] for line in curves["lines"]}
    assert [p["examples"] for p in lines["tapt"]] == [8, 400]
    assert lines["tapt"][0]["mean"] == pytest.approx(0.55)
    assert lines["tapt"][0]["std"] == pytest.approx(np.std([0.5, 0.6], ddof=1))
    assert lines[BAG_OF_WORDS][0]["mean"] == pytest.approx(0.4) and lines[BAG_OF_WORDS][1]["std"] is None
    markdown = to_markdown(curves)
    assert "| t (macro_f1) | 8 | all (400) |" in markdown and "| tapt | 55.0 ± 7.1 | 85.0 ± 7.1 |" in markdown
    # The per-size table shows a reference's mean over its draws; a draw recorded twice is an error.
    table = results_table(
        [r for r in records if r.get("train_size") == 8], {"t": "macro_f1"}, references=references[:2]
    )
    assert table.references[(BAG_OF_WORDS, "t")] == pytest.approx(0.4)
    with pytest.raises(UserError, match="two reference records"):
        results_table(records[:1], {"t": "macro_f1"}, references=[references[0], references[0]])
    pytest.importorskip("matplotlib")
    from dontstop_jax.analysis.plots import learning_curves as plot

    (tmp_path / "curve.json").write_text(json.dumps(curves))
    assert plot(tmp_path / "curve.json", tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_a_zero_train_size_leaves_the_fingerprint_of_phases_recorded_before_the_field():
    cfg = finetune_config()
    old = {k: v for k, v in result_fields(cfg).items() if k != "task.train_size"}
    assert fingerprint(cfg) == fingerprint(old)
    cfg.task.train_size = 8
    assert fingerprint(cfg) != fingerprint(old)


def _grid_config(**tasks):
    overrides = [
        f"--config.tasks={tasks!r}",
        "--config.domains={'bio': ['c.txt'], 'cs': ['d.txt']}",
        "--config.variants=['tapt', 'transfer_tapt']",
    ]
    return config_loader.load("configs/grid.py:paper", overrides)


@pytest.mark.parametrize(
    "transfer, match",
    [
        ("", "transfer_from='': transfer_tapt needs another task of b's domain 'bio'; set it to one of \\['a'\\]"),
        ("b", "transfer_from='b'"),
        ("zz", "transfer_from='zz'"),
        ("c", "transfer_from='c'"),
    ],
)
def test_transfer_from_must_name_another_task_of_the_domain(transfer, match):
    task = dict(path="x", metric="macro_f1", text_field="text", label_field="label", irrelevant_domain="cs")
    cfg = _grid_config(
        a=dict(task, domain="bio", transfer_from="b"),
        b=dict(task, domain="bio", transfer_from=transfer),
        c=dict(task, domain="cs", transfer_from=""),
    )
    with pytest.raises(UserError, match=match):
        Grid(cfg)


def test_grid_rows_of_transfer_tapt_and_train_sizes(tmp_path, monkeypatch, tiny_tokenizer_dir):
    """The grid's plan with its phases stubbed (each records its config; the references are real, on a tiny
    Hugging Face base model): bio and bio_half (the first half of bio's files) share a domain, so each one's
    transfer_tapt row fine-tunes from the other's TAPT phase, the very phase of its tapt row; train sizes 8 and
    all give two tables, the learning curve and the references of each draw."""
    from tiny_hf import save_tiny_roberta, write_biomed_data

    from dontstop_jax.phases import grid as grid_module

    write_biomed_data(tmp_path / "corpus", tmp_path / "bio", corpus_docs=10)
    (tmp_path / "bio_half").mkdir()
    for split in ("train", "dev", "test"):
        lines = (tmp_path / "bio" / f"{split}.jsonl").read_text().splitlines(keepends=True)
        (tmp_path / "bio_half" / f"{split}.jsonl").write_text("".join(lines[: len(lines) // 2]))
    base = str(save_tiny_roberta(tmp_path / "base", tiny_tokenizer_dir))
    pretrained, tuned = {}, []

    def pretrain(phase):
        pretrained[phase.workdir] = list(phase.data.sources)

    def finetune(phase):  # a score that tells the train sizes and seeds apart
        tuned.append(phase)
        score = {"macro_f1": 0.5 + 0.1 * (phase.task.train_size == 0) + 0.01 * phase.seed}
        return {"dev": score, "test": score}

    monkeypatch.setattr(grid_module, "pretrain", pretrain)
    monkeypatch.setattr(grid_module, "finetune", finetune)
    task = dict(metric="macro_f1", text_field="text", label_field="label", irrelevant_domain="cs", domain="bio")
    cfg = _grid_config(
        bio=dict(task, path=str(tmp_path / "bio"), transfer_from="bio_half"),
        bio_half=dict(task, path=str(tmp_path / "bio_half"), transfer_from="bio"),
    )
    cfg.unlock()
    cfg.update(dict(workdir=str(tmp_path / "grid"), base=base, seeds=[0, 1], train_sizes=[8, "all"]))
    table = Grid(config_loader.lock(cfg)).run()

    # Provenance: bio_half's transfer_tapt fine-tunes start from the TAPT phase that read bio's files.
    assert len(pretrained) == 2  # one TAPT per task, shared by its tapt row and the other task's transfer_tapt
    (bio_tapt,) = (w for w, sources in pretrained.items() if sources == [str(tmp_path / "bio" / "train.jsonl")])
    runs = {(p.task.path.rsplit("/", 1)[1], p.name.split("-")[1], p.task.train_size, p.seed): p for p in tuned}
    assert len(runs) == len(tuned) == 16
    for size in (8, 0):
        for seed in (0, 1):
            assert runs[("bio_half", "transfer_tapt", size, seed)].init == bio_tapt
            assert runs[("bio", "tapt", size, seed)].init == bio_tapt
            assert runs[("bio", "transfer_tapt", size, seed)].init != bio_tapt
    root = tmp_path / "grid"
    saved = json.loads((root / "records.json").read_text())
    assert {r.get("train_size", "all") for r in saved["records"]} == {8, "all"}
    refs = [r for r in saved["references"] if r["task"] == "bio_half"]
    assert [(r["reference"], r.get("train_size"), r.get("draw"), r["train_examples"]) for r in refs][-4:] == [
        (STATIC_VECTORS, 8, 1, 8),
        ("majority class", None, None, 100),
        (BAG_OF_WORDS, None, None, 100),
        (STATIC_VECTORS, None, None, 100),
    ]
    assert (root / "results.md").read_text() == table.to_markdown() and "| transfer_tapt |" in table.to_markdown()
    small = (root / "results-n8.md").read_text()
    assert "| tapt | 50.5 ± 0.7, n=2 | 50.5 ± 0.7, n=2 |" in small
    assert "static word vectors LR (reference)" in small
    curves = json.loads((root / "learning_curve.json").read_text())
    line = next(c for c in curves["lines"] if c["task"] == "bio" and c["name"] == "transfer_tapt")
    assert [(p["examples"], p["mean"]) for p in line["points"]] == [(8, pytest.approx(0.505)), (200, 0.605)]
    assert "| bio (macro_f1) | 8 | all (200) |" in (root / "learning_curve.md").read_text()
    pytest.importorskip("matplotlib")
    from dontstop_jax.analysis import plots

    assert plots.learning_curves(root / "learning_curve.json", tmp_path / "lc.png").read_bytes()[:4] == b"\x89PNG"
