"""Dynamic masked-language-model masking (RoBERTa/BERT 80/10/10), pure numpy, deterministic, vectorised.

Masks are drawn fresh each time a block is served (RoBERTa's dynamic masking). Randomness is counter-based: each
row has a 64-bit key (`row_keys`, a hash of e.g. (seed, epoch, block id)), and the bits at (row, stream, position)
are SplitMix64's output for counter (stream, position) under that key (`random_bits`). A row's mask is a pure
function of its key and tokens, independent of its batch neighbours, which is what lets the loader give
identical global batches on any number of hosts, and the whole batch is drawn in a few array passes (no
generator object per row).

Selection works on words: with whole-word masking a word is a word-start token plus the following
non-start tokens; without it every token is its own word. Words are visited in random order and
taken while their tokens fit in the row's budget (a word that would overflow ends the selection).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from transformers import PreTrainedTokenizerFast

from dontstop_jax.errors import UserError

# Counter streams of `random_bits`: one per independent draw a row makes.
WORD_ORDER, ACTION, REPLACE, SPAN_COIN = range(4)
_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (odd; 2^64 / golden ratio)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, in place on a uint64 array: a bijection that scrambles every input bit."""
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def row_keys(seed: int, *ids: int | np.ndarray) -> np.ndarray:
    """uint64 keys, one per element of the broadcast `ids` (e.g. epoch, block ids): a chained hash of
    (seed, *ids), so rows with any differing id draw unrelated bits."""
    key = _mix(np.array(seed, np.uint64, ndmin=1) + _GAMMA)
    for i in ids:
        key = _mix((key ^ np.array(i, np.uint64, ndmin=1)) + _GAMMA)
    return key


def random_bits(keys: np.ndarray, stream: int, positions: np.ndarray | int) -> np.ndarray:
    """uint64 bits at `positions` (broadcast against keys) of counter stream `stream` under `keys`: SplitMix64
    output number (stream * 2^32 + position) of the sequence seeded by the key, computed directly."""
    counter = np.uint64(stream << 32) + np.array(positions, np.uint64, ndmin=1)
    return _mix(keys + (counter + np.uint64(1)) * _GAMMA)


def uniforms(keys: np.ndarray, stream: int, positions: np.ndarray) -> np.ndarray:
    """float64 in [0, 1) from the top 53 of `random_bits`."""
    return (random_bits(keys, stream, positions) >> np.uint64(11)) * 2.0**-53


