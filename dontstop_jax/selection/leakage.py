"""Keep dev/test text out of TAPT: drop selected documents that equal or nearly equal an evaluation example.

"Nearly equal" is measured on word n-gram shingles by the overlap coefficient |A n B| / min(|A|, |B|):
unlike Jaccard it also catches a long domain document that quotes a short test sentence verbatim (and a
fragment of a test example). An inverted index from shingle to example makes each check proportional to
the document's length, so it scales to large candidate sets.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable

import numpy as np

from dontstop_jax.selection.features import ngram_hashes, word_hashes, words


def text_key(text: str) -> bytes:
    """Identity of a text up to case, punctuation and spacing (exact-duplicate detection)."""
    return hashlib.blake2b(" ".join(words(text)).encode("utf-8"), digest_size=12).digest()


def shingles(text: str, n: int) -> np.ndarray:
    """Unique word n-gram hashes; a text shorter than n words is one shingle of all its words."""
    h = word_hashes(text)
    return np.unique(ngram_hashes(h, min(n, len(h)))) if len(h) else np.zeros(0, np.uint64)


class LeakageFilter:
    """Answers "does this text (nearly) equal one of the reference examples?" for a fixed reference set."""

    def __init__(self, references: Iterable[str], ngram: int = 3, threshold: float = 0.8):
        self.ngram, self.threshold = ngram, threshold
        self.exact: set[bytes] = set()
        self.sizes: list[int] = []
        self.postings: dict[int, list[int]] = defaultdict(list)
        for i, text in enumerate(references):
            self.exact.add(text_key(text))
            sh = shingles(text, ngram)
            self.sizes.append(len(sh))
            for s in sh.tolist():
                self.postings[s].append(i)

    def match(self, text: str) -> bool:
        if text_key(text) in self.exact:
            return True
        sh = shingles(text, self.ngram).tolist()
        shared = Counter(ref for s in sh for ref in self.postings.get(s, ()))
        return any(count >= self.threshold * min(self.sizes[ref], len(sh)) for ref, count in shared.items())
