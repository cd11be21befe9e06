"""Few-shot classification on image embeddings: a labeled support set adapts a classifier in seconds.

Every method works on L2-normalised embeddings (``ml.embedding``), on the CPU, with numpy, SciPy and
scikit-learn; nothing here touches a GPU or a file.

With a text tower (CLIP, SigLIP: zero-shot class weights ``W``, one L2-normalised row per class):

- ``tip_adapter`` -- Tip-Adapter (Zhang et al., ECCV 2022), training-free: the support embeddings are the
  cache keys ``F``, their one-hot labels the values ``L``; for a query ``f``
  ``logits = logit_scale * f W^T + alpha * exp(-beta * (1 - f F^T)) L``. ``alpha`` and ``beta`` are picked
  by cross-validation on the support set from a small grid (the paper searches them on a validation set;
  its initial values 1 and 5.5 are used when the support set is too small to cross-validate).
- ``linear_probe`` -- a linear probe initialised from the zero-shot weights with CLAP's class-adaptive
  penalty towards them (Silva-Rodriguez et al., CVPR 2024, arXiv 2312.12730):
  ``J(W) = mean_i CE(logit_scale * f_i W^T, y_i) + mean_c lambda_c ||w_c - t_c||^2`` with ``t_c`` the
  zero-shot weights and ``lambda_c`` the zero-shot model's mean softmax probability of class ``c`` on the
  support examples of ``c`` (CLAP's initialisation of its multipliers, kept fixed). Simplifications, on
  purpose: the prototypes are not re-normalised inside the logits, so ``J`` is strictly convex and its
  unique minimum is found exactly (trust-region Newton-CG, float64) instead of by 300 epochs of SGD; no
  augmentation (the support set is a set of embeddings); ``lambda_c`` is floored at ``1e-3``.

Without a text tower (timm, models trained here):

- ``prototype`` -- nearest class mean (cosine), ``softmax(cos / 0.05)``;
- ``knn`` -- the ``k`` most similar support examples vote with weights ``exp(cos / 0.05)``;
- ``logistic_regression`` -- scikit-learn's multinomial logistic regression (L-BFGS) on the embeddings
  scaled by ``sqrt(D)``.

``auto`` cross-validates every candidate of the family on the support set (stratified folds, as many
as the rarest class allows, at most 5) and keeps the family's stable method (``linear_probe`` with a text
tower, ``logistic_regression`` without) unless the cross-validation winner beats it on the same held-out
examples by more than ``AUTO_MARGIN`` or two examples, whichever is more, **and** by more than ``AUTO_Z``
standard errors of that paired difference (each held-out example scores +1, 0 or -1: a McNemar-style test).
On a support set of 40 the cross-validated accuracies are noise of a few points: picking their maximum chose
kNN where logistic regression was 2-4 points better on real features, and a margin alone still let one lucky
split through (``bench/learned.py`` measures auto against every method). With a single example in some class there is nothing to cross-validate: ``auto``
takes the family's default, ``linear_probe`` with a text tower (CLAP's robust default) or ``prototype``
without, and ``cv_accuracy`` is None.

Classes without examples: with a text tower they keep their zero-shot weights (Tip-Adapter's cache adds
nothing to them; the linear probe does not move them); without one, :class:`MissingExamplesError`.
Confidences are a softmax over the classes for every method (a support set labels each image with one
class); they are not calibrated.

A fitted head is a pure function of (embedding model, classes, zero-shot weights, support embeddings and
labels, method): :func:`support_set_key` hashes exactly that, and :class:`FewShotHeadCache` keeps a
bounded number of fitted heads by that key, so a bulk request with the same support set fits once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax
from threadpoolctl import threadpool_limits

from ml.lru import ByteBoundedLRU

__all__ = [
    "DEFAULT_METHOD",
    "TEXT_METHODS",
    "VISION_METHODS",
    "FewShotError",
    "FewShotHead",
    "FewShotHeadCache",
    "FewShotResult",
    "FitCancelled",
    "MissingExamplesError",
    "SupportSet",
    "ZeroShotWeights",
    "candidate_methods",
    "fit_few_shot",
    "support_set_key",
    "zero_shot_weights",
]

TEXT_METHODS = ("linear_probe", "tip_adapter")  # the first is the default and wins ties
VISION_METHODS = ("prototype", "knn", "logistic_regression")  # likewise
DEFAULT_METHOD = "auto"
SIMILARITY_TEMPERATURE = 0.05  # prototype and kNN confidences: softmax(cos / T)
TIP_DEFAULT = (1.0, 5.5)  # (alpha, beta): the paper's initial values
TIP_ALPHAS = (0.5, 1.0, 2.0, 4.0)
TIP_BETAS = (1.0, 3.0, 5.5, 8.0)
CLAP_LAMBDA_FLOOR = 1e-3
MAX_FOLDS = 5
KNN_K = 7
AUTO_MARGIN = 0.02
AUTO_Z = 2.0  # the winner's paired gain over the stable method, in standard errors
CLAP_GTOL = 1e-10  # the final fit: the exact minimum
CLAP_CV_GTOL = 1e-5  # cross-validation folds: their argmax is all that is scored
STABLE_METHODS = {True: "linear_probe", False: "logistic_regression"}  # by has_text


class FewShotError(ValueError):
    """The support set cannot be used as given (a request error: ``invalid_request``)."""


class FitCancelled(Exception):
    """``should_stop`` said stop: the fit ended early, without a result (its request is gone)."""


class MissingExamplesError(FewShotError):
    """Some classes have no examples and there is no text classifier to fall back to."""


@dataclass(frozen=True)
class ZeroShotWeights:
    """A text classifier: one L2-normalised row per class, and the model's logit scale (CLIP: 100)."""

    weights: np.ndarray  # [C, D]
    logit_scale: float = 100.0

    def logits(self, features: np.ndarray) -> np.ndarray:
        return self.logit_scale * (np.asarray(features, dtype=np.float64) @ self.weights.T.astype(np.float64))


