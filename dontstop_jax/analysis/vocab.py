"""Vocabulary overlap between corpora (the paper's Figure 2): why a domain needs adaptation.

Each corpus' documents are streamed, lower-cased and split into words; stopwords are dropped and the
`top_k` most frequent words are kept. Overlap of two such vocabularies is |A ∩ B| / min(|A|, |B|) in
percent (the paper's |A ∩ B| / 10K when both have top_k words).

Documents alternate between two disjoint halves (even / odd positions) and row i, column j compares
half 0 of corpus i with half 1 of corpus j: the diagonal is then the overlap of two independent samples
of one corpus (a baseline for the off-diagonal cells) instead of a trivial 100%.
"""

from __future__ import annotations

import csv
import itertools
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dontstop_jax.data.corpus import SourceSpec, iter_documents
from dontstop_jax.errors import UserError

# Common English function words: they top every corpus' counts and would make all corpora look alike.
STOPWORDS = frozenset(
    """
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the
their theirs them themselves then there these they this those through to too under until up very was we
were what when where which while who whom why will with would you your yours yourself yourselves
also may might must shall us one two via per et al
""".split()
)

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")


def words(text: str) -> list[str]:
    """Lower-cased alphabetic words ("don't" stays one word); digits and punctuation separate words."""
    return _WORD.findall(text.lower())


def unigram_counts(docs: Iterable[str], stopwords: frozenset[str] = STOPWORDS) -> Counter[str]:
    counts: Counter[str] = Counter()
    for doc in docs:
        counts.update(w for w in words(doc) if w not in stopwords)
    return counts


def top_words(counts: Counter[str], k: int) -> frozenset[str]:
    """The k most frequent words; ties broken alphabetically so the set is deterministic."""
    return frozenset(w for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))[:k])


def overlap_percent(a: frozenset[str], b: frozenset[str]) -> float:
    if not a or not b:
        raise UserError("a vocabulary is empty (only stopwords or no words); check the corpus sources")
    return 100.0 * len(a & b) / min(len(a), len(b))


@dataclass(frozen=True)
class VocabOverlap:
    """overlap[i, j] = % of half 0 of corpus i's top words shared with half 1 of corpus j's."""

    names: tuple[str, ...]
    overlap: np.ndarray
    top_k: int
    docs: tuple[int, ...]  # documents read per corpus

    def write_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["corpus", *self.names])
            for name, row in zip(self.names, self.overlap):
                writer.writerow([name, *(f"{v:.2f}" for v in row)])

    def to_markdown(self) -> str:
        lines = ["| half 0 \\ half 1 | " + " | ".join(self.names) + " |", "|:--" + "|--:" * len(self.names) + "|"]
        lines += [
            f"| {name} | " + " | ".join(f"{v:.1f}" for v in row) + " |" for name, row in zip(self.names, self.overlap)
        ]
        return "\n".join(lines) + "\n"


def vocab_overlap(
    corpora: Mapping[str, Sequence[SourceSpec]], top_k: int = 10_000, max_docs: int | None = None
) -> VocabOverlap:
    """The overlap matrix of `corpora` ({name: sources}), reading at most `max_docs` documents of each."""
    if top_k < 1:
        raise UserError(f"vocab top_k must be >= 1, got {top_k}")
    halves, docs = {}, []
    for name, sources in corpora.items():
        stream = itertools.chain.from_iterable(iter_documents(s) for s in sources)
        texts = list(itertools.islice(stream, max_docs))
        if len(texts) < 2:
            raise UserError(f"corpus {name!r} has {len(texts)} document(s); the overlap needs >= 2 to split in halves")
        halves[name] = tuple(top_words(unigram_counts(texts[h::2]), top_k) for h in (0, 1))
        docs.append(len(texts))
    names = tuple(corpora)
    matrix = np.array([[overlap_percent(halves[a][0], halves[b][1]) for b in names] for a in names])
    return VocabOverlap(names, matrix, top_k, tuple(docs))
