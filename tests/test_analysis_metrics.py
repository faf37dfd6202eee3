"""classification_metrics on hand-computed cases and against sklearn."""

from __future__ import annotations

import numpy as np
import pytest

from dontstop_jax.analysis import classification_metrics, confusion_matrix
from dontstop_jax.errors import UserError


def test_hand_computed_case_skips_absent_classes():
    # class 0: tp 1, fp 1, fn 1 -> F1 1/2; class 1: tp 2, fp 1 -> 4/5; class 2: fn 1 -> 0; class 3 absent
    scores = classification_metrics(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), num_labels=4)
    assert scores == pytest.approx({"accuracy": 0.6, "macro_f1": (0.5 + 0.8 + 0.0) / 3, "micro_f1": 0.6})


def test_perfect_and_all_wrong():
    y = np.array([2, 0, 1, 2])
    assert classification_metrics(y, y, 3) == {"accuracy": 1.0, "macro_f1": 1.0, "micro_f1": 1.0}
    assert classification_metrics(y, (y + 1) % 3, 3) == {"accuracy": 0.0, "macro_f1": 0.0, "micro_f1": 0.0}


def test_weights_drop_padding_and_act_as_counts():
    y_true, y_pred = np.array([0, 1, 1, 2]), np.array([0, 1, 0, 2])
    padded = classification_metrics(np.append(y_true, 3), np.append(y_pred, 3), 4, weights=np.array([1, 1, 1, 1, 0]))
    assert padded == classification_metrics(y_true, y_pred, 4)  # the zero-weight class 3 adds no F1 of 1.0
    doubled = classification_metrics(y_true, y_pred, 3, weights=np.array([1, 2, 1, 1]))
    assert doubled == pytest.approx(classification_metrics(np.array([0, 1, 1, 1, 2]), np.array([0, 1, 1, 0, 2]), 3))


def test_confusion_matrix_rows_are_truth():
    cm = confusion_matrix(np.array([0, 0, 1]), np.array([1, 1, 1]), 2)
    np.testing.assert_array_equal(cm, [[0, 2], [0, 1]])


@pytest.mark.parametrize("num_labels", [2, 3, 13])
def test_matches_sklearn(num_labels):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(num_labels)
    for trial in range(20):
        n = int(rng.integers(1, 60))
        y_true = rng.integers(0, num_labels, n)
        y_pred = np.where(rng.random(n) < 0.5, y_true, rng.integers(0, num_labels, n))
        weights = rng.uniform(0.1, 3.0, n) if trial % 2 else None
        scores = classification_metrics(y_true, y_pred, num_labels, weights)
        expected = {
            "accuracy": sk.accuracy_score(y_true, y_pred, sample_weight=weights),
            "macro_f1": sk.f1_score(y_true, y_pred, average="macro", zero_division=0, sample_weight=weights),
            "micro_f1": sk.f1_score(y_true, y_pred, average="micro", zero_division=0, sample_weight=weights),
        }
        assert scores == pytest.approx(expected)
        assert scores["micro_f1"] == pytest.approx(scores["accuracy"])


@pytest.mark.parametrize(
    "y_true, y_pred, weights, match",
    [
        (np.array([0, 1]), np.array([0]), None, "1-D of one length"),
        (np.array([0, 3]), np.array([0, 1]), None, r"\[0, 3\)"),
        (np.array([0, 1]), np.array([0.0, 1.0]), None, "integer class ids"),
        (np.array([0, 1]), np.array([0, 1]), np.array([1.0, -1.0]), "non-negative"),
        (np.array([0, 1]), np.array([0, 1]), np.array([0.0, 0.0]), "no examples"),
    ],
)
def test_bad_input(y_true, y_pred, weights, match):
    with pytest.raises(UserError, match=match):
        classification_metrics(y_true, y_pred, 3, weights)
