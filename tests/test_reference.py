"""Reference scores without a model: the majority class and the bag-of-words logistic regression."""

from __future__ import annotations

import numpy as np
import pytest

from dontstop_jax.analysis import classification_metrics
from dontstop_jax.analysis.reference import (
    BAG_OF_WORDS,
    MAJORITY,
    at_majority_level,
    bag_of_words_predict,
    majority_label,
    majority_scores,
    task_references,
    vocabulary,
)


def test_majority_class_is_the_most_frequent_train_label_scored_like_a_fine_tune():
    assert majority_label(np.array([0, 1, 1, 2])) == 1
    assert majority_label(np.array([2, 0, 2, 0])) == 0  # a tie goes to the smallest id
    scores = majority_scores(np.array([0, 1, 1, 2]), np.array([1, 1, 0, 2, 1]), num_labels=3)
    # Class 1 predicted everywhere: 3 of 5 right; its F1 is 2*3 / (2*3 + 2 + 0); classes 0 and 2 score 0.
    assert scores == pytest.approx({"accuracy": 0.6, "micro_f1": 0.6, "macro_f1": 0.75 / 3})


def test_the_flag_rule_counts_a_tie_with_the_majority_class_as_not_learned():
    assert at_majority_level(0.362, 0.362) and at_majority_level(0.30, 0.362)
    assert not at_majority_level(0.363, 0.362)


def test_vocabulary_keeps_the_most_frequent_words_ties_by_spelling():
    assert vocabulary(["b A a, c", "c!"], max_words=2) == {"a": 0, "c": 1}


def _texts(rng: np.random.Generator, labels: np.ndarray, words: list[list[str]], noise: list[str]) -> list[str]:
    """Each text: 3 words of its label's list among 5 noise words."""
    return [" ".join(rng.permutation([*rng.choice(words[y], 3), *rng.choice(noise, 5)])) for y in labels]


def test_bag_of_words_separates_a_separable_task_and_is_at_chance_on_random_labels():
    rng = np.random.default_rng(0)
    words = [[f"alpha{i}" for i in range(20)], [f"beta{i}" for i in range(20)], [f"gamma{i}" for i in range(20)]]
    noise = [f"noise{i}" for i in range(50)]
    train_y, test_y = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    train, test = _texts(rng, train_y, words, noise), _texts(rng, test_y, words, noise)
    (predicted,) = bag_of_words_predict(train, train_y, [test], 3)
    assert (predicted == test_y).mean() == 1.0
    # Labels that have nothing to do with the words: as good as a coin, however well train is fitted.
    texts = [" ".join(rng.choice(noise, 8)) for _ in range(800)]
    labels = rng.integers(0, 2, 800)
    (predicted,) = bag_of_words_predict(texts[:400], labels[:400], [texts[400:]], 2)
    assert 0.42 < (predicted == labels[400:]).mean() < 0.58
    (again,) = bag_of_words_predict(texts[:400], labels[:400], [texts[400:]], 2)
    np.testing.assert_array_equal(again, predicted)  # deterministic


def test_task_references_score_dev_and_test_of_both_references():
    splits = {
        "train": (["good film", "great film", "bad film", "good fun"], np.array([1, 1, 0, 1], np.int32)),
        "dev": (["good", "bad"], np.array([1, 0], np.int32)),
        "test": (["great fun", "bad bad", "bad"], np.array([1, 0, 0], np.int32)),
    }
    majority, bag = task_references(splits, num_labels=2)
    assert majority["reference"] == MAJORITY and bag["reference"] == BAG_OF_WORDS
    assert majority["dev"] == majority_scores(splits["train"][1], splits["dev"][1], 2)
    assert majority["test"] == classification_metrics(splits["test"][1], np.array([1, 1, 1]), 2)
    predicted = bag_of_words_predict(splits["train"][0], splits["train"][1], [["good", "bad"], splits["test"][0]], 2)
    assert [bag["dev"], bag["test"]] == [
        classification_metrics(splits[s][1], p, 2) for s, p in zip(("dev", "test"), predicted)
    ]
