"""Samplers for documents and task texts: bags of words drawn from category mixtures.

Each token first draws a category (own cluster, noise, background, function word, ...) and
then a word inside it, all vectorised over a whole corpus so default scale takes about a second.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from dontstop_jax.synthetic.spec import BenchmarkSpec
from dontstop_jax.synthetic.vocab import DomainLexicon, Lexicon

Pool = Literal["seen", "unseen", "all"]


def zipf(n: int, a: float = 1.0) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** a
    return w / w.sum()


def _lengths(rng: np.random.Generator, n: int, span: tuple[int, int]) -> np.ndarray:
    return rng.integers(span[0], span[1] + 1, size=n)


def _join(tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
    words = tokens.tolist()
    ends = np.cumsum(lengths).tolist()
    starts = [0] + ends[:-1]
    return [" ".join(words[a:b]) for a, b in zip(starts, ends)]


def _other(rng: np.random.Generator, k: np.ndarray, n_clusters: int) -> np.ndarray:
    """A uniformly random cluster different from k, elementwise."""
    return (k + rng.integers(1, n_clusters, size=k.shape)) % n_clusters


def general_corpus(lex: Lexicon, spec: BenchmarkSpec, rng: np.random.Generator) -> list[str]:
    """Pretraining text: each document is about one general topic (so MLM has structure to learn)."""
    n = spec.n_general_docs
    lengths = _lengths(rng, n, spec.doc_len)
    topic = rng.integers(spec.n_general_topics, size=n)
    doc_topic = np.repeat(topic, lengths)
    cat = rng.choice(3, size=doc_topic.size, p=spec.general_mix)
    function = np.array(lex.function)
    topics = np.array(lex.general_topics)
    general = np.array(lex.general_ranked)
    out = np.empty(doc_topic.size, dtype=object)
    m = cat == 0
    out[m] = function[rng.choice(function.size, m.sum(), p=zipf(function.size))]
    m = cat == 1
    out[m] = topics[doc_topic[m], rng.choice(topics.shape[1], m.sum(), p=zipf(topics.shape[1], 0.7))]
    m = cat == 2
    out[m] = general[rng.choice(general.size, m.sum(), p=zipf(general.size))]
    return _join(out, lengths)


def domain_corpus(
    lex: Lexicon, dom: DomainLexicon, spec: BenchmarkSpec, rng: np.random.Generator
) -> tuple[list[str], np.ndarray]:
    """Unlabeled domain text: each document is about one cluster, which is what DAPT can learn.

    Returns the documents and each document's cluster (ground truth, for analysis only).
    """
    n, n_clusters = spec.n_domain_docs, spec.n_clusters
    lengths = _lengths(rng, n, spec.doc_len)
    doc_cluster = rng.integers(n_clusters, size=n)
    k = np.repeat(doc_cluster, lengths)
    cat = rng.choice(6, size=k.size, p=spec.domain_mix)
    clusters = np.array([dom.cluster(c) for c in range(n_clusters)])
    # Frequency ranks inside a cluster are shuffled, so seen and unseen words share head and tail.
    rank_to_word = np.stack([rng.permutation(clusters.shape[1]) for _ in range(n_clusters)])
    p_cluster = zipf(clusters.shape[1], spec.cluster_zipf)
    background = np.array(dom.background)
    function = np.array(lex.function)
    general = np.array(lex.general_ranked)
    out = np.empty(k.size, dtype=object)
    for c, kk in ((0, None), (1, "other")):
        m = cat == c
        owner = k[m] if kk is None else _other(rng, k[m], n_clusters)
        ranks = rng.choice(clusters.shape[1], m.sum(), p=p_cluster)
        out[m] = clusters[owner, rank_to_word[owner, ranks]]
    m = cat == 2
    topics = np.array(lex.general_topics)[list(dom.anchors)]
    out[m] = topics[k[m], rng.choice(topics.shape[1], m.sum(), p=zipf(topics.shape[1], 0.7))]
    m = cat == 3
    out[m] = background[rng.choice(background.size, m.sum(), p=zipf(background.size))]
    m = cat == 4
    out[m] = function[rng.choice(function.size, m.sum(), p=zipf(function.size))]
    m = cat == 5
    out[m] = general[rng.choice(general.size, m.sum(), p=zipf(general.size))]
    return _join(out, lengths), doc_cluster


def task_texts(
    lex: Lexicon,
    dom: DomainLexicon,
    spec: BenchmarkSpec,
    rng: np.random.Generator,
    n: int,
    pool: Pool,
) -> tuple[list[str], np.ndarray]:
    """Short task texts whose label words come from `pool` (train: seen, dev/test: unseen, TAPT: all).

    Classes are exactly balanced; returns texts and their true (noise-free) cluster ids.
    """
    n_clusters = spec.n_clusters
    words = {
        "seen": [dom.seen[c] for c in range(n_clusters)],
        "unseen": [dom.unseen[c] for c in range(n_clusters)],
        "all": [dom.cluster(c) for c in range(n_clusters)],
    }[pool]
    clusters = np.array(words)
    truth = rng.permutation(np.arange(n) % n_clusters)
    lengths = _lengths(rng, n, spec.text_len)
    k = np.repeat(truth, lengths)
    cat = rng.choice(4, size=k.size, p=spec.task_mix)
    # Guarantee a minimum of label words per text, at random positions.
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for i in range(n):
        seg = cat[starts[i] : starts[i] + lengths[i]]
        short = spec.min_content_words - int((seg == 0).sum())
        if short > 0:
            seg[rng.choice(np.flatnonzero(seg != 0), short, replace=False)] = 0
    background = np.array(dom.background)
    function = np.array(lex.function)
    out = np.empty(k.size, dtype=object)
    for c in (0, 1):
        m = cat == c
        owner = k[m] if c == 0 else _other(rng, k[m], n_clusters)
        out[m] = clusters[owner, rng.integers(clusters.shape[1], size=m.sum())]
    m = cat == 2
    out[m] = background[rng.choice(background.size, m.sum(), p=zipf(background.size))]
    m = cat == 3
    out[m] = function[rng.choice(function.size, m.sum(), p=zipf(function.size))]
    if pool == "all":  # unlabeled text: some filler words become the cluster's anchor-topic words
        m = (cat >= 2) & (rng.random(k.size) < spec.unlabeled_anchor_share)
        topics = np.array(lex.general_topics)[list(dom.anchors)]
        out[m] = topics[k[m], rng.choice(topics.shape[1], m.sum(), p=zipf(topics.shape[1], 0.7))]
    return _join(out, lengths), truth


def noisy_labels(rng: np.random.Generator, truth: np.ndarray, n_clusters: int, rate: float) -> np.ndarray:
    """Flip each label with probability `rate` to a uniformly random other label."""
    flip = rng.random(truth.size) < rate
    return np.where(flip, _other(rng, truth, n_clusters), truth)
