"""Reference scores of a task that need no model: what a fine-tune must beat to have learned anything.

On real ChemProt a small model's variants all scored 36.2-40.1 micro-F1 while always predicting the majority
class scores 36.2, and nothing in the table said so. So the grid puts references beside the variants:

- majority class: the most frequent train label predicted for every example;
- bag-of-words LR: multinomial logistic regression on tf-idf word counts of the train texts (the words of
  `WORD`, lowercased; the `MAX_WORDS` most frequent train words), fitted by Nesterov-accelerated gradient
  descent from zero, so the same data always gives the same score. It shows what the words alone give.
- static word vectors LR: the same regression on each text's average input embedding (the base model's
  token embedding table, frozen; centred on the train mean, rows scaled to unit length): word meanings
  without context. With the bag of words, a learning curve shows where the contextual model earns its cost.

Both are scored by `classification_metrics`, the function that scores the fine-tunes. numpy only:
scikit-learn is a test dependency, not a run-time one.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dontstop_jax.analysis.metrics import classification_metrics

MAJORITY, BAG_OF_WORDS, STATIC_VECTORS = "majority class", "bag-of-words LR", "static word vectors LR"
DESCRIPTIONS = {
    MAJORITY: "the most frequent train label for every example",  # the table's legend
    BAG_OF_WORDS: "logistic regression on tf-idf word counts of the train texts",
    STATIC_VECTORS: "logistic regression on the base model's input embeddings averaged over a text",
}
WORD = re.compile(r"\w+")
MAX_WORDS = 20_000
STEPS = 300  # matched scikit-learn's converged fit on a synthetic check; 180K sentences: 1.5 min on 2 cores

Splits = Mapping[str, tuple[Sequence[str], np.ndarray]]  # split -> (texts, label ids), as Task.splits
Embed = Callable[[Sequence[str]], np.ndarray]  # texts -> [len(texts), d] features


def majority_label(train_labels: np.ndarray) -> int:
    """The most frequent train label; on a tie the smallest id, so the choice never depends on order."""
    return int(np.argmax(np.bincount(np.asarray(train_labels))))


def majority_scores(train_labels: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """The metrics of predicting the train majority class for every example of `labels`."""
    labels = np.asarray(labels)
    return classification_metrics(labels, np.full_like(labels, majority_label(train_labels)), num_labels)


def at_majority_level(best_dev: float, majority_dev: float) -> bool:
    """The rule for "this fine-tune may have learned nothing": its best dev score is no higher than the
    majority class's. A model that predicts one class for everything ties it exactly (the same counts give
    the same float), so ties count as not learned."""
    return best_dev <= majority_dev


@dataclass(frozen=True)
class _Sparse:
    """A [rows, cols] matrix as coordinate triples. Dense operands are class-major ([k, rows] or [k, cols]):
    one contiguous gather and one bincount per class is several times faster than a [n, k] layout."""

    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    shape: tuple[int, int]

    def dot(self, w: np.ndarray) -> np.ndarray:
        """(self @ w.T).T for w [k, cols]: [k, rows]."""
        return np.stack(
            [np.bincount(self.rows, weights=self.values * wj[self.cols], minlength=self.shape[0]) for wj in w]
        )

    def tdot(self, g: np.ndarray) -> np.ndarray:
        """(self.T @ g.T).T for g [k, rows]: [k, cols]."""
        return np.stack(
            [np.bincount(self.cols, weights=self.values * gj[self.rows], minlength=self.shape[1]) for gj in g]
        )


@dataclass(frozen=True)
class _Dense:
    """A [rows, cols] array with `_Sparse`'s two products, so one regression fits either."""

    matrix: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.matrix.shape

    def dot(self, w: np.ndarray) -> np.ndarray:
        return w @ self.matrix.T

    def tdot(self, g: np.ndarray) -> np.ndarray:
        return g @ self.matrix


def vocabulary(texts: Sequence[str], max_words: int = MAX_WORDS) -> dict[str, int]:
    """The `max_words` most frequent words of `texts` (ties by spelling, so the cut is deterministic) -> column."""
    counts = Counter(word for text in texts for word in WORD.findall(text.lower()))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:max_words]
    return {word: i for i, (word, _) in enumerate(ranked)}


def _counts(texts: Sequence[str], vocab: Mapping[str, int]) -> _Sparse:
    rows: list[int] = []
    cols: list[int] = []
    values: list[int] = []
    for i, text in enumerate(texts):
        counts = Counter(vocab[w] for w in WORD.findall(text.lower()) if w in vocab)
        rows += [i] * len(counts)
        cols += counts.keys()
        values += counts.values()
    return _Sparse(
        np.array(rows, np.int64), np.array(cols, np.int64), np.array(values, np.float64), (len(texts), len(vocab))
    )


