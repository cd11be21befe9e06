"""Calibration and auto-accept on digits with a model trained here, judged on a held-back split (never seen by the
temperature fit or the threshold search)."""

from __future__ import annotations

import json

import numpy as np
import torch

from ml.trained import TrainedModel
from ml.training.auto_accept import TARGET_PRECISIONS
from ml.training.calibration import ECE_BINS, expected_calibration_error
from ml.training.data import load_rgb
from tests.fixtures.trained_model import digits_dataset, trained_digits  # noqa: F401  (fixtures)

torch.set_num_threads(2)


def _held_back(trained_digits):
    loaded = TrainedModel.load(trained_digits.package_dir, device="cpu")
    pixels = torch.stack([loaded.preprocess(load_rgb(path)) for path, _ in trained_digits.test])
    labels = np.array([label for _, label in trained_digits.test])
    with torch.inference_mode():
        logits = loaded.model(pixels).double()
    return loaded, pixels, labels, logits


def test_metrics_and_config_carry_the_calibration(trained_digits):
    metrics = json.loads((trained_digits.package_dir / "metrics.json").read_text())
    config = json.loads((trained_digits.package_dir / "config.json").read_text())
    temperature = metrics["temperature"]
    assert temperature > 0 and config["calibration"]["temperature"] == temperature
    assert set(metrics["ece"]) == {"before", "after"} and set(metrics["nll"]) == {"before", "after"}
    assert metrics["nll"]["after"] <= metrics["nll"]["before"]  # the temperature minimises validation NLL
    assert len(metrics["reliability"]["after"]) == ECE_BINS
    assert sum(b["count"] for b in metrics["reliability"]["before"]) == len(trained_digits.val)
    assert 0 < metrics["macro_f1"] <= 1 and 0 < metrics["balanced_accuracy"] <= 1
    assert [row["precision"] for row in metrics["auto_accept"]] == list(TARGET_PRECISIONS)
    assert all(set(row) == {"precision", "threshold", "coverage"} for row in metrics["auto_accept"])
    assert config["calibration"]["auto_accept"]["global"] == metrics["auto_accept_global"]


def test_error_free_validation_keeps_the_temperature_and_the_held_back_accuracy(trained_digits):
    """The digits model gets every validation image right: such a split carries no evidence of over-confidence,
    so the temperature stays 1 and the metrics say why (a fit would run it to its floor)."""
    metrics = json.loads((trained_digits.package_dir / "metrics.json").read_text())
    loaded, _, labels, logits = _held_back(trained_digits)
    assert metrics["val_accuracy"] == 1.0
    assert loaded.temperature == 1.0 and metrics["temperature"] == 1.0 and metrics["temperature_note"]
    probabilities = (logits / loaded.temperature).softmax(dim=1).numpy()
    print(f"held-back ECE {expected_calibration_error(probabilities, labels):.4f} (n={len(labels)})")
    assert (probabilities.argmax(axis=1) == labels).mean() >= 0.9


def _consistent(correct: np.ndarray, target: float) -> bool:
    """The held-back sample does not contradict the row's precision: at the targets up to 0.95, its precision
    reaches the target; above, ~180 held-back images are too few to tell 0.98 from 0.99, so the errors seen must
    be likely (one-sided binomial p >= 0.05) for a model whose precision is the target."""
    from scipy.stats import binom

    errors = int((~correct).sum())
    if target <= 0.95:
        return correct.mean() >= target
    return binom.sf(errors - 1, len(correct), 1.0 - target) >= 0.05


def test_auto_accept_rows_hold_their_precision_on_held_back_digits(trained_digits):
    loaded, pixels, labels, logits = _held_back(trained_digits)
    probabilities = loaded.predict(pixels)
    confidence, predicted = probabilities.max(dim=1)
    correct = predicted.numpy() == labels
    rows = json.loads((trained_digits.package_dir / "metrics.json").read_text())["auto_accept"]
    covered = [row for row in rows if row["coverage"] > 0]
    assert covered, rows  # a 90%+ model must auto-accept something at 0.90
    for row in covered:
        accepted = confidence.numpy() >= row["threshold"]
        precision = correct[accepted].mean()
        print(f"target {row['precision']}: threshold {row['threshold']:.4f} val coverage {row['coverage']:.3f} "
              f"held-back coverage {accepted.mean():.3f} precision {precision:.4f}")
        assert accepted.any() and _consistent(correct[accepted], row["precision"])
        # the model's own decision (per-class thresholds where it has them, else global) holds the target too
        decisions = np.array(loaded.auto_accept(probabilities, row["precision"]))
        assert decisions.any() and _consistent(correct[decisions], row["precision"])
    assert not any(loaded.auto_accept(probabilities, 0.999))  # above the table: never accepted
