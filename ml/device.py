"""Device selection and the inference context (autocast, input transfer) for model code."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_context", "autocast_dtype", "is_out_of_memory", "resolve_device", "to_device"]


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (or a device) into a usable device.

    ``"auto"`` picks CUDA when available, else the CPU. Raises ``ValueError`` for a CUDA device
    that is not present and for unsupported device types.
    """
    if isinstance(spec, torch.device):
        device = spec
    elif spec == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(spec)
        except RuntimeError as exc:
            raise ValueError(f"unknown device {spec!r}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA devices exist")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"unsupported device type {device.type!r} (use cpu or cuda)")
    return device


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype used for inference on ``device``: bf16 where supported, else fp16; none on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast_context(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Autocast to :func:`autocast_dtype` on CUDA; a no-op context on the CPU (full fp32 there)."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move an image batch to ``device``: on CUDA via pinned memory, non-blocking, channels_last."""
    if device.type != "cuda":
        return pixels.contiguous()
    if not pixels.is_pinned():
        pixels = pixels.pin_memory()
    pixels = pixels.to(device, non_blocking=True)
    if pixels.dim() == 4:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    return pixels


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error: CUDA's, or the CPU allocator's ``RuntimeError``."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    message = str(exc)
    return "out of memory" in message.lower() or "DefaultCPUAllocator: can't allocate" in message


def place_for_inference(module: torch.nn.Module, device: torch.device, what: str) -> torch.nn.Module:
    """Eval mode, no gradients, on ``device`` (channels_last on CUDA); ModelLoadError if it cannot move."""
    from ml.zeroshot import ModelLoadError

    module.eval().requires_grad_(False)
    try:
        module.to(device=device)
        if device.type == "cuda":
            module.to(memory_format=torch.channels_last)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
        raise ModelLoadError(f"cannot move {what} to {device}: {exc}") from exc
    return module
