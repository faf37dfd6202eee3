"""Classification scores from host predictions, in numpy (no sklearn dependency at run time).

The paper reports macro-F1 for most tasks and micro-F1 for ChemProt and RCT. Micro-F1 here pools true
positives, false positives and false negatives over the scored classes; for single-label multiclass with
every class scored, each error is one FP and one FN, so it equals accuracy, which is what the paper's
micro-F1 numbers are.
"""

from __future__ import annotations

import numpy as np

from dontstop_jax.errors import UserError
from dontstop_jax.fields import METRICS


def confusion_matrix(
    y_true: np.ndarray, y_pred: np.ndarray, num_labels: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """[num_labels, num_labels] weighted counts, rows = true label, columns = prediction."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape:
        raise UserError(
            f"labels {y_true.shape} and predictions {y_pred.shape} must be 1-D of one length; "
            "flatten them and drop padding"
        )
    for name, labels in (("labels", y_true), ("predictions", y_pred)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"{name} have dtype {labels.dtype}; pass integer class ids (argmax the logits)")
        if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
            raise UserError(
                f"{name} must lie in [0, {num_labels}), got {labels.min()}..{labels.max()}; "
                "check num_labels and the label mapping"
            )
    w = np.ones(y_true.shape) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != y_true.shape or (w < 0).any():
        raise UserError(
            f"weights must be non-negative with shape {y_true.shape}, got shape {w.shape}; "
            "pass one weight per example (0 for padding)"
        )
    cells = y_true.astype(np.int64) * num_labels + y_pred.astype(np.int64)
    return np.bincount(cells, weights=w, minlength=num_labels**2).reshape(num_labels, num_labels)


def check_metric(metric: str, where: str = "train.metric") -> str:
    if metric not in METRICS:
        raise UserError(f"{where}={metric!r} is not a metric we compute; use one of {', '.join(METRICS)}")
    return metric


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, num_labels: int, weights: np.ndarray | None = None
) -> dict[str, float]:
    """accuracy, macro_f1 and micro_f1 (fractions in [0, 1]) of integer predictions.

    `weights` are per-example (0 drops the padding of a static-shape eval batch). Like sklearn's default
    (zero_division=0), macro-F1 averages per-class F1 over the classes that occur in y_true or y_pred;
    "occur" means with positive weight, so padding does not add classes (sklearn would count them).
    """
    cm = confusion_matrix(y_true, y_pred, num_labels, weights)
    total = cm.sum()
    if total <= 0:
        raise UserError("no examples to score (empty input or all weights 0); evaluate a non-empty split")
    tp = np.diag(cm)
    fp, fn = cm.sum(axis=0) - tp, cm.sum(axis=1) - tp
    present = (tp + fp + fn) > 0
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=present)
    return {  # keys: METRICS
        "accuracy": float(tp.sum() / total),
        "macro_f1": float(f1[present].mean()),
        "micro_f1": float(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum())),
    }
