"""Span (entity) masking from a term list: matches equal a brute-force search, a span is masked whole or not at
all, the per-row budget holds, matches stop at documents and special tokens, and a tiny phase runs with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_pretrain import command, run, write_corpus

from dontstop_jax import config_loader
from dontstop_jax.data import MLMLoader, SpanMasker, load_terms, load_tokenizer, prepare_corpus, special_ids
from dontstop_jax.data.masking import word_start_table
from dontstop_jax.errors import UserError
from dontstop_jax.phases.defaults import pretrain_config
from dontstop_jax.synthetic.tokenizer import save_tokenizer, train_bpe
from dontstop_jax.train.workdir import result_fields

WORDS = "cell protein binds the of tumor necrosis factor alpha growth receptor line kinase".split()
TERMS = ["tumor necrosis factor", "necrosis factor alpha", "growth factor", "cell line", "protein kinase"]
MASK_PROB = 0.15


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus of random words with the terms planted (also as documents' first words), its tokenizer, the
    prepared 64-token blocks and the term file."""
    root = tmp_path_factory.mktemp("spans")
    rng = np.random.default_rng(0)
    docs = [
        " ".join(
            [*rng.choice(TERMS, 1), *rng.choice(WORDS, 8), *rng.choice(TERMS, 2), *rng.choice(WORDS, 6)]
            if i % 2
            else rng.choice(WORDS, 16)
        )
        for i in range(200)
    ]
    (root / "docs.txt").write_text("\n".join(docs) + "\n")
    save_tokenizer(train_bpe([root / "docs.txt"], 600), root / "tok", TERMS)
    tok = load_tokenizer(root / "tok")
    prepared = prepare_corpus([str(root / "docs.txt")], root / "tok", root / "cache", max_seq_length=64)
    (root / "terms.txt").write_text("\n".join(TERMS) + "\n\n")
    return tok, prepared, root / "terms.txt"


def encode(tok, text: str) -> list[int]:
    return tok.backend_tokenizer.encode(text, add_special_tokens=False).ids


