"""The one device and precision policy of model code: which device, which autocast dtype, GradScaler or not,
which memory format; and the helpers that apply it (autocast, input transfer, model placement, OOM test).

The decisions are pure functions over a :class:`Capabilities` description (what the machine offers), so
they are tested on any machine; :meth:`Capabilities.probe` reads the real one. Rules:

- device: ``auto`` is the current CUDA device when one exists, else the CPU; ``cuda``/``cuda:N`` must exist;
- precision: fp32 on the CPU; on CUDA autocast to bf16 where the device supports it, else fp16, and
  training with fp16 scales the loss (``GradScaler``); bf16 needs no scaler;
- memory format: ``channels_last`` on CUDA for convolutional networks (more than one Conv2d: a ViT's single
  patch-embedding convolution does not count), contiguous otherwise;
- transfers: on CUDA from pinned host memory, non-blocking; :func:`stage_batch` starts a batch's copy on a side
  stream (the annotation batcher stages batch n+1 from the CPU pool while the model thread runs batch n);
- out of memory at inference on CUDA halves the batch (:func:`run_halving_on_oom`).

Zero-shot (``ml.zeroshot``), custom inference (``ml.trained``) and training (``ml.training.loop``) all take
their :class:`DevicePolicy` from :func:`policy_for`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ml.errors import ModelLoadError

__all__ = [
    "Capabilities",
    "DevicePolicy",
    "autocast_context",
    "autocast_dtype",
    "choose_device",
    "choose_policy",
    "is_conv_net",
    "is_out_of_memory",
    "place_for_inference",
    "policy_for",
    "resolve_device",
    "run_halving_on_oom",
    "stack_rows",
    "stage_batch",
    "StagedBatch",
    "to_device",
]


@dataclass(frozen=True)
class Capabilities:
    """What the machine offers, as far as the policy cares."""

    cuda_devices: int = 0
    current_cuda_index: int = 0
    bf16: bool = False  # the CUDA device computes in bfloat16 (compute capability >= 8.0)

    @classmethod
    def probe(cls) -> Capabilities:
        """The capabilities of this machine (no CUDA initialisation when CUDA is absent)."""
        if not torch.cuda.is_available():
            return cls()
        return cls(cuda_devices=torch.cuda.device_count(), current_cuda_index=torch.cuda.current_device(),
                   bf16=bool(torch.cuda.is_bf16_supported()))


@dataclass(frozen=True)
class DevicePolicy:
    """Where and how a model runs: device, autocast dtype (None: fp32), loss scaling, memory format."""

    device: torch.device
    amp_dtype: torch.dtype | None
    grad_scaler: bool
    channels_last: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def pin_memory(self) -> bool:
        """Host batches for this device are pinned (page-locked) so copies can run asynchronously."""
        return self.cuda

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """Autocast to :attr:`amp_dtype`; a no-op context when it is None (fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, pixels: torch.Tensor, non_blocking: bool = True) -> torch.Tensor:
        """Move an image batch to the device (pinned + non-blocking on CUDA) in the policy's memory format."""
        if not self.cuda:
            return pixels.contiguous()
        if pixels.device.type == "cpu" and not pixels.is_pinned():
            pixels = pixels.pin_memory()
        pixels = pixels.to(self.device, non_blocking=non_blocking)
        if pixels.dim() == 4:
            pixels = pixels.contiguous(memory_format=self.memory_format)
        return pixels


def choose_device(spec: str | torch.device, capabilities: Capabilities) -> torch.device:
    """``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (or a device) -> a device ``capabilities`` has.

    ValueError for a CUDA device that is not present and for device types other than cpu and cuda.
    """
    if isinstance(spec, torch.device):
        device = spec
    elif spec == "auto":
        device = torch.device("cuda" if capabilities.cuda_devices else "cpu")
    else:
        try:
            device = torch.device(spec)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"unknown device {spec!r}") from exc
    if device.type == "cuda":
        if not capabilities.cuda_devices:
            raise ValueError(f"device {str(spec)!r} requested but CUDA is not available")
        index = device.index if device.index is not None else capabilities.current_cuda_index
        if index >= capabilities.cuda_devices:
            raise ValueError(f"device {str(spec)!r} requested but only {capabilities.cuda_devices} CUDA devices exist")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"unsupported device type {device.type!r} (use cpu or cuda)")
    return torch.device("cpu")


def choose_policy(device: torch.device, capabilities: Capabilities, *, conv_net: bool = False) -> DevicePolicy:
    """The precision and memory-format decisions for ``device`` (see the module docstring)."""
    if device.type != "cuda":
        return DevicePolicy(device=device, amp_dtype=None, grad_scaler=False, channels_last=False)
    dtype = torch.bfloat16 if capabilities.bf16 else torch.float16
    return DevicePolicy(device=device, amp_dtype=dtype, grad_scaler=dtype == torch.float16, channels_last=conv_net)


