"""Train on scikit-learn digits (as PNG files) and check the package, metrics and trained-model inference."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from ml.trained import TrainedModel
from ml.training.augment import DataConfig, eval_transform
from ml.training.data import load_rgb
from tests.fixtures.trained_model import digits_dataset, trained_digits  # noqa: F401  (fixtures)

torch.set_num_threads(2)


def test_digits_reach_90_percent_and_package_is_complete(trained_digits):
    result = trained_digits.result
    assert result.metrics["val_accuracy"] >= 0.9
    assert result.resumed_from_epoch is None and result.epochs_run == trained_digits.spec.epochs
    assert sorted(p.name for p in result.package_dir.iterdir()) == ["config.json", "metrics.json", "model.safetensors", "report.html"]

    metrics = json.loads((result.package_dir / "metrics.json").read_text())
    for key in ("train_loss", "val_loss", "val_accuracy", "best_epoch", "per_class", "confusion_matrix", "epochs"):
        assert key in metrics
    assert metrics["best_epoch"] == result.best_epoch
    assert metrics["val_accuracy"] == max(e["val_accuracy"] for e in metrics["epochs"])
    assert set(metrics["per_class"]) == set(trained_digits.class_names)
    assert set(metrics["per_class"]["three"]) == {"precision", "recall", "f1", "support"}
    matrix = metrics["confusion_matrix"]
    assert len(matrix) == 10 and all(len(row) == 10 for row in matrix)
    assert sum(map(sum, matrix)) == len(trained_digits.val)
    assert len(metrics["epochs"]) == trained_digits.spec.epochs
    for entry in metrics["epochs"]:
        assert {"train_loss", "val_loss", "val_accuracy", "lr", "images_per_s", "eta_s", "epoch_time_s"} <= set(entry)

    config = json.loads((result.package_dir / "config.json").read_text())
    assert config["model_name"] == "resnet10t" and config["num_classes"] == 10
    assert config["class_names"] == trained_digits.class_names
    assert config["image_size"] == 32 and config["input_size"] == [3, 32, 32]
    assert {"mean", "std", "interpolation", "crop_pct", "training"} <= set(config)
    assert config["training"]["augmentation"] == "none" and config["training"]["epochs"] == trained_digits.spec.epochs


def test_package_weights_are_the_best_epoch_weights(trained_digits):
    stored = safetensors.torch.load_file(str(trained_digits.package_dir / "model.safetensors"))
    in_memory = trained_digits.result.model.state_dict()
    assert stored.keys() == in_memory.keys()
    assert all(torch.equal(stored[k], in_memory[k]) for k in stored)


def test_trained_model_reproduces_in_memory_predictions_on_held_back_digits(trained_digits):
    loaded = TrainedModel.load(trained_digits.package_dir, device="cpu")
    assert loaded.class_names == trained_digits.class_names
    assert loaded.image_size == 32 and loaded.info_variant == "resnet10t"

    images = [load_rgb(path) for path, _ in trained_digits.test]
    labels = torch.tensor([label for _, label in trained_digits.test])
    pixels = torch.stack([loaded.preprocess(image) for image in images])
    assert pixels.shape == (len(images), 3, 32, 32)

    training_eval = eval_transform(DataConfig.from_json_dict(loaded.config))
    assert torch.equal(pixels[0], training_eval(images[0]))

    probabilities = loaded.predict(pixels)
    temperature = loaded.config["calibration"]["temperature"]
    assert loaded.temperature == temperature and temperature > 0
    with torch.inference_mode():
        expected = (trained_digits.result.model(pixels) / temperature).softmax(dim=-1)
    assert probabilities.shape == (len(images), 10)
    torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=0)
    accuracy = (probabilities.argmax(dim=1) == labels).float().mean().item()
    assert accuracy >= 0.9


def test_predict_over_a_subset(trained_digits):
    loaded = TrainedModel.load(trained_digits.package_dir, device="cpu")
    path, label = next((p, l) for p, l in trained_digits.test if l == 7)
    pixels = loaded.preprocess(load_rgb(path)).unsqueeze(0)
    full = loaded.predict(pixels)
    subset = ["one", "seven", "nine"]
    part = loaded.predict(pixels, subset=subset)
    assert part.shape == (1, 3)
    torch.testing.assert_close(part.sum(dim=1), torch.ones(1))
    expected = full[:, [1, 7, 9]] / full[:, [1, 7, 9]].sum(dim=1, keepdim=True)
    torch.testing.assert_close(part, expected, atol=1e-5, rtol=1e-4)
    reordered = loaded.predict(pixels, subset=["nine", "one", "seven"])
    torch.testing.assert_close(reordered, part[:, [2, 0, 1]])
    assert loaded.predict(pixels[0]).shape == (1, 10)

    with pytest.raises(ValueError, match="not trained on: \\['eleven'\\]"):
        loaded.predict(pixels, subset=["one", "eleven"])
    with pytest.raises(ValueError, match="at least one"):
        loaded.predict(pixels, subset=[])
    with pytest.raises(ValueError, match="more than once"):
        loaded.predict(pixels, subset=["one", "one"])
    with pytest.raises(ValueError, match="not a single string"):
        loaded.predict(pixels, subset="one")
