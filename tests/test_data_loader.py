"""Dynamic masking statistics and the MLM loader's determinism, resume and host sharding."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest

from dontstop_jax.data import MLMLoader, load_tokenizer, mask_tokens, prepare_corpus, special_ids, word_start_table
from dontstop_jax.data.masking import random_bits, row_keys, uniforms
from dontstop_jax.errors import UserError

SPECIAL = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}
VOCAB = 1000


def random_rows(batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Blocks like the packer makes: <s> ... </s> with some </s> separators and trailing padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, (batch, length))
    ids[rng.random((batch, length)) < 0.05] = SPECIAL["eos"]
    ids[:, 0], ids[:, -1] = SPECIAL["bos"], SPECIAL["eos"]
    ids[: batch // 4, length // 2 :] = SPECIAL["pad"]
    return ids


@pytest.fixture(scope="module")
def corpus(tiny_tokenizer_dir, tmp_path_factory):
    rng = np.random.default_rng(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "domain", "task", "data"]
    docs = [" ".join(rng.choice(words, rng.integers(3, 30))) for _ in range(120)]
    root = tmp_path_factory.mktemp("corpus")
    (root / "docs.txt").write_text("\n".join(docs))
    return prepare_corpus(
        [str(root / "docs.txt")], tiny_tokenizer_dir, root / "out", max_seq_length=32, shard_blocks=16
    )


def make_loader(corpus, **kwargs) -> MLMLoader:
    args = {
        "global_batch_size": 8,
        "seed": 3,
        "special_ids": SPECIAL,
        "vocab_size": corpus.manifest["vocab_size"],
    } | kwargs
    return MLMLoader(corpus, **args)


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def assert_same(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_mask_statistics():
    ids = random_rows(512, 128)
    out = mask_tokens(ids, row_keys(0, np.arange(512)), SPECIAL, VOCAB)
    weights, positions = out["mlm_weights"], out["mlm_positions"]
    assert out["mlm_ids"].shape == positions.shape == weights.shape == (512, 20)  # ceil(0.15 * 128)
    assert {k: v.dtype for k, v in out.items()} == {
        "input_ids": np.int32,
        "attention_mask": np.int32,
        "mlm_positions": np.int32,
        "mlm_ids": np.int32,
        "mlm_weights": np.float32,
    }
    candidates = ~np.isin(ids, list(SPECIAL.values()))
    want = np.minimum(20, np.maximum(1, np.floor(0.15 * candidates.sum(1) + 0.5)))
    np.testing.assert_array_equal(weights.sum(1), want)
    rows = np.nonzero(weights)[0]
    chosen = positions[weights > 0]
    assert candidates[rows, chosen].all(), "a special or pad token was chosen"
    np.testing.assert_array_equal(out["mlm_ids"][weights > 0], ids[rows, chosen])
    assert not positions[weights == 0].any() and not out["mlm_ids"][weights == 0].any()
    np.testing.assert_array_equal(out["attention_mask"], ids != SPECIAL["pad"])

    new = out["input_ids"][rows, chosen]
    masked, kept = new == SPECIAL["mask"], new == ids[rows, chosen]
    replaced = ~masked & ~kept
    assert abs(masked.mean() - 0.8) < 0.02 and abs(kept.mean() - 0.1) < 0.015 and abs(replaced.mean() - 0.1) < 0.015
    assert not np.isin(new[replaced], list(SPECIAL.values())).any()
    unchosen = np.ones_like(candidates)
    unchosen[rows, chosen] = False
    np.testing.assert_array_equal(out["input_ids"][unchosen], ids[unchosen])


def test_row_keys_make_rows_independent():
    ids = random_rows(4, 64)
    keys = row_keys(7, np.arange(4))
    full = mask_tokens(ids, keys, SPECIAL, VOCAB)
    half = mask_tokens(ids[2:], keys[2:], SPECIAL, VOCAB)
    for key in full:
        np.testing.assert_array_equal(full[key][2:], half[key])


def test_counter_based_bits_are_uniform_and_unrelated_across_keys_streams_and_positions():
    keys = row_keys(5, 0, np.arange(2000))
    assert len(np.unique(keys)) == 2000 and not np.isin(keys, row_keys(5, 1, np.arange(2000))).any()
    u = np.stack([uniforms(keys[:, None], s, np.arange(256)) for s in range(3)], axis=1)  # [key, stream, position]
    counts = np.bincount((u * 16).astype(int).ravel(), minlength=16)
    expected = u.size / 16
    assert ((counts - expected) ** 2 / expected).sum() < 50  # chi-square, 15 degrees of freedom: p < 1e-5
    flat = u.reshape(2000, -1) - 0.5
    # Neighbouring keys, streams and positions: correlations within a few standard errors of 0.
    for a, b in [(flat[1:], flat[:-1]), (u[:, 1] - 0.5, u[:, 0] - 0.5), (flat[:, 1:], flat[:, :-1])]:
        assert abs((a * b).mean() / (a.std() * b.std())) < 5 / np.sqrt(a.size)
    np.testing.assert_array_equal(
        random_bits(keys[:3], 2, np.array([9, 9, 4])),
        [random_bits(keys[i : i + 1], 2, p)[0] for i, p in enumerate([9, 9, 4])],
    )


def test_whole_word_masking_masks_whole_words():
    ids = random_rows(256, 64)
    starts = np.random.default_rng(1).random(ids.shape) < 0.4
    out = mask_tokens(ids, row_keys(2, np.arange(256)), SPECIAL, VOCAB, whole_word_starts=starts)
    candidates = ~np.isin(ids, list(SPECIAL.values()))
    chosen = np.zeros_like(candidates)
    rows = np.nonzero(out["mlm_weights"])[0]
    chosen[rows, out["mlm_positions"][out["mlm_weights"] > 0]] = True
    # A continuation token (candidate, not a start, after a candidate) shares its word's fate.
    continuation = candidates[:, 1:] & ~starts[:, 1:] & candidates[:, :-1]
    assert continuation.any() and chosen.any()
    np.testing.assert_array_equal(chosen[:, 1:][continuation], chosen[:, :-1][continuation])
    assert (out["mlm_weights"].sum(1) <= np.floor(0.15 * candidates.sum(1) + 0.5)).all()


def test_word_start_table(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    table = word_start_table(tok)
    assert table.shape == (len(tok),) and table[list(special_ids(tok).values())].all()
    ids = tok("hello world")["input_ids"][1:-1]
    assert tok.convert_ids_to_tokens(ids[-1]).startswith("Ġ") and table[ids[-1]]
    assert not table[tok.convert_tokens_to_ids("o")]


def test_loader_is_deterministic_and_seed_dependent(corpus):
    assert_same(take(make_loader(corpus), 5), take(make_loader(corpus, prefetch=0), 5))
    other = take(make_loader(corpus, seed=4), 1)[0]
    assert not np.array_equal(other["input_ids"], take(make_loader(corpus), 1)[0]["input_ids"])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_continues_exactly(corpus, prefetch):
    loader = make_loader(corpus, prefetch=prefetch)
    k = loader.steps_per_epoch - 1  # the next batches cross an epoch boundary
    take(loader, k)
    state = json.loads(json.dumps(loader.get_state()))
    assert state["epoch"] == 0 and state["batch_in_epoch"] == k
    expected = take(loader, 3)
    resumed = make_loader(corpus, prefetch=prefetch)
    take(resumed, 2)  # it has run ahead; set_state must discard that
    resumed.set_state(state)
    assert_same(take(resumed, 3), expected)
    assert resumed.get_state()["epoch"] == 1


def test_state_mismatch_is_rejected(corpus):
    state = make_loader(corpus).get_state()
    with pytest.raises(UserError, match="loader state has seed=3 but this run has 9"):
        make_loader(corpus, seed=9).set_state(state)
    with pytest.raises(UserError, match="global batch size 6 must be a positive multiple of the process count 4"):
        make_loader(corpus, global_batch_size=6, process_count=4)
    with pytest.raises(UserError, match="fewer than the global batch size"):
        make_loader(corpus, global_batch_size=10_000)


def unmask(batch: dict) -> np.ndarray:
    """The original blocks: put the predicted ids back at their positions."""
    ids = batch["input_ids"].copy()
    rows, slots = np.nonzero(batch["mlm_weights"])
    ids[rows, batch["mlm_positions"][rows, slots]] = batch["mlm_ids"][rows, slots]
    return ids


def test_every_epoch_masks_afresh(corpus):
    n = corpus.num_blocks
    loader = make_loader(corpus, global_batch_size=n)
    orders = [np.random.default_rng([3, e]).permutation(n) for e in (0, 1)]  # the documented epoch order
    batches = [loader.batch(e, 0) for e in (0, 1)]
    for order, batch in zip(orders, batches, strict=True):
        np.testing.assert_array_equal(unmask(batch), corpus.blocks(order))
    # Line rows up by block id: the same block gets different masked positions in the two epochs.
    a, b = (batch["mlm_positions"][np.argsort(order)] for order, batch in zip(orders, batches, strict=True))
    assert (a != b).any(axis=1).mean() > 0.9


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_hosts_share_the_same_global_batch(corpus, drop_remainder):
    whole = make_loader(corpus, drop_remainder=drop_remainder)
    hosts = [make_loader(corpus, process_index=p, process_count=2, drop_remainder=drop_remainder) for p in range(2)]
    for _ in range(whole.steps_per_epoch + 1):
        one, parts = next(whole), [next(h) for h in hosts]
        for key in one:
            np.testing.assert_array_equal(one[key], np.concatenate([p[key] for p in parts]), err_msg=key)


def test_remainder_batch_is_filled_with_unweighted_rows(corpus):
    loader = make_loader(corpus, global_batch_size=7, drop_remainder=False)
    assert loader.steps_per_epoch == -(-corpus.num_blocks // 7)
    last = loader.batch(0, loader.steps_per_epoch - 1)
    real = corpus.num_blocks - 7 * (loader.steps_per_epoch - 1)
    assert real < 7, "the corpus size should leave a remainder"
    assert not last["mlm_weights"][real:].any() and last["mlm_weights"][:real].any(1).all()
    np.testing.assert_array_equal(last["attention_mask"][real:, :2], 1)


def test_whole_word_loader(tiny_tokenizer_dir, corpus):
    table = word_start_table(load_tokenizer(tiny_tokenizer_dir))
    batch = next(make_loader(corpus, whole_word=True, word_starts_table=table))
    assert batch["mlm_weights"].sum() > 0
    with pytest.raises(UserError, match="word_starts_table"):
        make_loader(corpus, whole_word=True)


def test_prefetch_thread_reports_errors_and_ends_with_its_loader(corpus, monkeypatch):
    loader = make_loader(corpus)
    next(loader)
    thread = loader._pending._thread
    monkeypatch.setattr(MLMLoader, "batch", lambda *_: 1 / 0)
    loader.set_state(loader.get_state())  # restarts the thread, which now fails
    with pytest.raises(ZeroDivisionError):
        next(loader)
    assert not thread.is_alive()
    monkeypatch.undo()
    next(loader)
    thread = loader._pending._thread
    del loader
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
