"""Classification metrics with numpy only: accuracy, per-class precision/recall/F1/support, macro-F1, balanced
accuracy, confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

MAX_CONFUSION_CLASSES = 1000
"""Above this many classes the confusion matrix (C x C) is left out of the metrics (None)."""


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, C]`` counts, rows = true class, columns = predicted class."""
    flat = np.asarray(targets, dtype=np.int64) * num_classes + np.asarray(predictions, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_report(targets: np.ndarray, predictions: np.ndarray, class_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{name: {precision, recall, f1, support}}``; a ratio with a zero denominator is 0.0."""
    num_classes = len(class_names)
    targets = np.asarray(targets, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    true_positive = np.bincount(targets[targets == predictions], minlength=num_classes)
    support = np.bincount(targets, minlength=num_classes)
    predicted = np.bincount(predictions, minlength=num_classes)
    report: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(class_names):
        tp, sup, pred = int(true_positive[index]), int(support[index]), int(predicted[index])
        precision = tp / pred if pred else 0.0
        recall = tp / sup if sup else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report[name] = {"precision": precision, "recall": recall, "f1": f1, "support": sup}
    return report


def classification_metrics(targets: np.ndarray, predictions: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """accuracy, macro_f1, balanced_accuracy, per_class, confusion_matrix (list of lists, or None above
    MAX_CONFUSION_CLASSES).

    ``macro_f1`` is the unweighted mean F1 and ``balanced_accuracy`` the mean recall, both over the classes
    present in ``targets`` (a class with no validation image has no recall to average).
    """
    targets = np.asarray(targets, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    accuracy = float((targets == predictions).mean()) if len(targets) else 0.0
    matrix = None
    if len(class_names) <= MAX_CONFUSION_CLASSES:
        matrix = confusion_matrix(targets, predictions, len(class_names)).tolist()
    per_class = per_class_report(targets, predictions, class_names)
    present = [row for row in per_class.values() if row["support"] > 0]
    return {
        "accuracy": accuracy,
        "macro_f1": float(np.mean([row["f1"] for row in present])) if present else 0.0,
        "balanced_accuracy": float(np.mean([row["recall"] for row in present])) if present else 0.0,
        "per_class": per_class,
        "confusion_matrix": matrix,
    }
