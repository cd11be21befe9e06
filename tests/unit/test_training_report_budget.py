"""report.html: text in its plots is literal (a class name with ``$...$`` is no mathtext), and a report that
cannot be written never costs the trained model: the package is complete, the metrics say why."""

from __future__ import annotations

import json

import pytest
import torch

from ml.training import NullCallbacks, stratified_split, train
from tests.fixtures.trained_model import digits_dataset, digits_spec  # noqa: F401  (fixture)

torch.set_num_threads(2)

DOLLAR_NAMES = ["$x^$", "$\\frac{$", "a$b$c", "$$", "$\\undefinedcommand$", "5", "6", "7", "8", "9"]


@pytest.fixture(scope="module")
def tiny_digits(digits_dataset):
    samples, _, _ = digits_dataset
    subset, _ = stratified_split(samples[:300], 0.6, seed=2)  # 120 images
    return stratified_split(subset, 0.3, seed=2)


def _spec(**overrides):
    values = dict(model_name="test_resnet", epochs=1, batch_size=32, image_size=16, heartbeat_s=3600)
    values.update(overrides)
    return digits_spec(**values)


def test_dollar_class_names_are_plotted_literally(tmp_path):
    from PIL import Image

    from ml.training.report import write_report

    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "x.png")
    metrics = {"val_accuracy": 0.5, "per_class": {name: {"precision": 1.0, "recall": 0.5, "f1": 0.67, "support": 2}
                                                  for name in DOLLAR_NAMES},
               "confusion_matrix": [[1] * 10 for _ in range(10)],
               "epochs": [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "val_accuracy": 0.5, "lr": 0.001}]}
    page = write_report(tmp_path / "report.html", metrics, DOLLAR_NAMES, "$resnet$",
                        [(str(tmp_path / "x.png"), "$x^$", "$\\frac{$", 0.99)]).read_text()
    assert "$\\frac{$" in page and page.count("data:image/png;base64,") == 4


def test_a_report_failure_keeps_the_package(tiny_digits, tmp_path, monkeypatch):
    import ml.training.report as report

    def broken(*args, **kwargs):
        raise OSError("disk full while rendering")

    monkeypatch.setattr(report, "write_report", broken)
    train_samples, val_samples = tiny_digits
    result = train(_spec(), train_samples, val_samples, tmp_path, NullCallbacks())
    files = {p.name for p in result.package_dir.iterdir()}
    assert {"model.safetensors", "config.json", "metrics.json"} <= files and "report.html" not in files
    stored = json.loads((result.package_dir / "metrics.json").read_text())
    assert "report_url" not in stored and "disk full" in stored["report_skipped"]


def test_dollar_class_names_are_plotted_literally_on_the_multilabel_page(tmp_path):
    import numpy as np

    from ml.training.report import write_multilabel_report

    rng = np.random.default_rng(0)
    truth = rng.random((40, len(DOLLAR_NAMES))) < 0.3
    probabilities = np.clip(truth * 0.6 + rng.random(truth.shape) * 0.4, 0, 1)
    metrics = {"map": 0.8, "per_class": {name: {"precision": 1.0, "recall": 0.5, "f1": 0.67, "support": 2}
                                         for name in DOLLAR_NAMES},
               "thresholds": {name: 0.5 for name in DOLLAR_NAMES},
               "epochs": [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "val_accuracy": 0.5, "lr": 0.001}]}
    page = write_multilabel_report(tmp_path / "report.html", metrics, DOLLAR_NAMES, "$resnet$", probabilities,
                                   truth).read_text()
    assert "$\\frac{$" in page and page.count("data:image/png;base64,") == 2
