"""Exports of a trained model beside its safetensors weights; each checked against the torch model at export time.

ONNX: input ``pixels`` ``[batch, 3, H, W]`` (float32, preprocessed as config.json says: resize, centre crop,
normalise with ``mean``/``std``), output ``logits`` ``[batch, num_classes]`` (raw: divide by config.json's
``calibration.temperature`` before the softmax for the calibrated confidences). The batch dimension is dynamic.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ml.training.errors import PackageError

log = logging.getLogger(__name__)

ONNX_OPSET = 20
"""The newest opset torch's TorchScript-based exporter writes (``torch.onnx._constants``); onnxruntime runs it."""
ONNX_MAX_ABS_DIFF = 1e-4
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"


def export_onnx(model: nn.Module, images: torch.Tensor, path: Path, max_abs_diff: float = ONNX_MAX_ABS_DIFF) -> dict[str, Any]:
    """Write ``model`` (eval mode, CPU) as ONNX to ``path`` and check it with onnxruntime on ``images``.

    Returns ``{"opset", "max_abs_diff", "checked_images"}``; PackageError when the export fails or the largest
    absolute difference of the logits exceeds ``max_abs_diff``. The check runs the whole batch and also one
    image alone, so a batch dimension baked in as a constant fails it.
    """
    import onnx
    import onnxruntime

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    images = images.to("cpu", torch.float32).contiguous()
    example = images[:2] if images.shape[0] >= 2 else images
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes
            torch.onnx.export(
                model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=ONNX_OPSET, dynamo=False,
            )
    except Exception as exc:
        raise PackageError(f"ONNX export failed: {type(exc).__name__}: {str(exc)[:500]}") from exc
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise PackageError(f"ONNX export is not a valid model: {str(exc)[:500]}") from exc
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(images).float().numpy()
    got = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
    single = session.run([OUTPUT_NAME], {INPUT_NAME: images[:1].numpy()})[0]
    diff = max(float(np.abs(got - expected).max()), float(np.abs(single - expected[:1]).max()))
    if not diff <= max_abs_diff:
        raise PackageError(f"ONNX export does not match the torch model: max abs difference {diff:.3g} > {max_abs_diff}")
    log.info("onnx export checked: max abs diff %.3g on %d images", diff, images.shape[0])
    return {"opset": ONNX_OPSET, "max_abs_diff": diff, "checked_images": int(images.shape[0])}
