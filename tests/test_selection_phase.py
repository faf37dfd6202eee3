"""The select phase on a small two-topic corpus: what kNN/DSIR/RAND/curated pick, leakage and duplicate
removal, determinism under the seed, resume after an interruption, and a TAPT phase consuming the result."""

import json
from pathlib import Path

import numpy as np
import pytest

from dontstop_jax.errors import UserError
from dontstop_jax.phases import select as select_phase
from dontstop_jax.phases.defaults import select_config
from dontstop_jax.phases.select import select, selected_corpus
from dontstop_jax.train.workdir import Workdir

TOPICS = {
    "bio": ["protein", "binds", "cell", "gene", "enzyme", "membrane", "receptor", "kinase"],
    "cs": ["graph", "node", "edge", "compiler", "kernel", "cache", "thread", "socket"],
    "news": ["election", "vote", "minister", "market", "strike", "court", "policy", "tax"],
}
FILLER = ["the", "a", "of", "and", "in", "with"]


def _sentence(rng, topic, n):
    return " ".join(rng.choice(TOPICS[topic] + FILLER, n))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A bio task (train/dev/test) and a 300-document corpus of the three topics, with planted leaks."""
    root = tmp_path_factory.mktemp("select")
    rng = np.random.default_rng(0)
    task = root / "task"
    task.mkdir()
    splits = {s: [_sentence(rng, "bio", 12) for _ in range(n)] for s, n in (("train", 20), ("dev", 10), ("test", 10))}
    for split, texts in splits.items():
        (task / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(texts))
        )
    docs = [_sentence(rng, ["bio", "cs", "news"][i % 3], 30) for i in range(300)]
    planted = {
        5: splits["test"][0].upper() + "!",  # the same text up to case and punctuation
        8: "preface words here " + splits["dev"][1] + " and an epilogue",  # quotes a dev example
        11: splits["train"][2],  # a task example: already in TAPT, a duplicate
        14: docs[2],
    }  # a duplicate inside the corpus
    docs = [planted.get(i, d) for i, d in enumerate(docs)]
    (root / "corpus-a.txt").write_text("\n".join(docs[:170]) + "\n")
    (root / "corpus-b.txt").write_text("\n".join(docs[170:]) + "\n")
    return root, docs, splits


def _cfg(data, workdir, method="knn", **fields):
    root, _, _ = data
    cfg = select_config()
    cfg.update(dict(method=method, workdir=str(workdir), chunk_size=32, checkpoint_every=2, k=3, fit_docs=200))
    cfg.task.path = str(root / "task")
    cfg.sources = [str(root / "corpus-a.txt"), str(root / "corpus-b.txt")]
    cfg.embedding.update(kind="tfidf", dim=1024)
    for key, value in fields.items():
        node, *path = key.split(".")
        (cfg[node] if path else cfg).__setitem__(path[0] if path else node, value)
    return cfg


def _selected(workdir):
    return [json.loads(line) for line in Path(selected_corpus(workdir)).read_text().splitlines()]


def test_knn_picks_in_domain_documents_and_drops_leaks_and_duplicates(data, tmp_path):
    _, docs, _ = data
    stats = select(_cfg(data, tmp_path / "knn"))
    rows = _selected(tmp_path / "knn")
    indices = [r["index"] for r in rows]
    assert indices == sorted(indices) and all(docs[r["index"]] == r["text"] for r in rows)
    assert all(r["index"] % 3 == 0 for r in rows if r["index"] not in (5, 8, 11, 14))  # bio documents only
    assert not {5, 8, 11} & set(indices)
    assert stats["size"] == len(rows) and stats["size"] + sum(stats["removed"].values()) == stats["candidates"]
    assert sum(stats["per_source"].values()) == len(rows) and len(stats["per_source"]) == 2
    assert 0 < stats["mean_similarity"] <= 1 and stats["task_coverage"] > 0.9
    assert json.loads((tmp_path / "knn" / "selection_stats.json").read_text()) == stats


def test_every_planted_leak_and_duplicate_is_removed(data, tmp_path):
    stats = select(_cfg(data, tmp_path / "all", method="rand", n=1000))  # every document is a candidate
    assert stats["removed"] == {"leakage": 2, "duplicate": 2} and stats["size"] == 296
    assert not {5, 8, 11, 14} & {r["index"] for r in _selected(tmp_path / "all")}


def test_dsir_prefers_the_task_domain_and_rand_does_not(data, tmp_path):
    def bio_share(method, seed=0):
        select(_cfg(data, tmp_path / f"{method}{seed}", method=method, n=40, seed=seed))
        return np.mean([r["index"] % 3 == 0 for r in _selected(tmp_path / f"{method}{seed}")])

    assert bio_share("dsir") > 0.9
    assert bio_share("rand") < 0.6
    assert _selected(tmp_path / "rand0") != (bio_share("rand", seed=1), _selected(tmp_path / "rand1"))[1]


def test_same_seed_same_selection(data, tmp_path):
    for method in ("knn", "rand"):
        for name in ("a", "b"):
            select(_cfg(data, tmp_path / f"{method}-{name}", method=method, n=30))
        assert (
            Path(selected_corpus(tmp_path / f"{method}-a")).read_bytes()
            == Path(selected_corpus(tmp_path / f"{method}-b")).read_bytes()
        )


@pytest.mark.parametrize("method", ["knn", "dsir"])
def test_interrupted_run_resumes_to_the_same_selection(data, tmp_path, monkeypatch, method):
    select(_cfg(data, tmp_path / "whole", method=method, n=30))
    saved = []

    def save_then_die(path, scores, ids, chunks):
        real_save(path, scores, ids, chunks)
        saved.append(chunks)
        if chunks == 4:
            raise KeyboardInterrupt

    real_save = select_phase.save_progress
    monkeypatch.setattr(select_phase, "save_progress", save_then_die)
    cfg = _cfg(data, tmp_path / "resumed", method=method, n=30)
    with pytest.raises(KeyboardInterrupt):
        select(cfg)
    assert not Path(selected_corpus(tmp_path / "resumed")).exists()
    updates: list = []
    monkeypatch.setattr(select_phase, "save_progress", real_save)
    ranker = select_phase._ranker
    monkeypatch.setattr(select_phase, "_ranker", lambda *a: _counting(ranker(*a), updates))
    select(cfg)
    assert min(updates) == 4  # chunks 0-3 were not ranked again
    assert (
        Path(selected_corpus(tmp_path / "resumed")).read_bytes()
        == Path(selected_corpus(tmp_path / "whole")).read_bytes()
    )
    assert not (tmp_path / "resumed" / "progress.npz").exists()


def _counting(ranker, calls):
    update = ranker.update
    ranker.update = lambda texts, offset, chunk: (calls.append(chunk), update(texts, offset, chunk))
    return ranker


def test_resuming_with_another_config_is_refused(data, tmp_path):
    with Workdir(_cfg(data, tmp_path / "w", method="rand")):  # a started, unfinished rand run: its record
        (tmp_path / "w" / select_phase.PROGRESS).write_bytes(b"")  # and its ranking so far
    with pytest.raises(UserError, match=r"w was started with another config \(method: \"rand\" -> \"knn\"\)"):
        select(_cfg(data, tmp_path / "w"))


def test_curated_text_is_filtered_too(data, tmp_path):
    root, _, splits = data
    curated = root / "curated.txt"
    curated.write_text("\n".join(["fresh in-domain text about a kinase", splits["test"][3], "more receptor text"]))
    stats = select(_cfg(data, tmp_path / "cur", method="curated", curated_sources=[str(curated)]))
    assert [r["text"] for r in _selected(tmp_path / "cur")] == [
        "fresh in-domain text about a kinase",
        "more receptor text",
    ]
    assert stats["removed"]["leakage"] == 1


def test_rand_without_a_size_is_a_user_error(data, tmp_path):
    with pytest.raises(UserError, match="select.n > 0"):
        select(_cfg(data, tmp_path / "r", method="rand"))


def test_vampire_learns_and_its_neighbours_are_in_domain(data, tmp_path):
    cfg = _cfg(data, tmp_path / "vampire", k=5, **{"embedding.kind": "vampire", "embedding.dim": 512})
    cfg.embedding.vampire.update(hidden=32, latent=8, steps=150, batch_size=64, learning_rate=3e-2)
    select(cfg)
    curve = np.load(tmp_path / "vampire" / "embedder.npz")["loss_curve"]
    assert curve[-1] < curve[0] - 5  # nats per document: it learned the topics beyond the background frequencies
    rows = [r for r in _selected(tmp_path / "vampire") if r["index"] not in (5, 8, 11, 14)]
    assert np.mean([r["index"] % 3 == 0 for r in rows]) > 0.8


_SELECT_IN_A_PROCESS = """
import json, sys
from dontstop_jax import distributed
distributed.initialize()
from ml_collections import ConfigDict
from dontstop_jax.phases.select import select
print(json.dumps(select(ConfigDict(json.loads(sys.argv[1])))["size"]))
"""


def test_two_processes_select_what_one_does(data, tmp_path):
    """Launched on 2 processes, process 0 selects on its own devices, the other waits for the files; both
    return the statistics and the selection is byte-identical to a one-process run."""
    from local_processes import run_local_processes

    one = select(_cfg(data, tmp_path / "one"))
    outputs = run_local_processes(_SELECT_IN_A_PROCESS, _cfg(data, tmp_path / "two").to_json())
    assert [int(out.splitlines()[-1]) for out in outputs] == [one["size"]] * 2
    assert Path(selected_corpus(tmp_path / "two")).read_bytes() == Path(selected_corpus(tmp_path / "one")).read_bytes()