def is_conv_net(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a convolutional network: more than one 2-D convolution (a ViT has one, its patch
    embedding, which gains nothing from channels_last)."""
    count = 0
    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv2d):
            count += 1
            if count > 1:
                return True
    return False


def policy_for(spec: str | torch.device = "auto", module: torch.nn.Module | None = None,
               capabilities: Capabilities | None = None) -> DevicePolicy:
    """The policy for running ``module`` on the device ``spec`` names, on this machine (ValueError: no such device)."""
    capabilities = capabilities or Capabilities.probe()
    device = choose_device(spec, capabilities)
    return choose_policy(device, capabilities, conv_net=module is not None and is_conv_net(module))


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """:func:`choose_device` on this machine's capabilities (ValueError when the device is not usable)."""
    return choose_device(spec, Capabilities.probe())


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype on ``device`` (the policy's): bf16 where supported, else fp16; None (fp32) on the CPU."""
    return choose_policy(device, Capabilities.probe() if device.type == "cuda" else Capabilities()).amp_dtype


def autocast_context(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Autocast to :func:`autocast_dtype` on CUDA; a no-op context on the CPU (full fp32 there)."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(pixels: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """Move an image batch to ``device``: on CUDA via pinned memory, non-blocking (channels_last when asked)."""
    policy = DevicePolicy(device=device, amp_dtype=None, grad_scaler=False,
                          channels_last=channels_last and device.type == "cuda")
    return policy.to_device(pixels)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error: CUDA's, or the CPU allocator's ``RuntimeError``."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    message = str(exc)
    return "out of memory" in message.lower() or "DefaultCPUAllocator: can't allocate" in message


def place_for_inference(module: torch.nn.Module, target: torch.device | DevicePolicy, what: str) -> DevicePolicy:
    """Eval mode, no gradients, on the policy's device and memory format (a device: :func:`policy_for` it and
    ``module``); returns the policy. ModelLoadError if the module cannot move."""
    policy = target if isinstance(target, DevicePolicy) else policy_for(target, module)
    module.eval().requires_grad_(False)
    try:
        module.to(device=policy.device)
        if policy.channels_last:
            module.to(memory_format=torch.channels_last)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
        raise ModelLoadError(f"cannot move {what} to {policy.device}: {exc}") from exc
    return policy


@dataclass
class StagedBatch:
    """A batch on its way to the device: on CUDA its host-to-device copy runs on a side stream (from pinned
    memory) and :meth:`get` makes the computing stream wait for it; on the CPU it is the stacked batch itself."""

    tensor: torch.Tensor
    event: torch.cuda.Event | None = None
    host: torch.Tensor | None = None  # the pinned source, alive until the copy is done

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    def get(self) -> torch.Tensor:
        """The batch, ready for kernels on the current stream."""
        if self.event is not None:
            stream = torch.cuda.current_stream(self.tensor.device)
            stream.wait_event(self.event)
            self.tensor.record_stream(stream)  # the caching allocator must not reuse it while the forward reads it
            self.event, self.host = None, None
        return self.tensor


_copy_streams: dict[int, torch.cuda.Stream] = {}


def stack_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(rows)``; when some rows are already on a CUDA device (decoded and preprocessed there) and
    others on the CPU (the per-image fallback path), the CPU rows are copied to that device first."""
    devices = {row.device for row in rows}
    if len(devices) > 1:
        target = next(device for device in devices if device.type != "cpu")
        rows = [row.to(target) for row in rows]
    return torch.stack(rows)


def stage_batch(rows: list[torch.Tensor] | torch.Tensor, device: torch.device) -> StagedBatch:
    """Stack ``rows`` and, on CUDA, start their copy to ``device`` from pinned memory on a side stream, so the
    copy of the next batch overlaps the forward of this one (rows already on the device, decoded there, are just
    stacked). Any thread may call it (not only the model's)."""
    batch = rows if isinstance(rows, torch.Tensor) else stack_rows(rows)
    if device.type != "cuda" or batch.device.type != "cpu":
        return StagedBatch(batch.contiguous())
    host = batch.pin_memory()
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _copy_streams.get(index)
    if stream is None:
        stream = _copy_streams.setdefault(index, torch.cuda.Stream(device=index))
    with torch.cuda.stream(stream):
        tensor = host.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    return StagedBatch(tensor, event, host)


def run_halving_on_oom(fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor,
                       device: torch.device) -> torch.Tensor:
    """``fn(batch)``; on CUDA, an out-of-memory error halves the batch and runs each half (recursively, down to
    one image, where the error is re-raised); results are concatenated in order. On the CPU: just ``fn(batch)``."""
    if device.type != "cuda":
        return fn(batch)
    try:
        return fn(batch)
    except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
        if not is_out_of_memory(exc) or batch.shape[0] <= 1:
            raise
    # Retry outside the except block so the failed attempt's frames (and tensors) are freed first.
    torch.cuda.empty_cache()
    half = (batch.shape[0] + 1) // 2
    return torch.cat([run_halving_on_oom(fn, batch[:half], device), run_halving_on_oom(fn, batch[half:], device)])
