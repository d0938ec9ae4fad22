"""Classification metrics from probabilities: accuracy, per-class P/R/F1, confusion, ECE."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from training.calibrate import expected_calibration_error, nll


def confusion_matrix(targets: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """``cm[true, predicted]`` counts."""
    cm = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(cm, (targets, predicted), 1)
    return cm


def classification_metrics(probs: np.ndarray, targets: np.ndarray, labels: Sequence[str]) -> dict:
    """JSON-ready metrics of ``probs`` ``(N, C)`` against ``targets``.

    Precision of a class never predicted is reported as 0 (no correct
    prediction to its name), as scikit-learn's ``zero_division=0`` does.
    """
    predicted = probs.argmax(axis=1)
    cm = confusion_matrix(targets, predicted, len(labels))
    true_positive = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted_count = cm.sum(axis=0)
    precision = np.divide(
        true_positive, predicted_count, out=np.zeros_like(true_positive), where=predicted_count > 0
    )
    recall = np.divide(true_positive, support, out=np.zeros_like(true_positive), where=support > 0)
    pr_sum = precision + recall
    f1 = np.divide(2 * precision * recall, pr_sum, out=np.zeros_like(pr_sum), where=pr_sum > 0)
    present = support > 0
    per_class = {
        name: {
            "precision": round(float(precision[i]), 4),
            "recall": round(float(recall[i]), 4),
            "f1": round(float(f1[i]), 4),
            "support": int(support[i]),
        }
        for i, name in enumerate(labels)
        if present[i]
    }
    return {
        "samples": len(targets),
        "accuracy": round(float((predicted == targets).mean()), 4),
        "macro_f1": round(float(f1[present].mean()), 4),
        "nll": round(nll(probs, targets), 4),
        "ece": round(expected_calibration_error(probs, targets), 4),
        "per_class": per_class,
        "confusion": cm.tolist(),
    }
