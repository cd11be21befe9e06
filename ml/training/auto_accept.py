"""Auto-accept at a stated precision: per target precision, the lowest top-1 confidence threshold at which the
labels a workflow would accept (top-1 class, confidence >= threshold) are right often enough on validation.

"Often enough" is a small-sample guard, not the point estimate: the one-sided Clopper-Pearson lower bound
(confidence 1 - ``ALPHA``) of the precision of the accepted images must reach the target. With few images the
bound is far below the observed precision (all of 30 right only proves >= 0.905), so a row may have no threshold
(``None``, coverage 0): nothing is auto-accepted at that precision.

Rows: ``{"precision", "threshold", "coverage", "accepted", "precision_observed", "precision_lower_bound"}``;
``coverage`` is the share of the validation images (of the class's predicted images, per class) accepted.
Per class tables exist for classes predicted on at least ``MIN_CLASS_IMAGES`` validation images; at inference a
class's own threshold is used where it has one, the global threshold otherwise (:func:`threshold_for`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import beta

TARGET_PRECISIONS = (0.90, 0.95, 0.98, 0.99)
ALPHA = 0.05
MIN_CLASS_IMAGES = 50


def precision_lower_bound(correct: np.ndarray, accepted: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound of a binomial proportion ``correct / accepted`` (0 where correct is 0)."""
    correct = np.asarray(correct, dtype=np.float64)
    accepted = np.asarray(accepted, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = beta.ppf(alpha, correct, accepted - correct + 1)
    return np.where(correct > 0, np.nan_to_num(bound, nan=0.0), 0.0)


def threshold_row(confidence: np.ndarray, correct: np.ndarray, target: float, alpha: float = ALPHA) -> dict[str, Any]:
    """The row for one ``target``: the lowest threshold whose accepted set has a precision lower bound >= target.

    Accepting means ``confidence >= threshold``, so cuts fall only between distinct confidences (ties go together).
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    total = len(confidence)
    row: dict[str, Any] = {"precision": target, "threshold": None, "coverage": 0.0, "accepted": 0,
                           "precision_observed": None, "precision_lower_bound": None}
    if total == 0:
        return row
    order = np.argsort(-confidence, kind="stable")
    sorted_conf = confidence[order]
    hits = np.cumsum(correct[order])
    counts = np.arange(1, total + 1)
    cut_ok = np.append(sorted_conf[:-1] > sorted_conf[1:], True)  # a cut after position m keeps ties together
    bounds = precision_lower_bound(hits, counts, alpha)
    good = np.flatnonzero(cut_ok & (bounds >= target))
    if not len(good):
        return row
    m = int(good[-1])  # the largest accepted set (lowest threshold) that passes the guard
    row.update(threshold=float(sorted_conf[m]), coverage=(m + 1) / total, accepted=m + 1,
               precision_observed=float(hits[m] / (m + 1)), precision_lower_bound=float(bounds[m]))
    return row


def auto_accept_tables(
    probabilities: np.ndarray,
    targets: np.ndarray,
    class_names: Sequence[str],
    target_precisions: Sequence[float] = TARGET_PRECISIONS,
    min_class_images: int = MIN_CLASS_IMAGES,
) -> dict[str, Any]:
    """``{"global": [row per target], "per_class": {class name: [row per target]}}`` from (calibrated) probabilities."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    confidence = probabilities.max(axis=1)
    predicted = probabilities.argmax(axis=1)
    correct = predicted == targets
    tables: dict[str, Any] = {"global": [threshold_row(confidence, correct, t) for t in target_precisions], "per_class": {}}
    for index, name in enumerate(class_names):
        members = predicted == index
        if int(members.sum()) >= min_class_images:
            tables["per_class"][name] = [threshold_row(confidence[members], correct[members], t) for t in target_precisions]
    return tables


def summary(tables: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The global rows as ``[{"precision", "threshold", "coverage"}]`` (the training metrics' ``auto_accept``)."""
    return [{"precision": r["precision"], "threshold": r["threshold"], "coverage": r["coverage"]} for r in tables["global"]]


def threshold_for(tables: Mapping[str, Any] | None, class_name: str, precision: float,
                  own_table_decides: bool = False) -> float | None:
    """The confidence threshold to auto-accept ``class_name`` at (at least) ``precision``; None: never accept.

    Uses the row of the smallest tabulated target >= ``precision`` (none above 0.99: None); the class's own
    threshold where its table has one, else the global threshold. ``own_table_decides`` (multi-label tags): a class
    with a table of its own never falls back to the global row; where its own row has no threshold (its validation
    images did not prove the precision) nothing is accepted, since the pooled threshold may hold over all
    (image, class) pairs and not for this class.
    """
    if not tables:
        return None
    rows = tables.get("global") or []
    candidates = sorted((r["precision"], i) for i, r in enumerate(rows) if r["precision"] >= precision - 1e-12)
    if not candidates:
        return None
    _, position = candidates[0]
    own = (tables.get("per_class") or {}).get(class_name)
    if own is not None and (own[position]["threshold"] is not None or own_table_decides):
        threshold = own[position]["threshold"]
        return None if threshold is None else float(threshold)
    threshold = rows[position]["threshold"]
    return None if threshold is None else float(threshold)