def _tfidf(counts: _Sparse, idf: np.ndarray) -> _Sparse:
    """Counts times idf, each row scaled to unit length: the step size below relies on rows of norm <= 1."""
    values = counts.values * idf[counts.cols]
    norms = np.sqrt(np.bincount(counts.rows, weights=values**2, minlength=counts.shape[0]))
    return _Sparse(counts.rows, counts.cols, values / norms[counts.rows], counts.shape)


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Over axis 0 (classes)."""
    e = np.exp(logits - logits.max(axis=0))
    return e / e.sum(axis=0)


def _logistic_regression(
    x: _Sparse | _Dense, labels: np.ndarray, num_labels: int, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Weights [k, cols] and bias [k, 1] of multinomial logistic regression on rows of norm <= 1.

    Mean cross-entropy plus (l2 / 2) * |W|^2 with l2 = 1 / len(train) (scikit-learn's default strength, C=1;
    the bias is not penalised). With unit-norm rows and a bias feature of 1, the loss's gradient is
    (1 + l2)-Lipschitz (the softmax's Hessian is at most 1/2), so step 1 / (1 + l2) is safe without a search.
    Nesterov-accelerated from zero: the same data always gives the same fit.
    """
    n = len(labels)
    y = np.eye(num_labels)[:, np.asarray(labels)]  # [class, example], like the logits
    l2 = 1.0 / n
    step = 1.0 / (1.0 + l2)
    w, b = np.zeros((num_labels, x.shape[1])), np.zeros((num_labels, 1))
    w_prev, b_prev = w, b
    for t in range(1, steps + 1):
        momentum = (t - 1) / (t + 2)
        w_look, b_look = w + momentum * (w - w_prev), b + momentum * (b - b_prev)
        error = (_softmax(x.dot(w_look) + b_look) - y) / n
        w_prev, b_prev = w, b
        w = w_look - step * (x.tdot(error) + l2 * w_look)
        b = b_look - step * error.sum(axis=1, keepdims=True)
    return w, b


def bag_of_words_predict(
    train_texts: Sequence[str],
    train_labels: np.ndarray,
    texts: Sequence[Sequence[str]],
    num_labels: int,
    *,
    steps: int = STEPS,
) -> list[np.ndarray]:
    """Fit the bag-of-words logistic regression on train; its predicted label ids for each list of `texts`."""
    vocab = vocabulary(train_texts)
    train = _counts(train_texts, vocab)
    df = np.bincount(train.cols, minlength=len(vocab))
    idf = np.log((1 + len(train_texts)) / (1 + df)) + 1  # smoothed, as scikit-learn's TfidfVectorizer
    w, b = _logistic_regression(_tfidf(train, idf), train_labels, num_labels, steps)
    return [np.argmax(_tfidf(_counts(split, vocab), idf).dot(w) + b, axis=0) for split in texts]


def mean_embeddings(embeddings: np.ndarray, encode: Callable[[Sequence[str]], list[list[int]]]) -> Embed:
    """texts -> the average row of `embeddings` ([vocab, d], a model's input embeddings) over each text's token
    ids from `encode` (zeros for a text without tokens)."""

    def embed(texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), embeddings.shape[1]))
        for i, ids in enumerate(encode(texts)):
            if ids:
                out[i] = embeddings[ids].mean(axis=0)
        return out

    return embed


def static_vectors_predict(
    train_vectors: np.ndarray,
    train_labels: np.ndarray,
    vectors: Sequence[np.ndarray],
    num_labels: int,
    *,
    steps: int = STEPS,
) -> list[np.ndarray]:
    """Fit logistic regression on averaged word vectors; its predicted label ids for each array of `vectors`.
    Centred on the train mean (embedding tables share a large common direction) and scaled to unit rows."""
    centre = train_vectors.mean(axis=0)

    def rows(v: np.ndarray) -> _Dense:
        v = v - centre
        return _Dense(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12))

    w, b = _logistic_regression(rows(train_vectors), train_labels, num_labels, steps)
    return [np.argmax(rows(v).dot(w) + b, axis=0) for v in vectors]


def task_references(splits: Splits, num_labels: int, embed: Embed | None = None) -> list[dict[str, Any]]:
    """The references' dev and test metrics: [{"reference": name, "dev": {...}, "test": {...}}, ...], the static
    word vectors' only with an `embed` (see `mean_embeddings`). `splits` needs train, dev and test (see
    data.tasks.require_splits)."""
    (train_texts, train_labels), scored = splits["train"], ("dev", "test")

    def scores(predicted: list[np.ndarray]) -> dict[str, dict[str, float]]:
        return {
            s: classification_metrics(np.asarray(splits[s][1]), p, num_labels)
            for s, p in zip(scored, predicted, strict=True)
        }

    references = [
        {"reference": MAJORITY, **{s: majority_scores(train_labels, splits[s][1], num_labels) for s in scored}},
        {
            "reference": BAG_OF_WORDS,
            **scores(bag_of_words_predict(train_texts, train_labels, [splits[s][0] for s in scored], num_labels)),
        },
    ]
    if embed is not None:
        predicted = static_vectors_predict(
            embed(train_texts), train_labels, [embed(splits[s][0]) for s in scored], num_labels
        )
        references.append({"reference": STATIC_VECTORS, **scores(predicted)})
    return references
