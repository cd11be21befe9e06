"""ONNX export: parity with torch through onnxruntime for the four named families (random weights, small images),
and a trained package with model.onnx that runs from config.json alone (no code of ours), as docs/contract.md shows."""

from __future__ import annotations

import json
import time

import numpy as np
import onnxruntime
import pytest
import timm
import torch
from PIL import Image

from ml.trained import TrainedModel
from ml.training import NullCallbacks, train
from ml.training.errors import PackageError
from ml.training.export import ONNX_MAX_ABS_DIFF, export_onnx
from tests.fixtures.trained_model import digits_dataset, digits_spec  # noqa: F401  (fixtures)

torch.set_num_threads(2)

# The architectures as named, at the smallest input that keeps them whole: ViT-B/16 at 32 px (4 patches + class
# token), Swin-T at 64 px (its windows shrink to the 2x2 last stage), the convolutional ones at 32 px.
FAMILIES = [
    ("vit_base_patch16_224", {"img_size": 32}, 32),
    ("convnext_tiny", {}, 32),
    ("efficientnet_b0", {}, 32),
    ("swin_tiny_patch4_window7_224", {"img_size": 64}, 64),
]


@pytest.mark.parametrize("name,kwargs,size", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_onnx_parity_with_torch(name, kwargs, size, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=7, **kwargs).eval()
    images = torch.randn(5, 3, size, size)
    started = time.monotonic()
    parity = export_onnx(model, images, tmp_path / "model.onnx")
    print(f"{name}: max abs diff {parity['max_abs_diff']:.2e} ({time.monotonic() - started:.1f} s)")
    assert parity["max_abs_diff"] <= ONNX_MAX_ABS_DIFF and parity["checked_images"] == 5
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = torch.randn(3, 3, size, size)  # another batch size than the export's example: the batch is dynamic
    with torch.no_grad():
        expected = model(batch).numpy()
    got = session.run(["logits"], {"pixels": batch.numpy()})[0]
    assert got.shape == (3, 7) and np.abs(got - expected).max() <= ONNX_MAX_ABS_DIFF


def test_export_refuses_a_mismatch(tmp_path):
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3).eval()
    with pytest.raises(PackageError, match="does not match"):
        export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "model.onnx", max_abs_diff=-1.0)


def test_trained_package_has_onnx_that_runs_from_config_alone(digits_dataset, tmp_path):
    samples, _, _ = digits_dataset
    train_samples, val_samples = samples[:300], samples[300:400]
    spec = digits_spec(epochs=1, export=["onnx"])
    result = train(spec, train_samples, val_samples, tmp_path / "run", NullCallbacks())
    package = result.package_dir
    assert (package / "model.onnx").is_file()
    assert result.metrics["onnx"]["max_abs_diff"] <= ONNX_MAX_ABS_DIFF

    # the recipe of docs/contract.md: config.json's preprocessing and temperature, onnxruntime, numpy, Pillow
    config = json.loads((package / "config.json").read_text())
    assert config["onnx"]["file"] == "model.onnx"
    _, height, width = config["input_size"]
    path = samples[500][0]
    image = Image.open(path).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    pixels = (np.asarray(image, dtype=np.float32) / 255.0 - config["mean"]) / config["std"]
    pixels = pixels.transpose(2, 0, 1)[None].astype(np.float32)
    session = onnxruntime.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"pixels": pixels})[0] / config["calibration"]["temperature"]
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()

    loaded = TrainedModel.load(package, device="cpu")
    expected = loaded.predict(loaded.preprocess(Image.open(path))).numpy()
    assert np.abs(probabilities - expected).max() <= 1e-3  # resize paths differ a little; same class surely
    assert probabilities.argmax() == expected.argmax()
