"""The loader's masking before issue 26, kept as bench/data_pipeline.py's baseline (not used by the package).

It drew each row's randomness from a NumPy generator of its own, built per row per batch
(`default_rng([seed, epoch, block])`), and sorted every row's full word keys. Same block gather as today
(`MLMLoader.blocks`); plain and whole-word dynamic masking only (no span masking, no document segments).
"""

from __future__ import annotations

import math

import numpy as np

from dontstop_jax.data import MLMLoader
from dontstop_jax.data.masking import _random_tokens


class PerRowLoader(MLMLoader):
    """MLMLoader with the per-row-generator masking it had up to commit 4d8b0a2."""

    def masked(self, tokens: np.ndarray, epoch: int, block_ids: np.ndarray) -> dict[str, np.ndarray]:
        rngs = [np.random.default_rng([self.seed, epoch, int(b)]) for b in block_ids]
        starts = None if self._word_starts is None else self._word_starts[tokens]
        kw = self._mask.keywords
        return mask_per_row(tokens, rngs, kw["special_ids"], kw["vocab_size"], kw["mask_prob"], starts)


def mask_per_row(
    input_ids: np.ndarray,
    rngs: list[np.random.Generator],
    special_ids: dict,
    vocab_size: int,
    mask_prob: float,
    starts: np.ndarray | None,
) -> dict[str, np.ndarray]:
    batch, length = input_ids.shape
    slots = math.ceil(mask_prob * length)
    specials = np.unique(list(special_ids.values()))
    candidate = ~np.isin(input_ids, specials)
    n_candidates = candidate.sum(axis=1)
    budget = np.where(n_candidates > 0, np.minimum(slots, np.maximum(1, np.floor(mask_prob * n_candidates + 0.5))), 0)
    word_key, action, replace_u = np.stack([g.random((3, length)) for g in rngs], axis=1)

    previous = np.pad(candidate[:, :-1], ((0, 0), (1, 0)))
    begins = candidate & (True if starts is None else starts | ~previous)
    word = np.maximum(np.cumsum(begins, axis=1) - 1, 0)
    flat = (np.arange(batch)[:, None] * length + word)[candidate]
    word_len = np.bincount(flat, minlength=batch * length).reshape(batch, length)
    order = np.argsort(np.where(word_len > 0, word_key, np.inf), axis=1)
    sorted_len = np.take_along_axis(word_len, order, axis=1)
    taken_sorted = (sorted_len > 0) & (np.cumsum(sorted_len, axis=1) <= budget[:, None])
    taken = np.zeros_like(taken_sorted)
    np.put_along_axis(taken, order, taken_sorted, axis=1)
    selected = candidate & np.take_along_axis(taken, word, axis=1)

    masked = input_ids.astype(np.int32)
    masked[selected & (action < 0.8)] = special_ids["mask"]
    randomize = selected & (action >= 0.8) & (action < 0.9)
    masked[randomize] = _random_tokens(replace_u, specials, vocab_size)[randomize]
    rows, cols = np.nonzero(selected)
    slot = np.cumsum(selected, axis=1)[rows, cols] - 1
    out = {"input_ids": masked, "attention_mask": (input_ids != special_ids["pad"]).astype(np.int32)}
    for name, values, dtype in [
        ("mlm_positions", cols, np.int32),
        ("mlm_ids", input_ids[rows, cols], np.int32),
        ("mlm_weights", 1.0, np.float32),
    ]:
        out[name] = np.zeros((batch, slots), dtype)
        out[name][rows, slot] = values
    return out
