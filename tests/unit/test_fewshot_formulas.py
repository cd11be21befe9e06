"""Few-shot heads against the papers' formulas, written again here in plain numpy: Tip-Adapter (Zhang et al.
2022, eq. 3-6) and CLAP's zero-shot-initialised, class-adaptively penalised linear probe (arXiv 2312.12730),
whose unique minimum the reference finds by Newton's method with the exact Hessian."""

from __future__ import annotations

import numpy as np
import pytest

from ml.fewshot import (
    FewShotError,
    FewShotHeadCache,
    MissingExamplesError,
    SupportSet,
    ZeroShotWeights,
    clearly_better,
    fit_few_shot,
    support_set_key,
)

CLASSES = ["cat", "dog", "fox", "owl"]


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _problem(shots: int = 6, dim: int = 16, seed: int = 0, classes=CLASSES):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(classes), dim))
    labels = np.repeat(np.arange(len(classes)), shots)
    features = _unit(centers[labels] + rng.normal(size=(labels.size, dim)))
    text = _unit(centers + 1.5 * rng.normal(size=centers.shape))
    queries = _unit(centers[rng.integers(0, len(classes), 40)] + rng.normal(size=(40, dim)))
    support = SupportSet.from_examples(features, [classes[i] for i in labels], classes)
    return support, ZeroShotWeights(text.astype(np.float32), 100.0), queries.astype(np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def test_tip_adapter_equals_the_papers_formula():
    support, zero_shot, queries = _problem()
    result = fit_few_shot(support, "tip_adapter", zero_shot)
    alpha, beta = result.head.alpha, result.head.beta
    # Tip-Adapter: A = exp(-beta (1 - f F_train^T)); logits = 100 f W_c^T + alpha A L_train
    f = queries.astype(np.float64)
    f_train = support.embeddings.astype(np.float64)
    l_train = np.eye(len(CLASSES))[support.labels]
    affinity = np.exp(-beta * (1 - f @ f_train.T))
    reference = 100.0 * f @ zero_shot.weights.astype(np.float64).T + alpha * affinity @ l_train
    np.testing.assert_allclose(result.head.logits(queries), reference, atol=1e-5, rtol=0)
    np.testing.assert_allclose(result.probabilities(queries), _softmax(reference), atol=1e-5, rtol=0)
    assert (alpha, beta) != (0, 0) and result.cv_folds == 5 and 0 <= result.cv_accuracy <= 1


def _clap_newton(features, labels, text, scale, trainable, steps=100):
    """argmin_W mean_i CE(scale f_i W^T, y_i) + mean_c lambda_c ||w_c - t_c||^2, lambda_c = mean over the
    examples of class c of the zero-shot softmax probability of c (rows without examples stay t_c)."""
    n, d = features.shape
    c = text.shape[0]
    y = np.eye(c)[labels]
    p_zero_shot = _softmax(scale * features @ text.T)
    lambdas = np.array([p_zero_shot[labels == k, k].mean() if (labels == k).any() else 0.0 for k in range(c)])
    lambdas = np.where(trainable, np.maximum(lambdas, 1e-3), 0.0)
    rows = np.flatnonzero(trainable)

    def objective(w):
        logits = scale * features @ w.T
        top = logits.max(axis=1)
        log_p = logits[np.arange(n), labels] - top - np.log(np.exp(logits - top[:, None]).sum(axis=1))
        return -log_p.mean() + (lambdas * ((w - text) ** 2).sum(axis=1)).sum() / c

    w = text.copy()
    for _ in range(steps):
        p = _softmax(scale * features @ w.T)
        grad = scale * (p - y).T @ features / n + 2 * lambdas[:, None] * (w - text) / c
        # Hessian of the cross-entropy: scale^2/n sum_i (diag(p_i) - p_i p_i^T) (x) f_i f_i^T
        jac = np.einsum("ik,kl->ikl", p, np.eye(c)) - np.einsum("ik,il->ikl", p, p)
        hess = scale**2 / n * np.einsum("ikl,id,ie->kdle", jac, features, features)
        hess += np.einsum("k,kl,de->kdle", 2 * lambdas / c, np.eye(c), np.eye(d))
        sub = hess[rows][:, :, rows].reshape(rows.size * d, rows.size * d)
        step = np.zeros_like(w)
        step[rows] = np.linalg.solve(sub, grad[rows].ravel()).reshape(rows.size, d)
        t, before = 1.0, objective(w)
        while objective(w - t * step) > before - 1e-4 * t * (grad * step).sum() and t > 1e-10:
            t /= 2
        w = w - t * step
        if np.abs(grad[rows]).max() < 1e-13:
            break
    return w


@pytest.mark.parametrize("missing_class", [False, True])
def test_linear_probe_equals_the_minimum_of_clap_objective(missing_class):
    support, zero_shot, queries = _problem()
    if missing_class:  # no examples of "owl": its row must stay at the zero-shot weights
        support = support.subset(np.flatnonzero(support.labels != 3))
    result = fit_few_shot(support, "linear_probe", zero_shot)
    trainable = support.counts() > 0
    reference = _clap_newton(support.embeddings.astype(np.float64), support.labels,
                             zero_shot.weights.astype(np.float64), 100.0, trainable)
    np.testing.assert_allclose(result.head.weights, reference, atol=1e-5, rtol=0)
    reference_logits = 100.0 * queries.astype(np.float64) @ reference.T
    np.testing.assert_allclose(result.probabilities(queries), _softmax(reference_logits), atol=1e-5, rtol=0)
    assert not np.allclose(reference[trainable], zero_shot.weights[trainable], atol=1e-3)  # the probe moved
    if missing_class:
        np.testing.assert_array_equal(result.head.weights[3], zero_shot.weights[3])
        assert result.examples_per_class == {"cat": 6, "dog": 6, "fox": 6}


def test_classes_without_examples_fall_back_to_zero_shot_or_are_rejected():
    support, zero_shot, queries = _problem()
    support = support.subset(np.flatnonzero(support.labels != 2))
    tip = fit_few_shot(support, "tip_adapter", zero_shot)
    np.testing.assert_allclose(tip.head.logits(queries)[:, 2], zero_shot.logits(queries)[:, 2], atol=1e-4)
    auto = fit_few_shot(support, "auto", zero_shot)
    assert auto.method in ("tip_adapter", "linear_probe") and set(auto.candidates) == {"tip_adapter", "linear_probe"}
    for method in ("auto", "prototype", "knn", "logistic_regression"):
        with pytest.raises(MissingExamplesError, match="'fox'"):
            fit_few_shot(support, method, None)


def test_bad_support_sets_are_typed_errors():
    support, zero_shot, _ = _problem()
    with pytest.raises(FewShotError, match="'wolf'"):
        SupportSet.from_examples(support.embeddings[:2], ["cat", "wolf"], CLASSES)
    with pytest.raises(FewShotError, match="not available"):
        fit_few_shot(support, "knn", zero_shot)
    with pytest.raises(FewShotError, match="not available"):
        fit_few_shot(support, "tip_adapter", None)
    with pytest.raises(FewShotError, match="empty"):
        SupportSet.from_examples(np.zeros((0, 4)), [], CLASSES)
    with pytest.raises(FewShotError, match="finite"):
        SupportSet.from_examples(np.full((1, 4), np.nan), ["cat"], CLASSES)
    with pytest.raises(FewShotError, match="do not fit"):
        fit_few_shot(support, "auto", ZeroShotWeights(zero_shot.weights[:2]))


def test_auto_leaves_the_stable_method_only_for_a_clear_paired_win():
    # 40 held-out examples: the challenger right on 4 the stable method misses, wrong on 1 it gets. A gain of
    # 3 examples (7.5 points) clears the margin, but not two standard errors of the paired difference (11 points).
    stable = np.ones(40, dtype=bool)
    stable[:4] = False
    challenger = np.ones(40, dtype=bool)
    challenger[39] = False
    assert not clearly_better(challenger, stable)
    stable[4:12] = False  # 12 more right, none fewer: a clear win
    assert clearly_better(challenger, stable)
    assert not clearly_better(stable, stable)  # a tie keeps the stable method
    # Each class two opposite clusters: no linear head separates them, the nearest neighbours do, and auto
    # takes kNN over logistic regression on that evidence.
    rng = np.random.default_rng(3)
    centers = _unit(rng.normal(size=(len(CLASSES), 16)))
    labels = np.repeat(np.arange(len(CLASSES)), 8)
    signs = np.tile([1.0, -1.0], labels.size // 2)[:, None]
    features = _unit(signs * centers[labels] + 0.1 * rng.normal(size=(labels.size, 16)))
    support = SupportSet.from_examples(features.astype(np.float32), [CLASSES[i] for i in labels], CLASSES)
    auto = fit_few_shot(support, "auto", None)
    assert auto.method == "knn" and auto.candidates["knn"] >= auto.candidates["logistic_regression"] + 0.3, auto.candidates


def test_one_shot_cannot_cross_validate_so_auto_takes_the_default():
    support, zero_shot, queries = _problem(shots=1)
    with_text = fit_few_shot(support, "auto", zero_shot)
    without = fit_few_shot(support, "auto", None)
    assert (with_text.method, with_text.cv_accuracy, with_text.cv_folds, with_text.candidates) == ("linear_probe", None, 0, {})
    assert (without.method, without.cv_accuracy, without.cv_folds, without.candidates) == ("prototype", None, 0, {})
    for method in ("knn", "logistic_regression", "prototype"):
        probabilities = fit_few_shot(support, method, None).probabilities(queries)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_support_set_key_changes_with_everything_the_head_depends_on():
    support, zero_shot, _ = _problem()
    key = support_set_key("clip/ViT-B-32/random", support, "auto", zero_shot)
    assert key == support_set_key("clip/ViT-B-32/random", SupportSet(support.embeddings.copy(), support.labels.copy(),
                                                                      support.classes), "auto", zero_shot)
    relabeled = support.labels.copy()
    relabeled[0] = 1
    moved = support.embeddings.copy()
    moved[3, 0] += 1e-3
    others = {
        support_set_key("clip/ViT-B-32/openai", support, "auto", zero_shot),
        support_set_key("clip/ViT-B-32/random", support, "tip_adapter", zero_shot),
        support_set_key("clip/ViT-B-32/random", support, "auto", None),
        support_set_key("clip/ViT-B-32/random", SupportSet(support.embeddings, relabeled, support.classes), "auto", zero_shot),
        support_set_key("clip/ViT-B-32/random", SupportSet(moved, support.labels, support.classes), "auto", zero_shot),
        support_set_key("clip/ViT-B-32/random", SupportSet(support.embeddings, support.labels, tuple(reversed(CLASSES))), "auto", zero_shot),
        support_set_key("clip/ViT-B-32/random", support, "auto", ZeroShotWeights(zero_shot.weights, 50.0)),
    }
    assert key not in others and len(others) == 7


def test_head_cache_is_bounded_by_entries_and_bytes():
    support, zero_shot, _ = _problem()
    fits = []

    def fit():
        fits.append(1)
        return fit_few_shot(support, "tip_adapter", zero_shot)

    cache = FewShotHeadCache(max_entries=2)
    first, cached = cache.get_or_fit("a", fit)
    again, cached_again = cache.get_or_fit("a", fit)
    assert (cached, cached_again, len(fits)) == (False, True, 1) and again is first
    cache.get_or_fit("b", fit)
    cache.get_or_fit("c", fit)
    assert len(cache) == 2 and cache.get("a") is None and cache.get("c") is not None
    small = FewShotHeadCache(max_entries=10, max_bytes=support.embeddings.nbytes // 2)
    small.get_or_fit("a", fit)
    assert len(small) == 0  # a head larger than the byte bound is never kept
