"""Hashed word n-gram counts: the sparse text features shared by TF-IDF, the VAMPIRE vocabulary and DSIR.

Words are hashed with CRC32 (stable across processes and machines, unlike Python's `hash`), so features
need no vocabulary pass and a resumed run sees the same columns. Counts are returned as COO triplets
(row, column, count) because a dense [docs, 2^16] matrix would not fit a chunk's memory budget.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"\w+")
_BIGRAM_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier: (a, b) and (b, a) hash apart


@functools.lru_cache(maxsize=1 << 20)
def _word_hash(word: str) -> int:
    return zlib.crc32(word.encode("utf-8"))


def words(text: str) -> list[str]:
    """Lower-cased word tokens; the normalisation every feature and the leakage filter agree on."""
    return _WORD.findall(text.lower())


def word_hashes(text: str) -> np.ndarray:
    return np.fromiter((_word_hash(w) for w in words(text)), np.uint64)


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of the consecutive n-grams of a word-hash sequence (n=1 returns it unchanged)."""
    out = hashes[: len(hashes) - n + 1].copy() if len(hashes) >= n else np.zeros(0, np.uint64)
    for i in range(1, n):
        out = out * _BIGRAM_MIX + hashes[i : len(hashes) - n + 1 + i]
    return out


def hashed_counts(texts: Sequence[str], dim: int, ngrams: Sequence[int] = (1,)) -> tuple[np.ndarray, ...]:
    """COO (row, column, count) of the texts' n-gram counts hashed into `dim` columns, sorted by (row, column)."""
    rows, cols = [], []
    for r, text in enumerate(texts):
        h = word_hashes(text)
        feats = np.concatenate([ngram_hashes(h, n) for n in ngrams]) % np.uint64(dim)
        rows.append(np.full(len(feats), r, np.int64))
        cols.append(feats.astype(np.int64))
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    key = np.concatenate(rows) * dim + np.concatenate(cols)
    uniq, counts = np.unique(key, return_counts=True)
    return uniq // dim, uniq % dim, counts.astype(np.float32)


def dense_counts(texts: Sequence[str], dim: int, ngrams: Sequence[int] = (1,)) -> np.ndarray:
    """[len(texts), dim] float32 counts (for moderate `dim`: the TF-IDF and VAMPIRE inputs)."""
    rows, cols, counts = hashed_counts(texts, dim, ngrams)
    out = np.zeros((len(texts), dim), np.float32)
    out[rows, cols] = counts
    return out
