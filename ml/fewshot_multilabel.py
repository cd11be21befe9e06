"""Multi-label few-shot: one-vs-rest logistic heads on image embeddings, anchored at the zero-shot rule.

Each support example carries a set of labels (possibly empty). For class c the head is
``p_c(f) = sigmoid(z_c(f) + w_c . (sqrt(D) f) + b_c)``, where ``z_c`` is the zero-shot per-class logit (SigLIP's
sigmoid logit; CLIP's class-vs-neutral-prompt logit; 0 for models without a text tower) and ``(w_c, b_c)`` minimise
the mean binary cross-entropy on the support set plus ``L2 * (||w_c||^2 + b_c^2)``. The penalty pulls the head
towards the zero-shot rule: with few examples it moves little, with many it learns. Every class is fitted
independently (one convex problem per class, solved together with L-BFGS in float64).

A class without a positive example keeps its zero-shot rule (``w_c = 0, b_c = 0``); without a text tower there is
no rule to keep, and such a class is an error (:class:`MissingExamplesError`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from ml.fewshot import FewShotError, FitCancelled, MissingExamplesError

METHOD = "one_vs_rest"
L2 = 1e-2


@dataclass
class OneVsRestHead:
    """Per-class residual logistic heads over the zero-shot logits."""

    weights: np.ndarray  # [C, D]
    bias: np.ndarray  # [C]
    fitted: np.ndarray  # [C] bool: classes with a positive example
    positives: dict[str, int]
    method: str = METHOD

    def probabilities(self, features: np.ndarray, zero_shot_logits: np.ndarray | None) -> np.ndarray:
        """``[B, C]`` independent probabilities for L2-normalised ``features`` ``[B, D]``."""
        features = np.asarray(features, dtype=np.float64) * np.sqrt(features.shape[1])
        logits = features @ self.weights.T + self.bias
        if zero_shot_logits is not None:
            logits = logits + np.asarray(zero_shot_logits, dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-logits))

    @property
    def nbytes(self) -> int:
        return int(self.weights.nbytes + self.bias.nbytes + self.fitted.nbytes)


def multi_hot(labels: Sequence[Sequence[str]], classes: Sequence[str]) -> np.ndarray:
    """``[N, C]`` 0/1; FewShotError for a label outside ``classes``."""
    index = {name: i for i, name in enumerate(classes)}
    matrix = np.zeros((len(labels), len(classes)))
    for row, tags in enumerate(labels):
        for tag in tags:
            if tag not in index:
                raise FewShotError(f"example label {tag!r} is not among the classes")
            matrix[row, index[tag]] = 1.0
    return matrix


@dataclass
class OneVsRestResult:
    """A fitted head as the few-shot head cache holds it (``head``; ``method``)."""

    head: OneVsRestHead
    method: str = METHOD

    @property
    def examples_per_class(self) -> dict[str, int]:
        """Positive examples per class (classes without any are absent: they keep the zero-shot rule)."""
        return self.head.positives


def fit(embeddings: np.ndarray, labels: Sequence[Sequence[str]], classes: Sequence[str],
        zero_shot_logits: np.ndarray | None, *, should_stop: Callable[[], bool] | None = None) -> OneVsRestResult:
    """:func:`fit_one_vs_rest` on one BLAS thread (it runs in the worker's fit pool), stopping with
    :class:`~ml.fewshot.FitCancelled` between L-BFGS steps once ``should_stop()`` is true."""
    with threadpool_limits(limits=1):
        return OneVsRestResult(fit_one_vs_rest(embeddings, labels, classes, zero_shot_logits, should_stop=should_stop))


def fit_one_vs_rest(embeddings: np.ndarray, labels: Sequence[Sequence[str]], classes: Sequence[str],
                    zero_shot_logits: np.ndarray | None, l2: float = L2,
                    should_stop: Callable[[], bool] | None = None) -> OneVsRestHead:
    """Fit every class's residual head (see the module docstring). ``zero_shot_logits`` ``[N, C]`` of the support
    examples, or None without a text tower."""
    x = np.asarray(embeddings, dtype=np.float64)
    n, dim = x.shape
    x = x * np.sqrt(dim)
    y = multi_hot(labels, classes)
    positives = y.sum(axis=0)
    fitted = positives > 0
    if zero_shot_logits is None and not fitted.all():
        missing = [c for c, ok in zip(classes, fitted) if not ok]
        raise MissingExamplesError(f"classes without a positive example and no text tower to fall back to: {missing[:10]}")
    offset = np.zeros_like(y) if zero_shot_logits is None else np.asarray(zero_shot_logits, dtype=np.float64)
    rows = np.flatnonzero(fitted)
    count = len(rows)
    weights = np.zeros((len(classes), dim))
    bias = np.zeros(len(classes))
    if count:
        ys, offs = y[:, rows], offset[:, rows]

        def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
            w = flat[: count * dim].reshape(count, dim)
            b = flat[count * dim:]
            z = offs + x @ w.T + b
            # stable BCE with logits: softplus(z) - y z
            loss = (np.logaddexp(0.0, z) - ys * z).sum() / n + l2 * (flat @ flat)
            residual = (1.0 / (1.0 + np.exp(-z)) - ys) / n  # [N, count]
            grad_w = residual.T @ x + 2 * l2 * w
            grad_b = residual.sum(axis=0) + 2 * l2 * b
            return float(loss), np.concatenate([grad_w.ravel(), grad_b])

        def check(_: np.ndarray) -> None:
            if should_stop is not None and should_stop():
                raise FitCancelled("few-shot fit cancelled")

        solution = minimize(objective, np.zeros(count * (dim + 1)), jac=True, method="L-BFGS-B",
                            options={"maxiter": 500}, callback=check)
        weights[rows] = solution.x[: count * dim].reshape(count, dim)
        bias[rows] = solution.x[count * dim:]
    return OneVsRestHead(weights=weights, bias=bias, fitted=fitted,
                         positives={name: int(positives[c]) for c, name in enumerate(classes) if positives[c]})


def support_key(model_key: str, embeddings: np.ndarray, labels: Sequence[Sequence[str]], classes: Sequence[str],
                zero_shot_logits: np.ndarray | None) -> str:
    """Cache key of a fitted head: the model, classes, support embeddings, label sets and zero-shot logits."""
    digest = hashlib.sha256()
    digest.update(f"{METHOD}|{model_key}|{L2}|".encode())
    digest.update("\x1f".join(classes).encode())
    digest.update(np.ascontiguousarray(embeddings, dtype=np.float32).tobytes())
    digest.update("\x1e".join("\x1f".join(sorted(tags)) for tags in labels).encode())
    if zero_shot_logits is not None:
        digest.update(np.ascontiguousarray(zero_shot_logits, dtype=np.float32).tobytes())
    return digest.hexdigest()
