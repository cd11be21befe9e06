"""Confidence calibration: one temperature fitted on validation logits (NLL, LBFGS), and how to measure it
(expected calibration error over equal-width confidence bins, negative log-likelihood, reliability bins).

Temperature scaling (Guo et al. 2017) divides the logits by ``T`` before the softmax: it never changes the
argmax (so accuracy is unchanged), and ``T > 1`` softens an over-confident network.

A validation split on which the model makes no error carries no evidence of over- or under-confidence: the
NLL then falls without bound as ``T`` shrinks, and a fit would drive ``T`` to its floor and make every later
prediction near-certain. On such a split the temperature stays 1 (:func:`calibrate` says so in its note).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
_LBFGS_ITERATIONS = 100


ERROR_FREE_NOTE = ("the validation split has no errors, so it carries no evidence about over-confidence: "
                   "temperature kept at 1")


@dataclass(frozen=True)
class Calibration:
    """The temperature to apply and, when it was not fitted, why (``note``; None when fitted)."""

    temperature: float
    note: str | None = None


def calibrate(logits: torch.Tensor, targets: torch.Tensor) -> Calibration:
    """The validation split's temperature: 1 with :data:`ERROR_FREE_NOTE` when every prediction is right (or
    there is nothing to fit), else :func:`fit_temperature`."""
    if targets.numel() == 0 or bool((logits.detach().argmax(dim=1).cpu() == targets.detach().cpu()).all()):
        return Calibration(1.0, ERROR_FREE_NOTE if targets.numel() else "no validation images: temperature kept at 1")
    return Calibration(fit_temperature(logits, targets))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The ``T`` minimising the NLL of ``softmax(logits / T)`` on (validation) ``targets``.

    Optimised over ``log T`` (so ``T`` stays positive) with LBFGS; clamped to [0.05, 20]. Falls back to 1.0
    when the fit does not lower the NLL (or is not finite), so calibration never makes the NLL worse.
    """
    logits = logits.detach().to("cpu", torch.float64)
    targets = targets.detach().to("cpu", torch.int64)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=_LBFGS_ITERATIONS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = float(log_t.detach().exp().clamp(MIN_TEMPERATURE, MAX_TEMPERATURE).item())
    if not math.isfinite(temperature) or nll(logits, targets, temperature) > nll(logits, targets, 1.0):
        return 1.0
    return temperature


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)``."""
    scaled = logits.detach().to("cpu", torch.float64) / temperature
    return float(F.cross_entropy(scaled, targets.detach().to("cpu", torch.int64)).item())


def reliability_bins(probabilities: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Per equal-width bin of top-1 confidence ``(lo, hi]``: count, mean confidence, accuracy (None when empty)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)  # (lo, hi]; 0 -> first bin
    out: list[dict[str, Any]] = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        out.append({
            "lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count,
            "confidence": float(confidence[members].mean()) if count else None,
            "accuracy": float(correct[members].mean()) if count else None,
        })
    return out


def expected_calibration_error(probabilities: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean of |accuracy - confidence| over ``bins`` equal-width top-1 confidence bins."""
    total = len(targets)
    if total == 0:
        return 0.0
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"])
                     for b in reliability_bins(probabilities, targets, bins) if b["count"]))


def softmax(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` as float64 numpy."""
    return (logits.detach().to("cpu", torch.float64) / temperature).softmax(dim=1).numpy()


def calibration_report(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> dict[str, Any]:
    """``{"ece": {"before", "after"}, "nll": {"before", "after"}, "temperature", "reliability": {"before", "after"}}``."""
    targets_np = targets.detach().cpu().numpy()
    before, after = softmax(logits), softmax(logits, temperature)
    return {
        "temperature": temperature,
        "ece": {"before": expected_calibration_error(before, targets_np),
                "after": expected_calibration_error(after, targets_np)},
        "nll": {"before": nll(logits, targets), "after": nll(logits, targets, temperature)},
        "reliability": {"before": reliability_bins(before, targets_np), "after": reliability_bins(after, targets_np)},
    }
