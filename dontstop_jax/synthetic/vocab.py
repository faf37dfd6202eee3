"""Pseudo-word vocabularies: general words, and per domain background words plus label clusters.

Words are random syllable strings, so their spelling says nothing about their cluster: the only
way to learn which unseen word belongs to which label is co-occurrence in unlabeled text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dontstop_jax.synthetic.spec import GENERAL_OVERLAP, LABEL_NAMES, BenchmarkSpec

_ONSETS = tuple("bdfghjklmnprstvwz") + ("br", "dr", "gr", "kr", "pl", "st", "tr", "ch", "sh", "th")
_VOWELS = tuple("aeiou") + ("ai", "ou")
_CODAS = ("", "", "", "n", "r", "s", "l", "m", "t", "k", "x")
_SIMPLE_ONSETS = tuple("bdfgklmnprstvz")


@dataclass(frozen=True)
class DomainLexicon:
    """One domain's words: frequent background jargon, and per label a seen/unseen split."""

    name: str
    background: tuple[str, ...]
    labels: tuple[str, ...]
    seen: tuple[tuple[str, ...], ...]  # [cluster][word]: words the labeled train split may use
    unseen: tuple[tuple[str, ...], ...]  # [cluster][word]: words only dev/test use
    anchors: tuple[int, ...]  # [cluster]: the general topic whose words accompany it in domain text

    def cluster(self, k: int) -> tuple[str, ...]:
        return self.seen[k] + self.unseen[k]

    def to_json(self) -> dict:
        return {
            "background_words": list(self.background),
            "clusters": {
                label: {"seen": list(self.seen[k]), "unseen": list(self.unseen[k]), "anchor_topic": self.anchors[k]}
                for k, label in enumerate(self.labels)
            },
        }


@dataclass(frozen=True)
class Lexicon:
    function: tuple[str, ...]  # shared grammar words, ordered by frequency rank
    general_topics: tuple[tuple[str, ...], ...]
    general_ranked: tuple[str, ...]  # general content words in Zipf rank order (most frequent first)
    domains: dict[str, DomainLexicon]

    @property
    def general_content(self) -> tuple[str, ...]:
        return tuple(w for topic in self.general_topics for w in topic)

    def all_words(self) -> list[str]:
        words = set(self.function) | set(self.general_content)
        for d in self.domains.values():
            words |= set(d.background)
            for k in range(len(d.labels)):
                words |= set(d.cluster(k))
        return sorted(words)

    def to_json(self) -> dict:
        return {
            "general": {
                "function_words": list(self.function),
                "topics": [list(t) for t in self.general_topics],
            },
            "domains": {name: d.to_json() for name, d in self.domains.items()},
        }


def _syllable(rng: np.random.Generator, onsets: tuple[str, ...], coda: bool) -> str:
    s = onsets[rng.integers(len(onsets))] + _VOWELS[rng.integers(len(_VOWELS))]
    return s + _CODAS[rng.integers(len(_CODAS))] if coda else s


def _pseudo_word(rng: np.random.Generator, n_syllables: int) -> str:
    """Pronounceable: consonant-vowel syllables, a consonant coda only at the end."""
    return "".join(_syllable(rng, _ONSETS, coda=i == n_syllables - 1) for i in range(n_syllables))


def _fresh(rng: np.random.Generator, n: int, taken: set[str], make: Callable[[np.random.Generator], str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = make(rng)
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def build_lexicon(spec: BenchmarkSpec) -> Lexicon:
    """All vocabularies, from the seed alone (not the scale), all words distinct."""
    rng = np.random.default_rng([spec.seed, 1])
    taken: set[str] = set()

    def short(r: np.random.Generator) -> str:  # function words: one short syllable
        return _syllable(r, _SIMPLE_ONSETS, coda=bool(r.integers(2)))

    def content(r: np.random.Generator) -> str:
        return _pseudo_word(r, int(r.integers(2, 4)))

    def jargon(r: np.random.Generator) -> str:  # domain words run a little longer, like terms
        return _pseudo_word(r, int(r.integers(2, 4)))

    function = tuple(_fresh(rng, spec.n_function_words, taken, short))
    general_topics = tuple(
        tuple(_fresh(rng, spec.general_topic_size, taken, content)) for _ in range(spec.n_general_topics)
    )
    general_content = [w for t in general_topics for w in t]
    general_ranked = tuple(general_content[i] for i in rng.permutation(len(general_content)))
    head = general_ranked[: 2 * spec.n_background_words]  # borrow frequent words, as news shares "said", "year"
    domains: dict[str, DomainLexicon] = {}
    anchor_pool = iter(rng.permutation(spec.n_general_topics).tolist())  # distinct across domains
    for name in spec.domains:
        n_borrow = round(GENERAL_OVERLAP.get(name, 0.0) * spec.n_background_words)
        borrowed = [head[i] for i in rng.choice(len(head), n_borrow, replace=False)]
        # Borrowed words take the most frequent background ranks, so they show in top-K overlaps.
        background = tuple(borrowed + _fresh(rng, spec.n_background_words - n_borrow, taken, jargon))
        clusters = [_fresh(rng, spec.cluster_size, taken, jargon) for _ in range(spec.n_clusters)]
        domains[name] = DomainLexicon(
            name=name,
            background=background,
            labels=LABEL_NAMES[: spec.n_clusters],
            seen=tuple(tuple(c[: spec.n_seen]) for c in clusters),
            unseen=tuple(tuple(c[spec.n_seen :]) for c in clusters),
            anchors=tuple(next(anchor_pool) for _ in clusters),
        )
    return Lexicon(function=function, general_topics=general_topics, general_ranked=general_ranked, domains=domains)
