"""The synthetic benchmark: deterministic, reusable, RoBERTa-shaped tokenizer, and the DAPT signal."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dontstop_jax.errors import UserError
from dontstop_jax.synthetic import generate as generate_module
from dontstop_jax.synthetic import generate_benchmark, load_benchmark


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return generate_benchmark(tmp_path_factory.mktemp("bench"), seed=0, scale="tiny")


@pytest.fixture(scope="module")
def manifest(bench):
    return json.loads(bench.manifest.read_text())


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_deterministic_under_seed(bench, tmp_path):
    again = generate_benchmark(tmp_path / "same", seed=0, scale="tiny")
    assert _hashes(again.root) == _hashes(bench.root)
    other = generate_benchmark(tmp_path / "other", seed=1, scale="tiny")
    differ = {k for k, v in _hashes(other.root).items() if _hashes(bench.root).get(k) != v}
    assert {"general/corpus.txt", "domains/bio/corpus.txt", "tasks/bio_topic/test.jsonl"} <= differ


def test_reuses_complete_benchmark(bench, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in bench.root.rglob("*") if p.is_file()}

    def boom(*_a, **_k):
        raise AssertionError("regenerated an existing benchmark")

    monkeypatch.setattr(generate_module.corpus, "general_corpus", boom)
    again = generate_benchmark(bench.root, seed=0, scale="tiny")
    assert again.reused and again == bench
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert load_benchmark(bench.root) == bench


def test_regenerates_when_params_change_or_incomplete(tmp_path):
    first = generate_benchmark(tmp_path, seed=0, scale="tiny", n_train=40)
    assert not first.reused
    changed = generate_benchmark(tmp_path, seed=0, scale="tiny", n_train=44)
    assert not changed.reused and len(_lines(changed.tasks["bio_topic"].train)) == 44
    changed.manifest.unlink()  # manifest is written last: without it the benchmark counts as partial
    with pytest.raises(UserError):
        load_benchmark(tmp_path)
    assert not generate_benchmark(tmp_path, seed=0, scale="tiny", n_train=44).reused


def test_bad_options_are_user_errors(tmp_path):
    with pytest.raises(UserError):
        generate_benchmark(tmp_path, scale="huge")
    with pytest.raises(UserError):
        generate_benchmark(tmp_path, scale="tiny", n_labels=3)
    with pytest.raises(UserError):
        generate_benchmark(tmp_path, scale="tiny", domains=("Bio!",))


def test_layout_and_formats(bench, manifest):
    assert set(bench.domain_corpora) == {"bio", "cs"}
    assert set(bench.tasks) == {"bio_topic", "cs_topic"}
    p = manifest["params"]
    assert len(_lines(bench.general_corpus)) == p["n_general_docs"]
    for task in bench.tasks.values():
        for split in ("train", "dev", "test"):
            rows = _rows(getattr(task, split))
            assert len(rows) == p[f"n_{split}"]
            assert all(set(r) == {"text", "label"} and r["label"] in task.labels for r in rows)
            assert all(p["text_len"][0] <= len(r["text"].split()) <= p["text_len"][1] for r in rows)
        unlabeled = _rows(task.unlabeled)
        assert len(unlabeled) == p["n_unlabeled"] and all(set(r) == {"text"} for r in unlabeled)
    for path in bench.domain_corpora.values():
        docs = _lines(path)
        assert len(docs) == p["n_domain_docs"] == len(_lines(path.with_name("clusters.txt")))
        assert all(p["doc_len"][0] <= len(doc.split()) <= p["doc_len"][1] for doc in docs)


def test_pseudo_words_distinct_and_lowercase(manifest):
    gt = manifest["ground_truth"]
    general = [w for t in gt["general"]["topics"] for w in t]
    words = gt["general"]["function_words"] + general
    for dom in gt["domains"].values():
        # Background words may be borrowed from general content words (cs: 10%), never elsewhere.
        words += [w for w in dom["background_words"] if w not in general]
        words += [w for c in dom["clusters"].values() for w in c["seen"] + c["unseen"]]
    assert len(words) == len(set(words))
    assert all(re.fullmatch(r"[a-z]+", w) for w in words)


def test_tokenizer_roberta_layout_and_round_trip(bench, manifest):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bench.tokenizer))
    raw = Tokenizer.from_file(str(bench.tokenizer / "tokenizer.json"))
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    assert tok.convert_tokens_to_ids(specials) == [0, 1, 2, 3, 4]
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 1, 2, 4)
    assert 2000 <= len(tok) <= 4096
    text = _rows(bench.tasks["bio_topic"].test)[0]["text"]
    ids = tok(text)["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and ids == raw.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    gt = manifest["ground_truth"]
    words = gt["general"]["function_words"] + [w for t in gt["general"]["topics"] for w in t]
    for dom in gt["domains"].values():
        words += dom["background_words"] + [w for c in dom["clusters"].values() for w in c["seen"] + c["unseen"]]
    pieces = [len(e.ids) for e in raw.encode_batch([" " + w for w in words], add_special_tokens=False)]
    assert max(pieces) <= 2
    assert np.mean(np.array(pieces) == 1) > 0.9


def _cluster_words(manifest, domain: str) -> dict[str, dict[str, set[str]]]:
    clusters = manifest["ground_truth"]["domains"][domain]["clusters"]
    return {lab: {"seen": set(c["seen"]), "unseen": set(c["unseen"])} for lab, c in clusters.items()}


def test_train_uses_seen_words_and_dev_test_only_unseen(bench, manifest):
    for task in bench.tasks.values():
        clusters = _cluster_words(manifest, task.domain)
        seen = set().union(*(c["seen"] for c in clusters.values()))
        unseen = set().union(*(c["unseen"] for c in clusters.values()))
        content = seen | unseen
        used = {
            s: {w for r in _rows(getattr(task, s)) for w in r["text"].split()} & content
            for s in ("train", "dev", "test")
        }
        assert used["train"] and used["train"] <= seen
        assert used["dev"] <= unseen and used["test"] <= unseen
        assert not used["train"] & (used["dev"] | used["test"])
        # No general content word (in particular no anchor-topic word) in labeled text: only unlabeled
        # text (domain corpus, TAPT text) may link label words to anything the base model already knows.
        topics = manifest["ground_truth"]["general"]["topics"]
        general = {w for t in topics for w in t}
        background = set(manifest["ground_truth"]["domains"][task.domain]["background_words"])
        for split in ("train", "dev", "test"):
            words = {w for r in _rows(getattr(task, split)) for w in r["text"].split()}
            assert not (words & general) - background
        raw = manifest["ground_truth"]["domains"][task.domain]["clusters"].values()
        anchors = {w for c in raw for w in topics[c["anchor_topic"]]}
        unlabeled = {w for r in _rows(task.unlabeled) for w in r["text"].split()}
        assert (unlabeled & general) - background and not (unlabeled & general) - background - anchors
        # TAPT text mixes both kinds of label word inside single texts.
        mixed = [r for r in _rows(task.unlabeled) if set(r["text"].split()) & seen and set(r["text"].split()) & unseen]
        assert len(mixed) > 0.5 * manifest["params"]["n_unlabeled"]


def test_labels_balanced_and_mostly_match_content(bench, manifest):
    noise = manifest["params"]["label_noise"]
    for task in bench.tasks.values():
        members = {lab: c["seen"] | c["unseen"] for lab, c in _cluster_words(manifest, task.domain).items()}
        for split in ("train", "dev", "test"):
            rows = _rows(getattr(task, split))
            counts = Counter(r["label"] for r in rows)
            assert set(counts) == set(task.labels)
            assert max(counts.values()) - min(counts.values()) <= 0.25 * len(rows) / len(task.labels)
            # The majority cluster of a text's label words is its label, up to label noise.
            votes = [Counter(lab for w in r["text"].split() for lab, ws in members.items() if w in ws) for r in rows]
            agree = np.mean([v.most_common(1)[0][0] == r["label"] for v, r in zip(votes, rows)])
            assert agree >= 1 - noise - 0.08


def _top_k(docs: list[str], k: int) -> set[str]:
    return {w for w, _ in Counter(w for d in docs for w in d.split()).most_common(k)}


def test_domain_vocabulary_overlaps_general_less_than_itself(bench):
    general = _lines(bench.general_corpus)
    for path in bench.domain_corpora.values():
        docs = _lines(path)
        half = len(docs) // 2
        k = 100
        self_overlap = len(_top_k(docs[:half], k) & _top_k(docs[half:], k)) / k
        general_overlap = len(_top_k(docs, k) & _top_k(general, k)) / k
        assert self_overlap > 0.75 and general_overlap < 0.35, (path, self_overlap, general_overlap)


def test_unseen_words_cooccur_with_their_own_cluster(bench, manifest):
    for d, path in bench.domain_corpora.items():
        clusters = _cluster_words(manifest, d)
        labels = list(clusters)
        docs = [doc.split() for doc in _lines(path)]
        # seen_tokens[j][i]: how many seen words of cluster j document i has
        seen_tokens = np.array([[sum(w in clusters[lab]["seen"] for w in doc) for doc in docs] for lab in labels])
        ratios = []
        for own, lab in enumerate(labels):
            for word in clusters[lab]["unseen"]:
                has = np.array([word in doc for doc in docs])
                co = seen_tokens[:, has].sum(axis=1)  # co-occurrences with each cluster's seen words
                ratios.append(co[own] / np.delete(co, own).max())
        # Own cluster vs the most-confusable other one; 5% in-document noise keeps this finite.
        assert min(ratios) >= 3 and np.median(ratios) >= 6, (d, min(ratios), np.median(ratios))


def _ppmi_vectors(docs: list[str]) -> tuple[dict[str, int], np.ndarray]:
    """Each word as its row of document-level positive PMI (no SVD: eigh thrashes threads under load)."""
    vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d.split()}))}
    x = np.zeros((len(docs), len(vocab)))
    for r, d in enumerate(docs):
        x[r, [vocab[w] for w in set(d.split())]] = 1.0
    c = x.T @ x
    np.fill_diagonal(c, 0)
    row = c.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(c * c.sum() / (row @ row.T))
    e = np.where(np.isfinite(pmi) & (pmi > 0), pmi, 0.0)
    return vocab, e / (np.linalg.norm(e, axis=1, keepdims=True) + 1e-9)


def _centroid_accuracy(task, docs: list[str]) -> float:
    """Bag of co-occurrence word vectors learned on `docs`, nearest class centroid from train."""
    vocab, emb = _ppmi_vectors(docs)

    def feats(rows):
        out = np.zeros((len(rows), emb.shape[1]))
        for i, r in enumerate(rows):
            hits = [emb[vocab[w]] for w in r["text"].split() if w in vocab]
            out[i] = np.mean(hits, axis=0) if hits else 0.0
        return out

    train, test = _rows(task.train), _rows(task.test)
    y_train = np.array([task.labels.index(r["label"]) for r in train])
    y_test = np.array([task.labels.index(r["label"]) for r in test])
    f_train = feats(train)
    cents = np.stack([f_train[y_train == k].mean(0) for k in range(len(task.labels))])
    pred = (feats(test) @ cents.T).argmax(1)
    return float((pred == y_test).mean())


def test_label_signal_is_learnable_only_from_the_right_domain(bench):
    """Word vectors from the domain's (or the task's) unlabeled text carry train labels over to
    unseen words; vectors from the general corpus or the other domain do not."""
    task = bench.tasks["bio_topic"]
    assert _centroid_accuracy(task, _lines(bench.domain_corpora["bio"])) > 0.8
    assert _centroid_accuracy(task, [r["text"] for r in _rows(task.unlabeled)]) > 0.7
    assert _centroid_accuracy(task, _lines(bench.domain_corpora["cs"])) < 0.45
    # The general corpus cannot help for the simplest reason: it never uses a label word.
    general_words = {w for doc in _lines(bench.general_corpus) for w in doc.split()}
    clusters = _cluster_words(json.loads(bench.manifest.read_text()), "bio")
    assert not general_words & set().union(*(c["seen"] | c["unseen"] for c in clusters.values()))
