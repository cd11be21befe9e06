"""Safe loading and saving of weight files (state dicts): the one checkpoint reader of the project.

Only two formats are read: safetensors (by suffix, or by its header) and PyTorch files read with
``torch.load(weights_only=True)``, which refuses pickled code. Nothing here executes a pickle. Serving
(``ml.clip``, ``ml.siglip``, ``ml.timm_backbone``) and fine-tuning (``ml.training.models``) both read
checkpoints through :func:`load_state_dict_file`, so a checkpoint that fine-tunes also embeds.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ml.errors import WeightsFileError

__all__ = ["WeightsFileError", "load_state_dict_file", "save_state_dict", "unwrap_state_dict"]

WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model_state_dict", "model", "module")
"""Keys a training checkpoint keeps its weights under, in order of preference (EMA weights first, as timm)."""
PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes stripped from every name: DataParallel/DDP (``module.``) and ``torch.compile`` (``_orig_mod.``)."""
_MAX_WRAPPING = 3


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors file or a ``weights_only``-safe torch file.

    Tensors are returned on the CPU, unwrapped by :func:`unwrap_state_dict`. Raises
    :class:`WeightsFileError` for a missing file, a pickle that needs arbitrary code, or contents
    that are not a mapping of names to tensors.
    """
    file = Path(path)
    if not file.is_file():
        raise WeightsFileError(f"weight file not found: {file}")
    if _is_safetensors(file):
        try:
            state: object = load_file(str(file), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsFileError(f"cannot read safetensors file {file}: {exc}") from exc
    else:
        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise WeightsFileError(
                f"refused weights file {file}: it is not loadable with weights_only=True "
                f"(a pickle that needs arbitrary code); convert it to safetensors ({_first_line(exc)})"
            ) from exc
        except (RuntimeError, OSError, EOFError, ValueError, AttributeError, TypeError) as exc:
            raise WeightsFileError(f"cannot read torch file {file}: {type(exc).__name__}: {_first_line(exc)}") from exc
    return unwrap_state_dict(state, str(file))


def unwrap_state_dict(state: object, origin: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: the first of ``WRAPPER_KEYS`` that holds a mapping is descended into (up to
    three levels, while the mapping is not all tensors), then ``PREFIXES`` are stripped from every name.
    WeightsFileError unless the result is a non-empty mapping of names to tensors."""
    for _ in range(_MAX_WRAPPING):
        if not isinstance(state, Mapping) or _all_tensors(state):
            break
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping) or not state:
        raise WeightsFileError(f"{origin} does not hold a state dict (got {type(state).__name__})")
    bad = [name for name, value in state.items() if not isinstance(name, str) or not isinstance(value, torch.Tensor)]
    if bad:
        raise WeightsFileError(f"{origin} is not a state dict of tensors; offending entries: {[str(b)[:100] for b in bad[:5]]}")
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix):], True
        tensors[name] = value
    return tensors


def save_state_dict(
    model_or_state: torch.nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike[str]
) -> Path:
    """Write a module's state dict (or a state dict) to a safetensors file; return its path.

    Tensors are copied to the CPU; tensors that share storage are cloned, since safetensors
    refuses shared storage.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        storage_key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if storage_key in seen or not tensor.is_contiguous():
            tensor = tensor.clone().contiguous()
        seen.add((tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()))
        tensors[name] = tensor
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target))
    return target


def _is_safetensors(file: Path) -> bool:
    """By suffix, or by the header: an 8-byte little-endian length, then the JSON header's ``{``."""
    if file.suffix == ".safetensors":
        return True
    with file.open("rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _all_tensors(mapping: Mapping[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items())


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""
