"""Calibration and auto-accept pieces on synthetic numbers: Clopper-Pearson bound, threshold search, lookup,
temperature fit, ECE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml.training.auto_accept import auto_accept_tables, precision_lower_bound, summary, threshold_for, threshold_row
from ml.training.calibration import ERROR_FREE_NOTE, calibrate, expected_calibration_error, fit_temperature, nll, reliability_bins


def test_clopper_pearson_lower_bound_exact_values():
    # all n right: the bound solves p**n = alpha
    assert precision_lower_bound(np.array([30]), np.array([30]))[0] == pytest.approx(0.05 ** (1 / 30))
    # k of n: P(X >= k | n, p) = alpha at the bound
    from scipy.stats import binom

    bound = precision_lower_bound(np.array([45]), np.array([50]))[0]
    assert binom.sf(44, 50, bound) == pytest.approx(0.05, abs=1e-9)
    assert precision_lower_bound(np.array([0]), np.array([5]))[0] == 0.0


def test_threshold_row_takes_the_lowest_threshold_whose_bound_reaches_the_target():
    confidence = np.linspace(1.0, 0.01, 200)
    correct = np.ones(200, dtype=bool)
    correct[100:] = np.arange(100) % 2 == 0  # perfect above 0.5, half right below
    row = threshold_row(confidence, correct, 0.95)
    accepted = row["accepted"]
    assert row["threshold"] == pytest.approx(confidence[accepted - 1]) and row["coverage"] == accepted / 200
    assert row["precision_lower_bound"] >= 0.95
    larger = range(accepted + 1, 201)  # every larger accepted set (lower threshold) fails the guard
    assert max(precision_lower_bound(np.array([correct[:m].sum() for m in larger]), np.array(list(larger)))) < 0.95
    assert 59 <= accepted <= 110
    unreachable = threshold_row(confidence[:20], correct[:20], 0.99)  # 20 right prove only ~0.86
    assert unreachable["threshold"] is None and unreachable["coverage"] == 0.0


def test_threshold_row_keeps_ties_together():
    confidence = np.array([0.9] * 100 + [0.8] * 100)
    correct = np.array([True] * 100 + [True] * 90 + [False] * 10)
    row = threshold_row(confidence, correct, 0.90)
    assert row["threshold"] in (0.9, 0.8) and row["accepted"] in (100, 200)


def test_tables_per_class_and_lookup():
    rng = np.random.default_rng(0)
    n = 400
    targets = np.repeat([0, 1], n // 2)
    probabilities = np.zeros((n, 3))
    conf = rng.uniform(0.5, 1.0, n)
    predicted = targets.copy()
    wrong = rng.uniform(size=n) > conf  # lower confidence, more often wrong
    predicted[wrong] = 1 - predicted[wrong]
    probabilities[np.arange(n), predicted] = conf
    probabilities[np.arange(n), 2] = 1 - conf
    tables = auto_accept_tables(probabilities, targets, ["a", "b", "c"], min_class_images=50)
    assert set(tables["per_class"]) == {"a", "b"}  # "c" is never predicted
    assert [r["precision"] for r in summary(tables)] == [0.9, 0.95, 0.98, 0.99]
    global_90 = tables["global"][0]["threshold"]
    assert global_90 is not None
    assert threshold_for(tables, "c", 0.9) == global_90  # no class table: the global threshold
    own = tables["per_class"]["a"][0]["threshold"]
    assert threshold_for(tables, "a", 0.9) == (own if own is not None else global_90)
    assert threshold_for(tables, "a", 0.93) == threshold_for(tables, "a", 0.95)  # next tabulated target up
    assert threshold_for(tables, "a", 0.995) is None and threshold_for(None, "a", 0.9) is None
    # multi-label tags: a class's own table decides, a missing threshold in it is "never", not the global row
    unproven = {"global": [{"precision": 0.9, "threshold": 0.7}],
                "per_class": {"a": [{"precision": 0.9, "threshold": None}], "b": [{"precision": 0.9, "threshold": 0.8}]}}
    assert threshold_for(unproven, "a", 0.9) == 0.7 and threshold_for(unproven, "a", 0.9, own_table_decides=True) is None
    assert threshold_for(unproven, "b", 0.9, own_table_decides=True) == 0.8
    assert threshold_for(unproven, "c", 0.9, own_table_decides=True) == 0.7  # no table of its own: the global row


def test_fit_temperature_recovers_overconfidence():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 5, generator=generator) * 2
    targets = torch.multinomial(true_logits.softmax(dim=1), 1, generator=generator).squeeze(1)
    temperature = fit_temperature(true_logits * 3, targets)  # 3x over-confident
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert nll(true_logits * 3, targets, temperature) < nll(true_logits * 3, targets)
    assert fit_temperature(true_logits, targets) == pytest.approx(1.0, rel=0.1)


def test_error_free_validation_keeps_the_temperature_at_one():
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 5, (200,), generator=generator)
    logits = torch.rand(200, 5, generator=generator)
    logits[torch.arange(200), targets] += 1.5  # every prediction right, at modest confidence
    assert (logits.argmax(dim=1) == targets).all()
    assert fit_temperature(logits, targets) <= 0.1  # the unregularised fit runs to the floor: near-certainty
    kept = calibrate(logits, targets)
    assert kept.temperature == 1.0 and kept.note == ERROR_FREE_NOTE
    logits[0, (targets[0] + 1) % 5] += 10.0  # one error: there is evidence again, the temperature is fitted
    fitted = calibrate(logits, targets)
    assert fitted.note is None and fitted.temperature == fit_temperature(logits, targets) != 1.0


def test_ece_and_reliability_bins():
    probabilities = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    targets = np.array([0, 1, 0, 0])
    bins = reliability_bins(probabilities, targets, bins=10)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 2, 0, 0, 0, 2]
    # bin (0.9, 1]: confidence 0.95, accuracy 0.5; bin (0.5, 0.6]: confidence 0.55, accuracy 0.5
    assert expected_calibration_error(probabilities, targets, bins=10) == pytest.approx(0.5 * 0.45 + 0.5 * 0.05)


def test_schema_fields_for_trust():
    from pydantic import ValidationError

    from schemas.annotation import AnnotationRequest
    from schemas.training import TrainingConfig, TrainingMetrics

    base = {"task": "classify", "images": [{"id": "a", "url": "http://x/a.png"}]}
    request = AnnotationRequest.model_validate({**base, "model": "custom", "model_url": "s3://b/m", "auto_accept_precision": 0.95})
    assert request.auto_accept_precision == 0.95
    with pytest.raises(ValidationError, match="only allowed with model 'custom'"):
        AnnotationRequest.model_validate({**base, "classes": ["cat", "dog"], "auto_accept_precision": 0.95})
    with pytest.raises(ValidationError):
        AnnotationRequest.model_validate({**base, "model": "custom", "model_url": "s3://b/m", "auto_accept_precision": 1.0})
    config = TrainingConfig(model_name="resnet10t", num_classes=2, class_weighting="sampler", export=["onnx"])
    assert config.class_weighting == "sampler" and config.export == ["onnx"]
    with pytest.raises(ValidationError):
        TrainingConfig(model_name="resnet10t", num_classes=2, export=["tflite"])
    metrics = TrainingMetrics.model_validate({"ece": {"before": 0.1, "after": 0.02}, "temperature": 1.5,
                                              "auto_accept": [{"precision": 0.9, "threshold": None, "coverage": 0.0}]})
    assert metrics.ece.after == 0.02 and metrics.auto_accept[0].threshold is None


def test_report_is_one_self_contained_page(tmp_path):
    import re

    from PIL import Image

    from ml.training.report import write_report

    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "x.png")
    bins = [{"lo": i / 15, "hi": (i + 1) / 15, "count": 2 if i == 14 else 0, "confidence": 0.99 if i == 14 else None,
             "accuracy": 0.5 if i == 14 else None} for i in range(15)]
    metrics = {
        "val_accuracy": 0.5, "macro_f1": 0.33, "balanced_accuracy": 0.5, "best_epoch": 1, "temperature": 2.0,
        "ece": {"before": 0.49, "after": 0.2}, "nll": {"before": 1.0, "after": 0.7},
        "reliability": {"before": bins, "after": bins},
        "auto_accept": [{"precision": 0.9, "threshold": None, "coverage": 0.0}],
        "per_class": {"<b>": {"precision": 1.0, "recall": 0.5, "f1": 0.67, "support": 2}},
        "confusion_matrix": [[1, 1], [0, 0]], "epochs": [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9,
                                                          "val_accuracy": 0.5, "lr": 0.001}],
    }
    page = write_report(tmp_path / "report.html", metrics, ["<b>", "c"], "resnet10t",
                        [(str(tmp_path / "x.png"), "<b>", "c", 0.99)]).read_text()
    sources = re.findall(r"src='([^']*)'", page)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "&lt;b&gt;" in page and "<th><b></th>" not in page  # class names are escaped
    assert "never" in page  # an unreachable auto-accept row
