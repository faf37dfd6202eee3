"""DSIR (Xie et al. 2023): importance resampling of raw documents towards a target distribution.

Both distributions are smoothed categorical models over hashed unigram + bigram features; a document's
log importance weight is sum over its features of count x (log p_target - log p_raw). Sampling n documents
without replacement proportionally to the weights is a top-n of log weight + Gumbel noise; with equal
weights the same top-n is a uniform random sample, which is how RAND-TAPT draws its documents.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dontstop_jax.selection.features import hashed_counts


def feature_distribution(texts: Sequence[str], dim: int, ngrams: Sequence[int], smoothing: float = 1.0) -> np.ndarray:
    """log p(feature) of the texts' hashed n-gram counts, add-`smoothing`."""
    _, cols, counts = hashed_counts(texts, dim, ngrams)
    total = np.bincount(cols, weights=counts, minlength=dim) + smoothing
    return np.log(total / total.sum())


def log_importance(texts: Sequence[str], log_ratio: np.ndarray, ngrams: Sequence[int]) -> np.ndarray:
    """Per text: sum of count x log_ratio over its hashed features."""
    rows, cols, counts = hashed_counts(texts, len(log_ratio), ngrams)
    return np.bincount(rows, weights=counts * log_ratio[cols], minlength=len(texts))


def gumbel_keys(log_weights: np.ndarray, seed: int, chunk_index: int) -> np.ndarray:
    """Sampling keys; the noise of chunk c depends only on (seed, c), so resumed runs draw the same sample."""
    return log_weights + np.random.default_rng([seed, chunk_index]).gumbel(size=len(log_weights))