def mask_tokens(
    input_ids: np.ndarray,
    keys: np.ndarray,
    special_ids: Mapping[str, int],
    vocab_size: int,
    mask_prob: float = 0.15,
    max_predictions: int | None = None,
    whole_word_starts: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Mask `input_ids` [B, T]; `keys` (uint64 [B], from `row_keys`) make each row's draws its own.

    Each row masks n = min(P, max(1, round(mask_prob * candidates))) tokens, never a special token;
    P = max_predictions (default ceil(mask_prob * T)) is the fixed width of the mlm_* outputs.
    Of the chosen tokens 80% become <mask>, 10% a random non-special token, 10% stay.
    whole_word_starts: optional bool [B, T], True where a token starts a word.
    """
    input_ids = np.asarray(input_ids)
    batch, length = input_ids.shape
    slots = max_predictions or math.ceil(mask_prob * length)
    if not 0 < mask_prob < 1 or not 0 < slots <= length:
        raise UserError(
            f"mask_prob {mask_prob} / max_predictions {slots} invalid for length {length}; "
            "need 0 < mask_prob < 1 and 1 <= max_predictions <= length"
        )
    keys = np.asarray(keys, np.uint64)
    if keys.shape != (batch,):
        raise ValueError(f"got {keys.shape} keys for {batch} rows")
    specials = np.unique(list(special_ids.values()))
    candidate = ~np.isin(input_ids, specials)
    n_candidates = candidate.sum(axis=1)
    budget = np.where(n_candidates > 0, np.minimum(slots, np.maximum(1, np.floor(mask_prob * n_candidates + 0.5))), 0)
    selected = candidate & _select_words(candidate, whole_word_starts, keys, budget, slots)

    # Row-major nonzero: each row's selected positions ascend, and slot k of a row holds its k-th.
    rows, cols = np.nonzero(selected)
    per_row = np.bincount(rows, minlength=batch)
    slot = np.arange(len(rows)) - (np.cumsum(per_row) - per_row)[rows]
    action = uniforms(keys[rows], ACTION, cols)
    chosen = input_ids[rows, cols].astype(np.int32)
    new = np.where(action < 0.8, np.int32(special_ids["mask"]), chosen)
    randomize = (action >= 0.8) & (action < 0.9)
    new[randomize] = _random_tokens(uniforms(keys[rows[randomize]], REPLACE, cols[randomize]), specials, vocab_size)
    masked = input_ids.astype(np.int32)
    masked[rows, cols] = new
    positions = np.zeros((batch, slots), np.int32)
    positions[rows, slot] = cols
    labels = np.zeros((batch, slots), np.int32)
    labels[rows, slot] = chosen
    weights = np.zeros((batch, slots), np.float32)
    weights[rows, slot] = 1.0
    return {
        "input_ids": masked,
        "attention_mask": (input_ids != special_ids["pad"]).astype(np.int32),
        "mlm_positions": positions,
        "mlm_ids": labels,
        "mlm_weights": weights,
    }


def document_segments(input_ids: np.ndarray, eos_id: int, pad_id: int) -> np.ndarray:
    """int32 [B, T]: 1, 2, ... for the documents packed into each row (a document ends with `</s>`), 0 on
    padding. Given to the model as the attention mask, it keeps packed documents from attending to each other
    and restarts their positions (model/roberta.py): what one short document per row gives, without the padding."""
    after_eos = np.pad(input_ids[:, :-1] == eos_id, ((0, 0), (1, 0)))
    return np.where(input_ids == pad_id, 0, 1 + np.cumsum(after_eos, axis=1)).astype(np.int32)


def word_start_table(tokenizer: PreTrainedTokenizerFast) -> np.ndarray:
    """bool over the vocabulary: True where a byte-level BPE token starts a word ("Ġ" prefix) or is special.

    The loader looks word starts up per token id instead of re-tokenizing.
    """
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    table = np.array([t is not None and t.startswith("Ġ") for t in tokens], dtype=bool)
    table[tokenizer.all_special_ids] = True
    return table


def _select_words(
    candidate: np.ndarray, starts: np.ndarray | None, keys: np.ndarray, budget: np.ndarray, slots: int
) -> np.ndarray:
    """bool [B, T]: tokens of the words taken, in random word order, while they fit the budget.

    At most `slots` words fit (a word has a token at least), so only the `slots` first words in random order are
    sorted: a partition of sort keys that hold random high bits and the word index in their low bits (unique,
    so the sorted keys give the order themselves), words that do not exist last."""
    batch, length = candidate.shape
    if starts is None:  # every candidate is a word of its own, numbered by its position
        word, word_len = None, candidate
    else:
        previous = np.pad(candidate[:, :-1], ((0, 0), (1, 0)))
        word = np.cumsum(candidate & (starts | ~previous), axis=1, dtype=np.int32)
        word -= 1
        np.maximum(word, 0, out=word)  # word index of each token (garbage off candidates)
        flat = (np.arange(batch, dtype=np.int32)[:, None] * length + word)[candidate]
        word_len = np.bincount(flat, minlength=batch * length).reshape(batch, length)
    shift = np.uint64(length.bit_length())
    index = np.arange(length, dtype=np.uint64)
    sort_key = random_bits(keys[:, None], WORD_ORDER, index) >> shift
    sort_key[~word_len.astype(bool)] = np.uint64(2**64 - 1) >> shift
    sort_key <<= shift
    sort_key |= index
    first = np.partition(sort_key, slots - 1, axis=1)[:, :slots] if slots < length else sort_key
    first.sort(axis=1)
    order = (first & np.uint64((1 << int(shift)) - 1)).astype(np.intp)
    sorted_len = np.take_along_axis(word_len, order, axis=1).astype(np.int32)
    taken_sorted = (sorted_len > 0) & (np.cumsum(sorted_len, axis=1) <= budget[:, None])
    taken = np.zeros((batch, length), bool)
    np.put_along_axis(taken, order, taken_sorted, axis=1)
    return taken if word is None else np.take_along_axis(taken, word, axis=1)


def _random_tokens(u: np.ndarray, specials: np.ndarray, vocab_size: int) -> np.ndarray:
    """Map uniforms to ids drawn uniformly from [0, vocab_size) minus the special ids."""
    specials = specials[specials < vocab_size]
    ids = np.floor(u * (vocab_size - len(specials))).astype(np.int32)
    for s in specials:  # ascending: shift past each special id in turn
        ids += ids >= s
    return ids
