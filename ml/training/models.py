"""timm model creation: name checks, input-size kwargs, pretrained weights from a local file with the head reset."""

from __future__ import annotations

import difflib
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ml.errors import WeightsFileError
from ml.training.errors import ConfigError, PretrainedWeightsError, UnknownModelError
from ml.weights import load_state_dict_file

log = logging.getLogger(__name__)


def check_model_name(name: str) -> None:
    """Raise UnknownModelError unless timm knows ``name`` (an architecture, optionally with a ``.tag``).

    Checked against timm's registry only: nothing is created or downloaded. Hub-prefixed names
    (``hf-hub:...``) are refused: they need the network; use the architecture name plus a weights file.
    """
    if not isinstance(name, str) or not name.strip():
        raise UnknownModelError("model_name must be a non-empty timm model name")
    if ":" in name:
        raise UnknownModelError(
            f"model_name {name!r}: hub-prefixed names are not supported; use a timm architecture name "
            "(e.g. convnext_tiny) and give weights with pretrained_url"
        )
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UnknownModelError(f"unknown timm model {name!r}{hint}")


def model_kwargs_for(model_name: str, image_size: int | None) -> dict[str, Any]:
    """Extra create_model kwargs so the architecture accepts ``image_size``.

    Models whose pretrained config says ``fixed_input_size`` (ViT, Swin, ...) are built with
    ``img_size=image_size`` when it differs from their default; convolutional models take any size as is.
    """
    cfg = timm.models.get_pretrained_cfg(model_name)
    if image_size is None or cfg is None:
        return {}
    default_size = cfg.input_size[-1] if cfg.input_size else None
    if getattr(cfg, "fixed_input_size", False) and image_size != default_size:
        return {"img_size": image_size}
    return {}


def create_model(model_name: str, num_classes: int, model_kwargs: Mapping[str, Any], pretrained: bool = False) -> nn.Module:
    """timm.create_model with errors mapped to this package's types."""
    check_model_name(model_name)
    try:
        return timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **dict(model_kwargs))
    except TypeError as exc:
        if model_kwargs:
            raise ConfigError(
                f"model {model_name!r} has a fixed input size and cannot be built with {dict(model_kwargs)}: {exc}"
            ) from exc
        raise


def build_model(
    model_name: str,
    num_classes: int,
    image_size: int | None,
    pretrained: bool,
    pretrained_path: str | None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Create the classifier with ``num_classes`` outputs; return it and the kwargs that rebuild it.

    Weights when ``pretrained``: from ``pretrained_path`` when given (head reset), else timm's own pretrained
    weights (hub cache or download). Without ``pretrained``: random initialisation (a path is ignored).
    """
    kwargs = model_kwargs_for(model_name, image_size)
    if pretrained and pretrained_path:
        model = create_model(model_name, num_classes, kwargs, pretrained=False)
        load_backbone_weights(model, model_name, read_state_dict(pretrained_path))
    elif pretrained:
        try:
            model = create_model(model_name, num_classes, kwargs, pretrained=True)
        except (ConfigError, UnknownModelError):
            raise
        except Exception as exc:  # timm raises RuntimeError/OSError/HTTP errors from the hub
            raise PretrainedWeightsError(
                f"pretrained weights for {model_name!r} are not available (hub cache or download): {exc}; "
                "give pretrained_url, or set pretrained=false"
            ) from exc
    else:
        if pretrained_path:
            log.warning("pretrained=False: ignoring pretrained weights file %s", pretrained_path)
        model = create_model(model_name, num_classes, kwargs, pretrained=False)
    return model, kwargs


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """``ml.weights.load_state_dict_file`` (the one checkpoint reader and unwrap rule), its error as a
    PretrainedWeightsError: a fine-tuning request's pretrained weights are unusable."""
    try:
        return load_state_dict_file(path)
    except WeightsFileError as exc:
        raise PretrainedWeightsError(f"pretrained weights: {exc}") from exc


def load_backbone_weights(model: nn.Module, model_name: str, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load ``state_dict`` into ``model`` except its classifier head, which keeps its fresh initialisation.

    The architecture's own timm ``checkpoint_filter_fn`` runs first (e.g. ViT position-embedding resampling
    for another image size). Every non-head parameter must be present and fit, else PretrainedWeightsError.
    """
    state = dict(state_dict)
    filter_fn = _checkpoint_filter_fn(model_name)
    if filter_fn is not None:
        try:
            try:
                state = filter_fn(state, model)
            except TypeError:
                state = filter_fn(state)
        except Exception as exc:
            raise PretrainedWeightsError(f"weights do not fit {model_name!r}: {exc}") from exc
    heads = head_names(model)
    state = {k: v for k, v in state.items() if not _is_head_key(k, heads)}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise PretrainedWeightsError(f"weights do not fit {model_name!r}: {_first_lines(str(exc), 4)}") from exc
    missing = [k for k in result.missing_keys if not _is_head_key(k, heads)]
    if missing or result.unexpected_keys:
        raise PretrainedWeightsError(
            f"weights do not fit {model_name!r}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(result.unexpected_keys)} unexpected keys {list(result.unexpected_keys)[:5]}"
        )


def head_names(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier head(s), from the model's pretrained config (e.g. ``fc``, ``head.fc``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if not classifier:
        return ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _is_head_key(key: str, heads: tuple[str, ...]) -> bool:
    return any(key == head or key.startswith(head + ".") for head in heads)


def _checkpoint_filter_fn(model_name: str):
    try:
        module_name = timm.models.model_entrypoint(model_name).__module__
    except Exception:
        return None
    return getattr(sys.modules.get(module_name), "checkpoint_filter_fn", None)


def _first_lines(text: str, n: int) -> str:
    return " ".join(text.splitlines()[:n])
