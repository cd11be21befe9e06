"""One fetched image -> the preprocessed pixels a model takes, by the path the settings choose (classify and embed).

- ``CLS_PREPROCESS=pil``: Pillow decode and the family's Pillow transform, on the CPU pool;
- ``CLS_PREPROCESS=tensor``: torchvision decode and tensor resize / crop / normalise, on the CPU pool;
- ``tensor`` with the model on CUDA (and ``CLS_GPU_DECODE`` on, the default): the decode-limit checks run on the
  CPU pool from the header (the same errors as the other paths), then baseline JPEGs of concurrent images, of
  any requests, are decoded together in one ``decode_jpeg(list, device="cuda")`` call on the GPU thread and
  resized / normalised there (a micro-batcher of their own, keyed by device and recipe); any other image, and
  any image the batched decode refuses or fails, takes the CPU tensor path with its per-image errors.

The batched path is device-parameterised (``batched_device_types``): the tests run it with the CPU standing in.
"""

from __future__ import annotations

import functools
from typing import Any

import structlog
import torch

from handlers.batcher import MicroBatcher
from handlers.errors import ImageError
from handlers.executor import Executors
from handlers.images import DecodeLimits, batched_jpeg_size, decoded, decoded_tensor
from ml.preprocess import DECODE_BATCH_PIXELS, EncodedJpeg, JpegBatch, preprocess_jpegs

log = structlog.get_logger("cls.preprocessing")


class Preprocessor:
    """Chooses and runs the preprocessing path of each image (see the module docstring)."""

    def __init__(self, mode: str, limits: DecodeLimits, executors: Executors, *, gpu_decode: bool,
                 max_batch: int, max_wait_ms: float,
                 batched_device_types: frozenset[str] = frozenset({"cuda"}),
                 max_batch_pixels: int = DECODE_BATCH_PIXELS) -> None:
        self.mode = mode
        self.limits = limits
        self.executors = executors
        self.gpu_decode = gpu_decode
        self.batched_device_types = batched_device_types
        self.max_batch_pixels = max_batch_pixels
        self.decode_batcher = MicroBatcher(executors, max_batch=max_batch, max_wait_ms=max_wait_ms)
        self.fallbacks = 0  # images the batched path handed to the CPU path (not baseline, refused, failed)

    def batched_device(self, model: Any) -> torch.device | None:
        """The device whose batched JPEG decoder serves ``model``'s images, or None (the CPU paths only)."""
        if not self.gpu_decode or self.mode != "tensor" or getattr(model, "tensor_preprocess", None) is None:
            return None
        device = getattr(getattr(model, "model", None), "device", None)
        if not isinstance(device, torch.device) or device.type not in self.batched_device_types:
            return None
        return device

    async def pixels(self, data: bytes, model: Any, request_id: str, priority: str = "bulk") -> torch.Tensor:
        """``data`` preprocessed for ``model`` (on the model's device when decoded there); ImageError per image."""
        # an interactive image is decoded on its own CPU thread, never behind a bulk request's decodes
        on_cpu = self.executors.on_cpu_first if priority == "interactive" else self.executors.on_cpu
        device = self.batched_device(model)
        if device is not None:
            size = await on_cpu(batched_jpeg_size, data, self.limits)
            if size is not None:
                recipe = model.tensor_preprocess
                forward = functools.partial(preprocess_jpegs, recipe=recipe, device=device,
                                            max_batch_pixels=self.max_batch_pixels)
                try:
                    out = await self.decode_batcher.submit((device, recipe), forward, EncodedJpeg(data, size),  # type: ignore[arg-type]
                                                           request_id, priority, stage=JpegBatch.of)
                except Exception as exc:  # noqa: BLE001 - a failed batched decode never fails the image: CPU path
                    log.warning("batched_decode_failed", error=f"{type(exc).__name__}: {exc}"[:500])
                    out = None
                if out is not None:
                    return out
            self.fallbacks += 1
        return await on_cpu(decode_and_preprocess, data, self.limits, model, self.mode)

    async def close(self) -> None:
        await self.decode_batcher.close()


def decode_and_preprocess(data: bytes, limits: DecodeLimits, model: Any, mode: str = "tensor") -> torch.Tensor:
    """The per-image CPU paths: ``tensor`` when the model has a tensor recipe, else its Pillow transform.
    The decode budget is held until the image is preprocessed, and covers what preprocessing allocates."""
    tensor_preprocess = getattr(model, "tensor_preprocess", None) if mode == "tensor" else None
    work_bytes = getattr(model, "preprocess_work_bytes", None)  # per image, e.g. a trained model's own resize
    if tensor_preprocess is not None:
        with decoded_tensor(data, limits, work_bytes) as pixels:
            try:
                return tensor_preprocess(pixels)
            except Exception as exc:
                raise ImageError("decode_failed", f"preprocessing failed: {exc}") from exc
    with decoded(data, limits, model.preprocess_bytes_per_pixel, work_bytes) as image:
        try:
            return model.preprocess(image)
        except Exception as exc:  # e.g. a degenerate 1x0 image surviving decode
            raise ImageError("decode_failed", f"preprocessing failed: {exc}") from exc
