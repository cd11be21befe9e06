"""Few-shot and audit on features that mean something: embeddings of held-back digits from the model trained
here (tests.fixtures.trained_model; its validation and test splits, 503 images, which it never trained on).

Random weights prove the mechanics; these prove the gains. The text-tower methods need a zero-shot classifier
over digits, which no text tower here gives: a stand-in is built from the backbone's own training split
(class means, perturbed until it is a weak classifier, ~50-70% accurate), disjoint from support and queries.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ml.audit import AuditOptions, audit
from ml.fewshot import TEXT_METHODS, VISION_METHODS, SupportSet, ZeroShotWeights, fit_few_shot
from tests.fixtures.trained_model import digits_dataset, trained_digits  # noqa: F401  (fixtures)
from testkit.digit_embeddings import digit_embeddings

SHOTS = (1, 4, 16)


@pytest.fixture(scope="module")
def digits(trained_digits):  # noqa: F811
    return digit_embeddings(trained_digits)


@pytest.fixture(scope="module")
def weak_text_classifier(digits):
    rng = np.random.default_rng(1)
    means = np.stack([digits.train[digits.train_labels == c].mean(axis=0) for c in range(10)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    weights = means + 0.3 * rng.normal(size=means.shape)
    weights /= np.linalg.norm(weights, axis=1, keepdims=True)
    return ZeroShotWeights(weights.astype(np.float32), 100.0)


def _noise(accuracy: float, n_support: int, n_query: int) -> float:
    """Two standard errors of the difference between a cross-validated and a held-out accuracy."""
    p = min(max(accuracy, 0.5 / n_support), 1 - 0.5 / n_support)
    return 2 * math.sqrt(p * (1 - p) / n_support + p * (1 - p) / n_query)


def _run(digits, shots, zero_shot):
    rng = np.random.default_rng(shots)
    labels = digits.pool_labels
    support_rows = np.concatenate([rng.choice(np.flatnonzero(labels == c), shots, replace=False) for c in range(10)])
    query_rows = np.setdiff1d(np.arange(labels.size), support_rows)
    support = SupportSet.from_examples(digits.pool[support_rows], [digits.class_names[i] for i in labels[support_rows]],
                                       digits.class_names)
    queries, truth = digits.pool[query_rows], labels[query_rows]
    methods = ("auto",) + (TEXT_METHODS if zero_shot is not None else VISION_METHODS)
    results = {method: fit_few_shot(support, method, zero_shot) for method in methods}
    accuracy = {method: float((r.probabilities(queries).argmax(axis=1) == truth).mean()) for method, r in results.items()}
    return results, accuracy, len(support_rows), len(query_rows)


def test_few_shot_without_a_text_tower_on_digits(digits):
    print("\nshots  " + "  ".join(f"{m:>19}" for m in ("auto",) + VISION_METHODS))
    for shots in SHOTS:
        results, accuracy, n_support, n_query = _run(digits, shots, None)
        auto = results["auto"]
        print(f"{shots:>5}  " + "  ".join(f"{accuracy[m]:>19.3f}" for m in ("auto",) + VISION_METHODS)
              + f"   auto -> {auto.method} (cv {auto.cv_accuracy})")
        assert auto.examples_per_class == {name: shots for name in digits.class_names}
        if shots == 1:  # nothing to cross-validate: the nearest prototype
            assert (auto.method, auto.cv_accuracy) == ("prototype", None)
            continue
        best = max(accuracy[m] for m in VISION_METHODS)
        assert accuracy["auto"] >= best - _noise(auto.cv_accuracy, n_support, n_query), (shots, accuracy)
        assert auto.cv_accuracy == auto.candidates[auto.method]  # the stable method unless clearly beaten in CV
        assert auto.method == "logistic_regression" or auto.cv_accuracy > auto.candidates["logistic_regression"] + 0.02
        for method in VISION_METHODS:  # each method against the nearest-prototype baseline
            assert accuracy[method] >= accuracy["prototype"] - 0.05, (shots, method, accuracy)
    assert accuracy["prototype"] >= 0.95  # 16 shots on an embedding of this domain


def test_few_shot_with_a_text_classifier_on_digits(digits, weak_text_classifier):
    labels = digits.pool_labels
    zero_shot_accuracy = float((weak_text_classifier.logits(digits.pool).argmax(axis=1) == labels).mean())
    print(f"\nzero-shot stand-in: {zero_shot_accuracy:.3f}\nshots  " + "  ".join(f"{m:>12}" for m in ("auto",) + TEXT_METHODS))
    assert 0.4 <= zero_shot_accuracy <= 0.8
    for shots in SHOTS:
        results, accuracy, n_support, n_query = _run(digits, shots, weak_text_classifier)
        auto = results["auto"]
        print(f"{shots:>5}  " + "  ".join(f"{accuracy[m]:>12.3f}" for m in ("auto",) + TEXT_METHODS)
              + f"   auto -> {auto.method} (cv {auto.cv_accuracy})")
        if shots == 1:  # nothing to cross-validate: CLAP's linear probe, the robust default
            assert (auto.method, auto.cv_accuracy) == ("linear_probe", None)
            assert accuracy["linear_probe"] >= zero_shot_accuracy + 0.2, accuracy
            continue
        best = max(accuracy[m] for m in TEXT_METHODS)
        assert accuracy["auto"] >= best - _noise(auto.cv_accuracy, n_support, n_query), (shots, accuracy)
        if shots >= 4:
            assert min(accuracy[m] for m in TEXT_METHODS) >= zero_shot_accuracy + 0.1, (shots, accuracy)
    assert accuracy["linear_probe"] >= 0.95


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_audit_finds_ten_percent_flipped_digit_labels(digits, seed):
    rng = np.random.default_rng(seed)
    truth = digits.pool_labels
    flipped = rng.choice(truth.size, round(0.1 * truth.size), replace=False)
    given = truth.copy()
    given[flipped] = (truth[flipped] + rng.integers(1, 10, flipped.size)) % 10  # always another class
    table = audit(digits.pool, given, 10, AuditOptions(seed=seed))
    flagged = np.flatnonzero(table.label_issue)
    hits = np.intersect1d(flagged, flipped)
    precision, recall = hits.size / max(flagged.size, 1), hits.size / flipped.size
    print(f"\nseed {seed}: flagged {flagged.size}, precision {precision:.3f}, recall {recall:.3f}, "
          f"suggested = true label on {np.mean(table.suggested_label[hits] == truth[hits]):.3f} of the hits")
    assert precision >= 0.8 and recall >= 0.8
    assert np.mean(table.suggested_label[hits] == truth[hits]) >= 0.9
    assert np.isin(table.order()[: flipped.size], flipped).mean() >= 0.8  # the issue ranking puts them first


def test_audit_of_clean_digit_labels_flags_under_one_percent(digits):
    table = audit(digits.pool, digits.pool_labels, 10)
    print(f"\nclean labels: flagged {int(table.label_issue.sum())} of {table.labels.size}, cv accuracy {table.cv_accuracy:.3f}")
    assert table.label_issue.sum() < 0.01 * table.labels.size
