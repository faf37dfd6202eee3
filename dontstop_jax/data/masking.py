"""Dynamic masked-language-model masking (RoBERTa/BERT 80/10/10), pure numpy and deterministic.

Masks are drawn fresh each time a block is served (RoBERTa's dynamic masking), from generators the
caller controls. Passing one generator per row makes a row's mask independent of its batch
neighbours, which is what lets the loader give identical global batches on any number of hosts.

Selection works on words: with whole-word masking a word is a word-start token plus the following
non-start tokens; without it every token is its own word. Words are visited in random order and
taken while their tokens fit in the row's budget (a word that would overflow ends the selection).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from transformers import PreTrainedTokenizerFast

from dontstop_jax.errors import UserError

Rng = np.random.Generator | Sequence[np.random.Generator]


def mask_tokens(
    input_ids: np.ndarray,
    rng: Rng,
    special_ids: Mapping[str, int],
    vocab_size: int,
    mask_prob: float = 0.15,
    max_predictions: int | None = None,
    whole_word_starts: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Mask `input_ids` [B, T]; `rng` is one generator, or one per row for row-local determinism.

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
    specials = np.unique(list(special_ids.values()))
    candidate = ~np.isin(input_ids, specials)
    n_candidates = candidate.sum(axis=1)
    budget = np.where(n_candidates > 0, np.minimum(slots, np.maximum(1, np.floor(mask_prob * n_candidates + 0.5))), 0)
    word_key, action, replace_u = _uniforms(rng, batch, length)

    selected = candidate & _select_words(candidate, whole_word_starts, word_key, budget)
    masked = input_ids.astype(np.int32)
    masked[selected & (action < 0.8)] = special_ids["mask"]
    randomize = selected & (action >= 0.8) & (action < 0.9)
    masked[randomize] = _random_tokens(replace_u, specials, vocab_size)[randomize]

    # Slot k of a row holds its k-th selected position (ascending); the remaining slots stay empty.
    rows, cols = np.nonzero(selected)
    slot = np.cumsum(selected, axis=1)[rows, cols] - 1
    positions = np.zeros((batch, slots), np.int32)
    positions[rows, slot] = cols
    labels = np.zeros((batch, slots), np.int32)
    labels[rows, slot] = input_ids[rows, cols]
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


def _uniforms(rng: Rng, batch: int, length: int) -> np.ndarray:
    """Three [B, T] uniform arrays: word order keys, 80/10/10 action, random-token choice."""
    if isinstance(rng, np.random.Generator):
        return rng.random((3, batch, length))
    if len(rng) != batch:
        raise ValueError(f"got {len(rng)} generators for {batch} rows")
    return np.stack([g.random((3, length)) for g in rng], axis=1)


def _select_words(candidate: np.ndarray, starts: np.ndarray | None, key: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """bool [B, T]: tokens of the words taken, in random word order, while they fit the budget."""
    batch, length = candidate.shape
    previous = np.pad(candidate[:, :-1], ((0, 0), (1, 0)))
    begins = candidate & (True if starts is None else starts | ~previous)
    word = np.maximum(np.cumsum(begins, axis=1) - 1, 0)  # word index of each token (garbage off candidates)
    flat = (np.arange(batch)[:, None] * length + word)[candidate]
    word_len = np.bincount(flat, minlength=batch * length).reshape(batch, length)
    order = np.argsort(np.where(word_len > 0, key, np.inf), axis=1)
    sorted_len = np.take_along_axis(word_len, order, axis=1)
    taken_sorted = (sorted_len > 0) & (np.cumsum(sorted_len, axis=1) <= budget[:, None])
    taken = np.zeros_like(taken_sorted)
    np.put_along_axis(taken, order, taken_sorted, axis=1)
    return np.take_along_axis(taken, word, axis=1)


def _random_tokens(u: np.ndarray, specials: np.ndarray, vocab_size: int) -> np.ndarray:
    """Map uniforms to ids drawn uniformly from [0, vocab_size) minus the special ids."""
    specials = specials[specials < vocab_size]
    ids = np.floor(u * (vocab_size - len(specials))).astype(np.int32)
    for s in specials:  # ascending: shift past each special id in turn
        ids += ids >= s
    return ids