def zero_shot_weights(model, classes: Sequence[str], templates: Sequence[str]) -> ZeroShotWeights:  # noqa: ANN001
    """The text classifier of a zero-shot model (``ml.zeroshot.ZeroShotModel``: CLIP or SigLIP) over
    ``classes``: its L2-normalised class embeddings and its own logit scale. SigLIP's bias is the same for
    every class, so a softmax over the classes (what the few-shot heads give) does not see it."""
    weights = model.text_embeddings(list(classes), list(templates)).float().cpu().numpy()
    weights /= np.maximum(np.linalg.norm(weights, axis=1, keepdims=True), 1e-12)
    return ZeroShotWeights(weights.astype(np.float32), float(model.logit_scale))


@dataclass(frozen=True)
class SupportSet:
    """Labeled examples: L2-normalised embeddings ``[N, D]`` and class indices ``[N]`` into ``classes``."""

    embeddings: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    @classmethod
    def from_examples(cls, embeddings: np.ndarray, labels: Sequence[str], classes: Sequence[str]) -> SupportSet:
        """Validate and index: every label must be one of ``classes`` (a typed error names the others)."""
        classes = tuple(classes)
        if not classes:
            raise FewShotError("no classes")
        if len(set(classes)) != len(classes):
            raise FewShotError("classes name a class more than once")
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(labels):
            raise FewShotError(f"{len(labels)} labels for embeddings of shape {embeddings.shape}")
        if len(labels) == 0:
            raise FewShotError("the support set is empty")
        if not np.isfinite(embeddings).all():
            raise FewShotError("support embeddings are not finite")
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted({label for label in labels if label not in index})
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:10])
            raise FewShotError(f"example labels that are not among the classes: {shown}"
                               + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
        return cls(embeddings, np.array([index[label] for label in labels], dtype=np.int64), classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def subset(self, rows: np.ndarray) -> SupportSet:
        return SupportSet(self.embeddings[rows], self.labels[rows], self.classes)


class FewShotHead:
    """A fitted classifier over the support set's classes: ``logits(features) -> [B, C]``."""

    method: str

    def logits(self, features: np.ndarray) -> np.ndarray:
        """``[B, C]`` float64 (the scores are computed in float64: logits of magnitude ~100 in float32 are
        only good to ~1e-5)."""
        raise NotImplementedError

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Softmax over the classes, ``[B, C]`` float32."""
        return softmax(self.logits(features), axis=1).astype(np.float32)


@dataclass
class TipAdapterHead(FewShotHead):
    zero_shot: ZeroShotWeights
    keys: np.ndarray  # [N, D] support embeddings
    values: np.ndarray  # [N, C] one-hot labels
    alpha: float
    beta: float
    method: str = "tip_adapter"

    def logits(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float64)
        affinity = np.exp(-self.beta * (1.0 - features @ self.keys.T.astype(np.float64)))
        return self.zero_shot.logits(features) + self.alpha * (affinity @ self.values)


@dataclass
class LinearHead(FewShotHead):
    weights: np.ndarray  # [C, D]
    scale: float
    bias: np.ndarray | None = None
    method: str = "linear_probe"

    def logits(self, features: np.ndarray) -> np.ndarray:
        logits = self.scale * (np.asarray(features, dtype=np.float64) @ self.weights.T.astype(np.float64))
        return logits if self.bias is None else logits + self.bias


@dataclass
class KnnHead(FewShotHead):
    keys: np.ndarray
    labels: np.ndarray
    num_classes: int
    k: int
    method: str = "knn"

    def logits(self, features: np.ndarray) -> np.ndarray:
        similarity = np.asarray(features, dtype=np.float64) @ self.keys.T.astype(np.float64)
        k = min(self.k, self.keys.shape[0])
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        rows = np.arange(features.shape[0])[:, None]
        weights = np.exp((similarity[rows, nearest] - 1.0) / SIMILARITY_TEMPERATURE)
        votes = np.zeros((features.shape[0], self.num_classes), dtype=np.float64)
        np.add.at(votes, (np.broadcast_to(rows, nearest.shape), self.labels[nearest]), weights)
        return np.log(np.maximum(votes, 1e-300))


@dataclass
class FewShotResult:
    """A fitted head and what the result reports about it."""

    head: FewShotHead
    method: str
    classes: tuple[str, ...]
    examples_per_class: dict[str, int]
    cv_accuracy: float | None
    cv_folds: int
    candidates: dict[str, float] = field(default_factory=dict)  # auto: each method's cv accuracy

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        return self.head.probabilities(features)


def candidate_methods(has_text: bool) -> tuple[str, ...]:
    return TEXT_METHODS if has_text else VISION_METHODS


def fit_few_shot(support: SupportSet, method: str = DEFAULT_METHOD, zero_shot: ZeroShotWeights | None = None,
                 *, seed: int = 0, should_stop: Callable[[], bool] | None = None) -> FewShotResult:
    """Fit ``method`` (or pick one by cross-validation with ``auto``) on ``support``.

    ``zero_shot`` is the text classifier over ``support.classes`` (CLIP/SigLIP), None for a backbone
    without a text tower. Raises :class:`FewShotError` for a method the family cannot run, and
    :class:`MissingExamplesError` for classes without examples when there is no text classifier.
    The BLAS and OpenMP pools are held to one thread meanwhile (process-wide; these are many small
    products, which a multi-threaded OpenBLAS on a busy machine runs 10-20x slower). scikit-learn is
    imported with this module, not inside the limit, whose libraries it would load unlimited.
    ``should_stop`` is asked between folds, between candidate methods and at every step of the linear probe's
    solver: when it says True the fit raises :class:`FitCancelled` (within one step: well under a second).
    """
    stop = _Stop(should_stop)
    with threadpool_limits(limits=1):
        return _fit_few_shot(support, method, zero_shot, seed, stop)


class _Stop:
    def __init__(self, should_stop: Callable[[], bool] | None) -> None:
        self.should_stop = should_stop

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise FitCancelled("few-shot fit cancelled")


def _fit_few_shot(support: SupportSet, method: str, zero_shot: ZeroShotWeights | None, seed: int,
                  stop: _Stop) -> FewShotResult:
    has_text = zero_shot is not None
    allowed = candidate_methods(has_text)
    if method != "auto" and method not in allowed:
        kind = "with a text tower (clip, siglip)" if has_text else "without a text tower (timm, custom)"
        raise FewShotError(f"few-shot method {method!r} is not available for models {kind}; use auto or one of {list(allowed)}")
    if zero_shot is not None and zero_shot.weights.shape != (support.num_classes, support.embeddings.shape[1]):
        raise FewShotError(f"zero-shot weights of shape {zero_shot.weights.shape} do not fit {support.num_classes} classes "
                           f"of {support.embeddings.shape[1]}-d embeddings")
    counts = support.counts()
    if not has_text and (counts == 0).any():
        missing = [support.classes[i] for i in np.flatnonzero(counts == 0)]
        shown = ", ".join(repr(m) for m in missing[:10])
        raise MissingExamplesError(f"classes without examples and no text tower to fall back to: {shown}"
                                   + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    folds = _fold_count(counts)
    methods = allowed if method == "auto" else (method,)
    scores: dict[str, float] = {}
    hits: dict[str, np.ndarray] = {}  # per support example: held out, was it classified right
    tip_params = TIP_DEFAULT
    probe: np.ndarray | None = None  # the whole support set's linear probe, fitted once
    if folds >= 2:
        splits = _splits(support, folds, seed)
        for name in methods:
            stop.check()
            if name == "tip_adapter":
                tip_params, hits[name] = _cross_validate_tip(support, zero_shot, splits, stop)
            elif name == "linear_probe":
                assert zero_shot is not None
                probe = fit_clap_linear_probe(support, zero_shot, stop)
                hits[name] = _cross_validate(support, name, zero_shot, splits, stop, initial=probe)
            else:
                hits[name] = _cross_validate(support, name, zero_shot, splits, stop)
            scores[name] = float(hits[name].mean())
    if method == "auto":
        chosen = methods[0]
        if scores:
            best = max(methods, key=lambda name: (scores.get(name, -1.0), -methods.index(name)))
            stable = STABLE_METHODS[has_text]
            chosen = best if clearly_better(hits[best], hits[stable]) else stable
    else:
        chosen = method
    stop.check()
    if chosen == "linear_probe" and probe is not None:
        assert zero_shot is not None
        head: FewShotHead = LinearHead(probe, zero_shot.logit_scale)
    else:
        head = _fit(support, chosen, zero_shot, tip_params, stop)
    counts_by_name = {name: int(counts[i]) for i, name in enumerate(support.classes) if counts[i] > 0}
    return FewShotResult(head, chosen, support.classes, counts_by_name, scores.get(chosen), folds if folds >= 2 else 0,
                         scores if method == "auto" else {})


# -- fitting -------------------------------------------------------------------------------------------------


def _fit(support: SupportSet, method: str, zero_shot: ZeroShotWeights | None,
         tip_params: tuple[float, float] = TIP_DEFAULT, stop: _Stop | None = None) -> FewShotHead:
    if method == "tip_adapter":
        assert zero_shot is not None
        return TipAdapterHead(zero_shot, support.embeddings, _one_hot(support.labels, support.num_classes), *tip_params)
    if method == "linear_probe":
        assert zero_shot is not None
        return LinearHead(fit_clap_linear_probe(support, zero_shot, stop), zero_shot.logit_scale)
    if method == "prototype":
        return LinearHead(_prototypes(support), 1.0 / SIMILARITY_TEMPERATURE, method="prototype")
    if method == "knn":
        return KnnHead(support.embeddings, support.labels, support.num_classes, KNN_K)
    if method == "logistic_regression":
        return _fit_logistic_regression(support)
    raise FewShotError(f"unknown few-shot method {method!r}")


def _one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    values = np.zeros((labels.shape[0], num_classes), dtype=np.float32)
    values[np.arange(labels.shape[0]), labels] = 1.0
    return values


def _prototypes(support: SupportSet) -> np.ndarray:
    sums = np.zeros((support.num_classes, support.embeddings.shape[1]), dtype=np.float64)
    np.add.at(sums, support.labels, support.embeddings.astype(np.float64))
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return (sums / np.maximum(norms, 1e-12)).astype(np.float32)


def _fit_logistic_regression(support: SupportSet) -> FewShotHead:
    present = np.unique(support.labels)
    scale = float(np.sqrt(support.embeddings.shape[1]))
    if present.size == 1:  # one class: scikit-learn refuses; every query gets it
        weights = np.zeros((support.num_classes, support.embeddings.shape[1]), dtype=np.float32)
        bias = np.full(support.num_classes, -1e4, dtype=np.float32)
        bias[present[0]] = 0.0
        return LinearHead(weights, 1.0, bias, method="logistic_regression")
    from sklearn.linear_model import LogisticRegression  # ~0.9 s to import: only when a head is fitted

    model = LogisticRegression(C=1.0, max_iter=500)
    model.fit(support.embeddings * scale, support.labels)
    weights = np.zeros((support.num_classes, support.embeddings.shape[1]), dtype=np.float32)
    bias = np.full(support.num_classes, -1e4, dtype=np.float32)  # classes absent from this fit (CV folds)
    coef, intercept = model.coef_, model.intercept_
    if coef.shape[0] == 1:  # binary: scikit-learn keeps one row, for classes_[1]
        coef = np.vstack([-coef / 2, coef / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    weights[model.classes_] = coef * scale
    bias[model.classes_] = intercept
    return LinearHead(weights, 1.0, bias, method="logistic_regression")


def clap_objective(weights: np.ndarray, support: SupportSet, zero_shot: ZeroShotWeights, lambdas: np.ndarray,
                   trainable: np.ndarray) -> tuple[float, np.ndarray]:
    """CLAP's penalised cross-entropy and its gradient in ``W`` (float64); frozen rows get no gradient."""
    features = np.asarray(support.embeddings, dtype=np.float64)
    n = features.shape[0]
    logits = zero_shot.logit_scale * (features @ weights.T)
    log_p = log_softmax(logits, axis=1)
    ce = -log_p[np.arange(n), support.labels].mean()
    diff = weights - zero_shot.weights.astype(np.float64)
    c = weights.shape[0]
    penalty = float((lambdas * (diff * diff).sum(axis=1)).sum() / c)
    residual = np.exp(log_p)
    residual[np.arange(n), support.labels] -= 1.0
    grad = zero_shot.logit_scale * (residual.T @ features) / n + 2.0 * lambdas[:, None] * diff / c
    grad[~trainable] = 0.0
    return ce + penalty, grad


def clap_lambdas(support: SupportSet, zero_shot: ZeroShotWeights) -> np.ndarray:
    """CLAP's class-adaptive multipliers: the zero-shot mean probability of class c on its own examples."""
    probabilities = softmax(zero_shot.logits(support.embeddings.astype(np.float64)), axis=1)
    counts = support.counts()
    sums = np.zeros(support.num_classes)
    np.add.at(sums, support.labels, probabilities[np.arange(len(support.labels)), support.labels])
    lambdas = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    return np.where(counts > 0, np.maximum(lambdas, CLAP_LAMBDA_FLOOR), 0.0)


def clap_hessian_product(weights: np.ndarray, direction: np.ndarray, support: SupportSet, zero_shot: ZeroShotWeights,
                         lambdas: np.ndarray, trainable: np.ndarray, probabilities: np.ndarray | None = None) -> np.ndarray:
    """The Hessian of :func:`clap_objective` at ``weights`` times ``direction`` (both ``[C, D]``);
    ``probabilities``: the support set's softmax at ``weights`` when the caller has it."""
    features = np.asarray(support.embeddings, dtype=np.float64)
    scale = zero_shot.logit_scale
    direction = np.where(trainable[:, None], direction, 0.0)
    if probabilities is None:
        probabilities = softmax(scale * (features @ weights.T), axis=1)
    d_logits = scale * (features @ direction.T)
    d_probabilities = probabilities * (d_logits - (probabilities * d_logits).sum(axis=1, keepdims=True))
    product = scale * (d_probabilities.T @ features) / features.shape[0] + 2.0 * lambdas[:, None] * direction / weights.shape[0]
    product[~trainable] = 0.0
    return product


def fit_clap_linear_probe(support: SupportSet, zero_shot: ZeroShotWeights, stop: _Stop | None = None,
                          gtol: float = CLAP_GTOL, initial: np.ndarray | None = None) -> np.ndarray:
    """The minimiser of CLAP's objective (see the module docstring), float64 ``[C, D]``; classes without
    examples keep their zero-shot rows. Trust-region Newton-CG with exact Hessian-vector products: the
    objective is badly conditioned (``logit_scale`` 100 against penalties down to 1e-3), where L-BFGS
    needs thousands of steps. The support set's softmax is computed once per point, not once per
    Hessian-vector product (the conjugate-gradient steps at one point all share it); ``gtol`` bounds the
    gradient's norm at the end (cross-validation folds, which only need the argmax, stop earlier).
    ``initial``: where the search starts (default: the zero-shot weights; the objective is strictly convex, so
    the start changes the time, not the minimum; cross-validation starts from the whole support set's fit)."""
    support = SupportSet(np.asarray(support.embeddings, dtype=np.float64), support.labels, support.classes)
    lambdas = clap_lambdas(support, zero_shot)
    trainable = support.counts() > 0
    start = zero_shot.weights.astype(np.float64)
    shape = start.shape
    first = start if initial is None else np.where(trainable[:, None], np.asarray(initial, dtype=np.float64), start)
    at: dict[str, np.ndarray] = {}

    def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
        if stop is not None:
            stop.check()
        value, grad = clap_objective(flat.reshape(shape), support, zero_shot, lambdas, trainable)
        return value, grad.ravel()

    def hessian_product(flat: np.ndarray, direction: np.ndarray) -> np.ndarray:
        if "point" not in at or not np.array_equal(at["point"], flat):
            at["point"] = flat.copy()
            at["probabilities"] = softmax(zero_shot.logit_scale * (support.embeddings @ flat.reshape(shape).T), axis=1)
        return clap_hessian_product(flat.reshape(shape), direction.reshape(shape), support, zero_shot, lambdas,
                                    trainable, at["probabilities"]).ravel()

    solution = minimize(objective, first.ravel(), jac=True, hessp=hessian_product, method="trust-ncg",
                        options={"gtol": gtol, "maxiter": 200})
    weights = solution.x.reshape(shape)
    weights[~trainable] = start[~trainable]
    return weights


# -- cross-validation ----------------------------------------------------------------------------------------


def clearly_better(challenger: np.ndarray, stable: np.ndarray) -> bool:
    """Whether ``challenger``'s held-out hits beat ``stable``'s on the same examples by more than
    ``AUTO_MARGIN`` or two examples (whichever is more) and by more than ``AUTO_Z`` standard errors of the
    paired difference."""
    difference = challenger.astype(np.float64) - stable.astype(np.float64)
    n = difference.size
    gain = float(difference.mean())
    if gain <= max(AUTO_MARGIN, 2.0 / n):
        return False
    error = float(difference.std(ddof=1)) / np.sqrt(n) if n > 1 else np.inf
    return gain > AUTO_Z * error


def _fold_count(counts: np.ndarray) -> int:
    """Stratified folds: as many as the rarest class with examples allows, at most 5; 0 when some class has
    a single example (holding it out leaves its class without examples: with a text tower that measures only
    the zero-shot fallback, which cannot tell the methods apart -- measured on digits: a tie at 1 shot
    between Tip-Adapter at 0.54 and the linear probe at 0.92 on held-out queries)."""
    present = counts[counts > 0]
    if present.size < 2 or present.min() < 2:
        return 0
    return int(min(MAX_FOLDS, present.min()))


def _splits(support: SupportSet, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(support.embeddings, support.labels))


def _cross_validate(support: SupportSet, method: str, zero_shot: ZeroShotWeights | None,
                    splits: list[tuple[np.ndarray, np.ndarray]], stop: _Stop | None = None,
                    initial: np.ndarray | None = None) -> np.ndarray:
    """Per support example, whether ``method`` classified it right when its fold was held out (``splits``
    cover every example once). The linear probe's folds start from ``initial`` (the whole support set's
    probe, close to every fold's minimum) and stop at ``CLAP_CV_GTOL``."""
    correct = np.zeros(len(support.labels), dtype=bool)
    for train_rows, test_rows in splits:
        if stop is not None:
            stop.check()
        if method == "linear_probe":
            assert zero_shot is not None
            head: FewShotHead = LinearHead(fit_clap_linear_probe(support.subset(train_rows), zero_shot, stop, CLAP_CV_GTOL,
                                                                 initial), zero_shot.logit_scale)
        else:
            head = _fit(support.subset(train_rows), method, zero_shot, stop=stop)
        predicted = head.logits(support.embeddings[test_rows]).argmax(axis=1)
        correct[test_rows] = predicted == support.labels[test_rows]
    return correct


def _cross_validate_tip(support: SupportSet, zero_shot: ZeroShotWeights | None,
                        splits: list[tuple[np.ndarray, np.ndarray]],
                        stop: _Stop | None = None) -> tuple[tuple[float, float], np.ndarray]:
    """Tip-Adapter's (alpha, beta) by cross-validation over the grid, with the held-out hits (per support
    example) of the chosen pair; the affinity is computed once per fold."""
    assert zero_shot is not None
    grid = [(a, b) for b in TIP_BETAS for a in TIP_ALPHAS]
    correct = np.zeros((len(grid), len(support.labels)), dtype=bool)
    for train_rows, test_rows in splits:
        if stop is not None:
            stop.check()
        queries = support.embeddings[test_rows]
        similarity = queries @ support.embeddings[train_rows].T
        values = _one_hot(support.labels[train_rows], support.num_classes)
        base = zero_shot.logits(queries)
        truth = support.labels[test_rows]
        for g, (alpha, beta) in enumerate(grid):
            logits = base + alpha * (np.exp(-beta * (1.0 - similarity)) @ values)
            correct[g, test_rows] = logits.argmax(axis=1) == truth
    best = int(np.argmax(correct.sum(axis=1)))  # first best: the grid is ordered from the smoothest beta
    return grid[best], correct[best]


# -- caching -------------------------------------------------------------------------------------------------


def support_set_key(model_key: str, support: SupportSet, method: str, zero_shot: ZeroShotWeights | None = None) -> str:
    """SHA-256 over everything a fitted head depends on: the embedding model, the classes (in order), the
    zero-shot weights, the support embeddings and labels, and the requested method."""
    digest = hashlib.sha256()
    for part in (model_key, method, "\x1f".join(support.classes)):
        encoded = part.encode()
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    for array in (support.embeddings.astype(np.float32), support.labels.astype(np.int64)):
        digest.update(repr(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    if zero_shot is not None:
        digest.update(repr(float(zero_shot.logit_scale)).encode())
        digest.update(np.ascontiguousarray(zero_shot.weights.astype(np.float32)).tobytes())
    else:
        digest.update(b"no-text")
    return digest.hexdigest()


class FewShotHeadCache(ByteBoundedLRU[str, FewShotResult]):
    """A thread-safe LRU (``ml.lru``) of fitted heads by :func:`support_set_key`, at most ``max_entries`` heads
    and ``max_bytes`` of their arrays (a Tip-Adapter head holds the whole support set)."""

    def __init__(self, max_entries: int = 32, max_bytes: int = 512 * 2**20) -> None:
        super().__init__(lambda _key, result: _head_bytes(result.head), max_bytes=max_bytes, max_entries=max_entries)

    def get_or_fit(self, key: str, fit: Callable[[], FewShotResult]) -> tuple[FewShotResult, bool]:
        """The cached result for ``key`` or ``fit()`` stored under it; the flag says whether it was cached.
        Two threads missing the same key at once may both fit (same result; the second put wins)."""
        cached = self.get(key)
        if cached is not None:
            return cached, True
        result = fit()
        self.put(key, result)
        return result, False


def _head_bytes(head: FewShotHead) -> int:
    total = 0
    for value in vars(head).values():
        if isinstance(value, np.ndarray):
            total += value.nbytes
        elif isinstance(value, ZeroShotWeights):
            total += value.weights.nbytes
    return total + 1024