def brute_force_spans(tok, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, inside) by trying every term form at every position, then merging overlapping matches."""
    starts, ids = word_start_table(tok), special_ids(tok)
    mid = {tuple(encode(tok, " " + t)) for t in TERMS}
    at_start = {tuple(encode(tok, t)) for t in TERMS} - mid
    forms = [(s, False) for s in mid] + [(s, True) for s in at_start]
    first, inside = np.zeros(tokens.shape, bool), np.zeros(tokens.shape, bool)
    for b, row in enumerate(tokens.tolist()):
        found = sorted(
            (t, t + len(s))
            for t in range(len(row))
            for s, doc_start in forms
            if tuple(row[t : t + len(s)]) == s
            and (t + len(s) == len(row) or starts[row[t + len(s)]])
            and (not doc_start or (t > 0 and row[t - 1] in ids.values()))
        )
        end = opened = -1
        for lo, hi in found:
            if lo >= end:  # a new span; else this match overlaps the open one and extends it
                first[b, lo], opened = True, lo
            inside[b, max(lo, opened + 1) : hi] = True
            end = max(end, hi)
    return first, inside


def masked_positions(batch: dict) -> tuple[np.ndarray, np.ndarray]:
    """(chosen bool [B, T], the original tokens) from a loader batch."""
    rows, slots = np.nonzero(batch["mlm_weights"])
    chosen = np.zeros(batch["input_ids"].shape, bool)
    chosen[rows, batch["mlm_positions"][rows, slots]] = True
    original = batch["input_ids"].copy()
    original[rows, batch["mlm_positions"][rows, slots]] = batch["mlm_ids"][rows, slots]
    return chosen, original


def span_ids(first: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """int [B, T]: 1, 2, ... per span of a row over its tokens, 0 elsewhere."""
    return np.where(first | inside, np.cumsum(first, axis=1), 0)


def loader(setup, rate: float, whole_word: bool, seed: int = 0) -> MLMLoader:
    tok, prepared, _ = setup
    ids = special_ids(tok)
    return MLMLoader(
        prepared,
        8,
        seed,
        ids,
        vocab_size=len(tok),
        mask_prob=MASK_PROB,
        whole_word=whole_word,
        word_starts_table=word_start_table(tok),
        span_masker=SpanMasker(tok, TERMS, rate, ids),
        prefetch=0,
    )


def test_matches_equal_a_brute_force_search(setup):
    tok, prepared, _ = setup
    blocks = prepared.blocks(np.arange(prepared.num_blocks)).astype(np.int32)
    first, inside = SpanMasker(tok, TERMS, 1.0, special_ids(tok)).spans(blocks)
    ref_first, ref_inside = brute_force_spans(tok, blocks)
    assert ref_first.sum() > 100 and (ref_first[:, :-1] & ref_inside[:, 1:]).any()  # many spans, some merged
    np.testing.assert_array_equal(first, ref_first)
    np.testing.assert_array_equal(inside, ref_inside)


def test_matches_stop_at_documents_special_tokens_and_word_ends(setup):
    tok = setup[0]
    ids = special_ids(tok)
    masker = SpanMasker(tok, ["tumor necrosis factor"], 1.0, ids)
    term, at_start = encode(tok, " tumor necrosis factor"), encode(tok, "tumor necrosis factor")
    split = encode(tok, " tumor necrosis") + [ids["eos"]] + encode(tok, " factor")
    rows = {
        "mid-text": [ids["bos"]] + encode(tok, " cell") + term + [ids["eos"]],
        "document start": [ids["eos"]] + at_start + [ids["eos"]],
        "across </s>": [ids["bos"]] + split,
        "across <mask>": [ids["bos"]] + encode(tok, " tumor necrosis") + [ids["mask"]] + encode(tok, " factor"),
        "start form mid-text": [ids["bos"]] + encode(tok, " cell") + at_start,
        "inside a longer word": [ids["bos"]] + encode(tok, " tumor necrosis factors"),
        "at the row's end": [ids["bos"]] + term,
    }
    found = {name: masker.spans(np.array([row]))[0].any() for name, row in rows.items()}
    assert found == {
        "mid-text": True,
        "document start": True,
        "across </s>": False,
        "across <mask>": False,
        "start form mid-text": at_start == term,
        "inside a longer word": False,
        "at the row's end": True,
    }
    with_special = SpanMasker(tok, ["tumor necrosis factor", "necrosis <mask> factor"], 1.0, ids)
    assert with_special.summary["patterns"] == masker.summary["patterns"]  # a term with a special token is dropped


def test_kept_spans_become_one_word_and_others_keep_their_starts(setup):
    tok, prepared, _ = setup
    tokens = prepared.blocks(np.arange(8)).astype(np.int32)
    masker = SpanMasker(tok, TERMS, 0.5, special_ids(tok))
    first, inside = masker.spans(tokens)
    starts = word_start_table(tok)[tokens]
    coins = np.random.default_rng(0).random(tokens.shape)
    got = masker.word_starts_with_spans(tokens, starts, coins)
    span = span_ids(first, inside)
    for b, s in zip(*np.nonzero(first)):
        own = span[b] == span[b, s]
        expected = (np.arange(tokens.shape[1])[own] == s) if coins[b, s] < 0.5 else starts[b, own]
        np.testing.assert_array_equal(got[b, own], expected)
    np.testing.assert_array_equal(got[span == 0], starts[span == 0])
    kept = coins[first] < 0.5
    assert kept.any() and not kept.all()


@pytest.mark.parametrize("whole_word", [False, True])
def test_spans_are_masked_whole_within_the_budget(setup, whole_word):
    tok = setup[0]
    masker = SpanMasker(tok, TERMS, 1.0, special_ids(tok))
    partial_without_units, whole_spans = [], 0
    for rate, index in [(1.0, i) for i in range(6)] + [(0.0, i) for i in range(6)]:
        batch = loader(setup, rate, whole_word).batch(0, index)
        chosen, original = masked_positions(batch)
        span = span_ids(*masker.spans(original))
        partial = [
            (chosen[b][span[b] == s].any() and not chosen[b][span[b] == s].all())
            for b in range(len(span))
            for s in np.unique(span[b][span[b] > 0])
        ]
        if rate == 1.0:
            assert not any(partial)
            whole_spans += sum(
                chosen[b][span[b] == s].all() for b in range(len(span)) for s in np.unique(span[b][span[b] > 0])
            )
        else:
            partial_without_units.append(any(partial))  # the check above would catch a span masked in part
        candidates = ~np.isin(original, list(special_ids(tok).values()))
        assert (chosen.sum(1) <= np.floor(MASK_PROB * candidates.sum(1) + 0.5)).all()
    assert whole_spans > 5 and any(partial_without_units)


def test_same_seed_same_masks_other_seed_other_masks(setup):
    a, b, c = loader(setup, 0.5, True), loader(setup, 0.5, True), loader(setup, 0.5, True, seed=1)
    for key, value in a.batch(1, 2).items():
        np.testing.assert_array_equal(value, a.batch(1, 2)[key])
        np.testing.assert_array_equal(value, b.batch(1, 2)[key])
    assert not np.array_equal(a.batch(0, 0)["input_ids"], c.batch(0, 0)["input_ids"])


def test_bad_settings_are_one_line_errors(tmp_path, setup):
    with pytest.raises(UserError, match="no such file"):
        load_terms(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(UserError, match="lists no terms"):
        load_terms(str(tmp_path / "empty.txt"))
    with pytest.raises(UserError, match=r"data.span_masking.rate=1.5 must be in \[0, 1\]"):
        config_loader.finalize(pretrain_config("tapt"), ["--config.data.span_masking.rate=1.5"])
    assert load_terms(str(setup[2])) == TERMS


def test_off_by_default_and_out_of_the_fingerprint():
    cfg = pretrain_config("tapt")
    assert not any("span_masking" in k for k in result_fields(cfg))  # phases made before it keep their fingerprint
    cfg.data.span_masking.terms = "terms.txt"
    assert result_fields(cfg)["data.span_masking.terms"] == "terms.txt"


@pytest.mark.slow
def test_tiny_pretrain_phase_with_span_masking(tmp_path, tiny_tokenizer_dir):
    terms = tmp_path / "terms.txt"
    terms.write_text("protein binds\ncell graph\n")
    cmd = command(
        tmp_path / "run",
        write_corpus(tmp_path),
        tiny_tokenizer_dir,
        tmp_path / "cache",
        steps=3,
        extra={"data.span_masking.terms": str(terms), "data.span_masking.rate": 0.5, "data.whole_word": True},
    )
    done = run(cmd)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "DONE.json").read_text())
    assert summary["steps"] == 3 and summary["span_masking"]["terms"] == 2
    assert summary["span_masking"]["rate"] == 0.5
