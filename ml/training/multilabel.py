"""Multi-label training pieces: losses, class balancing for multi-hot labels, and what is measured and stored.

A multi-label model has one independent logit per class: ``p_c = sigmoid(z_c)``. Training uses binary
cross-entropy with logits (or the asymmetric loss of Ridnik et al. 2021, for sets where most labels of an image
are negatives). After training, on the validation split:

- **metrics**: average precision per class (``per_class_ap``; the area under the precision-recall step curve, as
  scikit-learn's ``average_precision_score``) and its unweighted mean over the classes with a positive image
  (``map``); micro and macro F1 at the per-class thresholds below.
- **calibration per class**: a temperature (``sigmoid(z / T)``) or Platt scaling (``sigmoid(a z + b)``), whichever
  gives the lower validation NLL for that class, or nothing when neither beats the raw sigmoid. Stored as
  ``{"method", "a", "b"}`` per class: the calibrated probability is always ``sigmoid(a * z + b)``.
- **thresholds per class**: the calibrated probability at which the class's F1 on validation is highest (a class
  without positive images keeps 0.5). A tag is predicted when ``p_c >= thresholds[c]``.
- **auto-accept per class**: for each target precision, the lowest threshold at which accepting the tag
  (``p_c >= threshold``) is right often enough, by the one-sided Clopper-Pearson lower bound (the rule of
  :mod:`ml.training.auto_accept`), over the (image, class) pairs of that class; the global row pools all pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ml.training.auto_accept import MIN_CLASS_IMAGES, TARGET_PRECISIONS, threshold_row

MultiLabel = tuple[int, ...]
DEFAULT_THRESHOLD = 0.5
MAX_POS_WEIGHT = 100.0
_LBFGS_ITERATIONS = 100


# -- losses ----------------------------------------------------------------------------------------------------

class AsymmetricLoss(nn.Module):
    """Asymmetric loss (Ridnik et al., ICCV 2021): focusing ``gamma_neg`` on negatives, ``gamma_pos`` on
    positives, and the negatives' probability shifted down by ``clip`` (easy negatives contribute nothing).
    The mean over the batch of the per-image sum over classes, like the paper's implementation divided by the
    batch size."""

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05,
                 pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = logits.float(), targets.float()
        p = torch.sigmoid(logits)
        p_neg = (p - self.clip).clamp(min=0) if self.clip > 0 else p
        loss_pos = targets * F.logsigmoid(logits) * (1 - p).pow(self.gamma_pos)
        if self.pos_weight is not None:
            loss_pos = loss_pos * self.pos_weight
        loss_neg = (1 - targets) * torch.log((1 - p_neg).clamp(min=1e-8)) * p_neg.pow(self.gamma_neg)
        return -(loss_pos + loss_neg).sum(dim=1).mean()


class BceLoss(nn.Module):
    """Binary cross-entropy with logits, the mean over images of the per-image sum over classes (so its scale
    does not shrink with the number of classes, as the element mean would)."""

    def __init__(self, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=self.pos_weight,
                                                  reduction="none")
        return loss.sum(dim=1).mean()


def build_loss(name: str, pos_weight: torch.Tensor | None = None) -> nn.Module:
    """``bce`` or ``asymmetric``."""
    if name == "asymmetric":
        return AsymmetricLoss(pos_weight=pos_weight)
    if name == "bce":
        return BceLoss(pos_weight)
    raise ValueError(f"unknown multi-label loss {name!r}")


# -- class balancing -------------------------------------------------------------------------------------------

def multi_hot(labels: Sequence[MultiLabel], num_classes: int) -> np.ndarray:
    """``[N, C]`` 0/1 matrix of the label sets."""
    matrix = np.zeros((len(labels), num_classes), dtype=np.int64)
    for row, tags in enumerate(labels):
        matrix[row, list(tags)] = 1
    return matrix


def positive_counts(labels: Sequence[MultiLabel], num_classes: int) -> list[int]:
    """How many images carry each tag."""
    counts = [0] * num_classes
    for tags in labels:
        for tag in tags:
            counts[tag] += 1
    return counts


def balanced_pos_weights(labels: Sequence[MultiLabel], num_classes: int) -> list[float]:
    """``class_weighting: balanced`` for multi-hot labels: the positive term of class c weighted by
    ``n_neg / n_pos`` (clamped to [1, 100]; 1 for a class without positives), so each class's positives weigh
    as much as its negatives."""
    n = len(labels)
    weights = []
    for count in positive_counts(labels, num_classes):
        weights.append(1.0 if count == 0 else float(min(MAX_POS_WEIGHT, max(1.0, (n - count) / count))))
    return weights


def balanced_sample_weights(labels: Sequence[MultiLabel], num_classes: int) -> list[float]:
    """``class_weighting: sampler`` for multi-hot labels: an image weighs ``1 / n_c`` of its rarest tag (images
    without tags count as one more group), so rare tags are drawn about as often as common ones."""
    counts = positive_counts(labels, num_classes)
    empty = sum(1 for tags in labels if not tags)
    return [max(1.0 / counts[t] for t in tags) if tags else 1.0 / empty for tags in labels]


# -- metrics ---------------------------------------------------------------------------------------------------

def average_precision(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """Average precision of one class (None without positives): sum over the positives' ranks of precision
    times the recall step, ties cut together (scikit-learn's definition)."""
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    positives = int(truth.sum())
    if positives == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_truth = scores[order], truth[order]
    last_of_tie = np.append(sorted_scores[:-1] != sorted_scores[1:], True)
    hits = np.cumsum(sorted_truth)[last_of_tie]
    counts = np.arange(1, len(scores) + 1)[last_of_tie]
    precision = hits / counts
    recall = hits / positives
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float((steps * precision).sum())


def per_class_average_precision(probabilities: np.ndarray, truth: np.ndarray,
                                class_names: Sequence[str]) -> dict[str, float | None]:
    return {name: average_precision(probabilities[:, c], truth[:, c]) for c, name in enumerate(class_names)}


def mean_average_precision(per_class_ap: dict[str, float | None]) -> float:
    """Unweighted mean of the classes with a positive image (0.0 when none has one)."""
    values = [v for v in per_class_ap.values() if v is not None]
    return float(np.mean(values)) if values else 0.0


def tune_thresholds(probabilities: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per class, the probability threshold with the best F1 on these images: the cut sits halfway between the
    lowest accepted score and the next lower one (a class without positives keeps 0.5)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    thresholds = np.full(probabilities.shape[1], DEFAULT_THRESHOLD)
    for c in range(probabilities.shape[1]):
        positives = int(truth[:, c].sum())
        if positives == 0:
            continue
        order = np.argsort(-probabilities[:, c], kind="stable")
        scores, hits = probabilities[order, c], np.cumsum(truth[order, c])
        cut_ok = np.append(scores[:-1] > scores[1:], True)
        counts = np.arange(1, len(scores) + 1)
        f1 = np.where(cut_ok, 2 * hits / (counts + positives), -1.0)
        m = int(np.argmax(f1))
        lower = scores[m + 1] if m + 1 < len(scores) else 0.0
        thresholds[c] = float((scores[m] + lower) / 2)
    return thresholds


def f1_report(probabilities: np.ndarray, truth: np.ndarray, thresholds: np.ndarray,
              class_names: Sequence[str]) -> dict[str, Any]:
    """``micro_f1``, ``macro_f1`` (classes with a positive image), ``subset_accuracy`` (exact tag sets) and
    ``per_class`` precision/recall/F1/support at ``thresholds``."""
    predicted = np.asarray(probabilities) >= np.asarray(thresholds)[None, :]
    truth = np.asarray(truth, dtype=bool)
    tp = (predicted & truth).sum(axis=0)
    fp = (predicted & ~truth).sum(axis=0)
    fn = (~predicted & truth).sum(axis=0)
    per_class: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(class_names):
        precision = tp[c] / (tp[c] + fp[c]) if tp[c] + fp[c] else 0.0
        recall = tp[c] / (tp[c] + fn[c]) if tp[c] + fn[c] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                           "support": int(truth[:, c].sum()), "threshold": float(thresholds[c])}
    denominator = 2 * tp.sum() + fp.sum() + fn.sum()
    present = [row["f1"] for row in per_class.values() if row["support"] > 0]
    return {
        "micro_f1": float(2 * tp.sum() / denominator) if denominator else 0.0,
        "macro_f1": float(np.mean(present)) if present else 0.0,
        "subset_accuracy": float((predicted == truth).all(axis=1).mean()) if len(truth) else 0.0,
        "per_class": per_class,
    }


# -- calibration per class -------------------------------------------------------------------------------------

def _fit_affine(logits: torch.Tensor, truth: torch.Tensor, platt: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per class (a, b) minimising the BCE of ``sigmoid(a z + b)``; ``platt`` False fits a temperature only
    (b = 0, a = 1 / T > 0)."""
    classes = logits.shape[1]
    log_a = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=platt)
    params = [log_a, b] if platt else [log_a]
    optimizer = torch.optim.LBFGS(params, lr=0.5, max_iter=_LBFGS_ITERATIONS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        # the per-class sums are independent: one optimisation fits every class
        loss = F.binary_cross_entropy_with_logits(logits * log_a.exp() + b, truth, reduction="sum") / len(logits)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    a = log_a.detach().exp().clamp(1 / 20.0, 20.0).numpy()
    return a, b.detach().numpy()


def _class_nll(logits: torch.Tensor, truth: torch.Tensor, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    scaled = logits * torch.from_numpy(a) + torch.from_numpy(b)
    return F.binary_cross_entropy_with_logits(scaled, truth, reduction="none").mean(dim=0).numpy()


def fit_calibration(logits: torch.Tensor, truth: np.ndarray, class_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per class ``{"method": "none" | "temperature" | "platt", "a", "b", "nll_before", "nll_after"}``: the
    candidate with the lowest validation NLL (Platt only for a class with both positives and negatives)."""
    z = logits.detach().to("cpu", torch.float64)
    y = torch.as_tensor(np.asarray(truth), dtype=torch.float64)
    ones, zeros = np.ones(z.shape[1]), np.zeros(z.shape[1])
    candidates = {"none": (ones, zeros), "temperature": _fit_affine(z, y, platt=False), "platt": _fit_affine(z, y, platt=True)}
    nlls = {name: _class_nll(z, y, a, b) for name, (a, b) in candidates.items()}
    positives = y.sum(dim=0).numpy()
    out: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(class_names):
        allowed = ["none", "temperature"] + (["platt"] if 0 < positives[c] < len(z) else [])
        best = min(allowed, key=lambda m: (nlls[m][c], allowed.index(m)))
        if not np.isfinite(nlls[best][c]):
            best = "none"
        a, b = candidates[best]
        out[name] = {"method": best, "a": float(a[c]), "b": float(b[c]),
                     "nll_before": float(nlls["none"][c]), "nll_after": float(nlls[best][c])}
    return out


def calibration_arrays(calibration: dict[str, dict[str, Any]], class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) vectors in class order (1, 0 for a class the table lacks)."""
    a = np.array([float((calibration.get(n) or {}).get("a", 1.0)) for n in class_names])
    b = np.array([float((calibration.get(n) or {}).get("b", 0.0)) for n in class_names])
    return a, b


def calibrated_probabilities(logits: torch.Tensor, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sigmoid(a * z + b)`` per class, float64 numpy."""
    z = logits.detach().to("cpu", torch.float64)
    return torch.sigmoid(z * torch.from_numpy(np.asarray(a, dtype=np.float64)) + torch.from_numpy(np.asarray(b, dtype=np.float64))).numpy()


def mean_nll(probabilities: np.ndarray, truth: np.ndarray) -> float:
    """Mean over images of the per-class binary NLL summed over the classes."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1 - 1e-12)
    y = np.asarray(truth, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).sum(axis=1).mean()) if len(y) else 0.0


def expected_calibration_error(probabilities: np.ndarray, truth: np.ndarray, bins: int = 15) -> float:
    """ECE over all (image, class) pairs: |frequency of the tag - mean probability| in equal-width bins."""
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    y = np.asarray(truth, dtype=np.float64).ravel()
    if not len(p):
        return 0.0
    index = np.clip((p * bins).astype(int), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += members.sum() / len(p) * abs(y[members].mean() - p[members].mean())
    return float(total)


# -- auto-accept per class -------------------------------------------------------------------------------------

def auto_accept_tables(probabilities: np.ndarray, truth: np.ndarray, class_names: Sequence[str],
                       target_precisions: Sequence[float] = TARGET_PRECISIONS,
                       min_class_images: int = MIN_CLASS_IMAGES) -> dict[str, Any]:
    """``{"global": rows, "per_class": {name: rows}}``: accepting tag c on an image when ``p_c >= threshold`` is
    right when the image has the tag. Rows as :func:`ml.training.auto_accept.threshold_row` (``coverage``: the
    share of the images whose tag would be accepted). Per-class tables for classes with at least
    ``min_class_images`` positive validation images."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(truth, dtype=bool)
    tables: dict[str, Any] = {"global": [threshold_row(p.ravel(), y.ravel(), t) for t in target_precisions],
                              "per_class": {}}
    for c, name in enumerate(class_names):
        if int(y[:, c].sum()) >= min_class_images:
            tables["per_class"][name] = [threshold_row(p[:, c], y[:, c], t) for t in target_precisions]
    return tables
