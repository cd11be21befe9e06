"""How much host memory a training configuration needs, and how much this machine gives it.

The estimate, per configuration (float32 pixels, 4 bytes each)::

    input  = batch_size x 3 x image_size^2 x 4
    needed = input x (ACTIVATION_FACTOR + batches held by the data loader)

``ACTIVATION_FACTOR`` (32) stands for the forward activations and their gradients kept for the backward
pass: for the usual timm classifiers at their own input size they are tens of times the input batch.
The data loader holds ``2`` batches without workers (the one in use and the one being collated), and
``num_workers x prefetch_factor`` more with workers. It is a coarse upper-bound style guard against
absurd requests (``batch_size`` 4096 at 1024 px, no loader workers, is ~1.6 TiB by this estimate), not a precise model: an
accepted configuration that still runs out of memory is handled by halving the micro-batch.

The model's own memory is counted too, from its parameters, before the model is built for real
(:func:`count_parameters` builds it on PyTorch's ``meta`` device: shapes only, no storage)::

    model = parameters x MODEL_BYTES_PER_PARAMETER

``MODEL_BYTES_PER_PARAMETER`` (24): fp32 weights (4), their gradients (4), AdamW's two moments (8), the best
epoch's copy of the weights (4) and a pretrained state dict read before it is loaded (4).
"""

from __future__ import annotations

import os
from pathlib import Path

ACTIVATION_FACTOR = 32
BYTES_PER_VALUE = 4
PREFETCH_FACTOR = 4
MODEL_BYTES_PER_PARAMETER = 24
DEFAULT_BUDGET_FRACTION = 0.5


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; the machine's count where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def estimate_batch_bytes(batch_size: int, image_size: int, num_workers: int = 0) -> int:
    """Estimated host bytes one training batch needs (see the module docstring)."""
    input_bytes = batch_size * 3 * image_size * image_size * BYTES_PER_VALUE
    held = 2 + num_workers * PREFETCH_FACTOR
    return input_bytes * (ACTIVATION_FACTOR + held)


def available_memory_bytes() -> int:
    """Memory available to this process now: MemAvailable, lowered to the cgroup limit's headroom if any."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError):
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        limit_text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used_text = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit_text != "max":
            available = min(available, max(0, int(limit_text) - int(used_text)))
    except (OSError, ValueError):
        pass
    return available


def default_memory_budget_bytes() -> int:
    """The default training budget: half the memory available when the worker starts."""
    return int(available_memory_bytes() * DEFAULT_BUDGET_FRACTION)


def default_image_size(model_name: str) -> int:
    """The input size timm's pretrained config gives ``model_name`` (224 when it says nothing)."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(model_name) or timm.models.get_pretrained_cfg(model_name.split(".", 1)[0])
    except Exception:  # unknown names: the model-name check reports them
        cfg = None
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    return int(size[-1]) if size else 224


def count_parameters(model_name: str, num_classes: int, model_kwargs: dict | None = None) -> int:
    """Parameters of ``model_name`` with a ``num_classes`` head, counted on the ``meta`` device (no memory is
    allocated for them; a few seconds for the largest timm models). Raises what timm raises for a bad name."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **(model_kwargs or {}))
    return sum(parameter.numel() for parameter in model.parameters())


def estimate_model_bytes(parameters: int) -> int:
    """Host bytes a model of ``parameters`` needs while it trains (see the module docstring)."""
    return parameters * MODEL_BYTES_PER_PARAMETER
