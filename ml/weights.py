"""Safe loading and saving of weight files (state dicts).

Only two formats are read: safetensors (``*.safetensors``) and PyTorch files read with
``torch.load(weights_only=True)``, which refuses pickled code. Nothing here executes a pickle.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["WeightsFileError", "load_state_dict_file", "save_state_dict"]

_WRAPPER_KEYS = ("state_dict", "model_state_dict")


class WeightsFileError(Exception):
    """A weight file is missing, unreadable, unsafe (arbitrary pickle) or not a state dict."""


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a ``weights_only``-safe torch file.

    Tensors are returned on the CPU. A checkpoint wrapping the weights under ``state_dict`` is
    unwrapped, and a ``module.`` prefix (DataParallel/DDP) is stripped. Raises
    :class:`WeightsFileError` for a missing file, a pickle that needs arbitrary code, or contents
    that are not a mapping of names to tensors.
    """
    file = Path(path)
    if not file.is_file():
        raise WeightsFileError(f"weight file not found: {file}")
    if file.suffix == ".safetensors":
        try:
            state: object = load_file(str(file), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsFileError(f"cannot read safetensors file {file}: {exc}") from exc
    else:
        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise WeightsFileError(
                f"refusing to load {file}: it is not loadable with weights_only=True "
                f"(a pickle that needs arbitrary code); convert it to safetensors ({exc})"
            ) from exc
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise WeightsFileError(f"cannot read torch file {file}: {exc}") from exc
    return _as_state_dict(state, file)


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


def _as_state_dict(state: object, file: Path) -> dict[str, torch.Tensor]:
    if isinstance(state, Mapping):
        for key in _WRAPPER_KEYS:
            inner = state.get(key)
            if isinstance(inner, Mapping):
                state = inner
                break
    if not isinstance(state, Mapping) or not state:
        raise WeightsFileError(f"{file} does not hold a state dict (got {type(state).__name__})")
    bad = [name for name, value in state.items() if not isinstance(name, str) or not isinstance(value, torch.Tensor)]
    if bad:
        raise WeightsFileError(f"{file} is not a state dict of tensors; offending entries: {bad[:5]}")
    if all(name.startswith("module.") for name in state):
        return {name[len("module."):]: value for name, value in state.items()}
    return dict(state)
