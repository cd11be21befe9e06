"""timm backbones as image embedders: any timm model name, its pooled pre-logits features.

The embedding of an image is ``forward_head(forward_features(x), pre_logits=True)``, L2-normalised;
preprocessing is the model's own evaluation transform from its ``pretrained_cfg``
(``timm.data.resolve_data_config`` + ``create_transform``). Weights:

- ``"random"``: the architecture with random initialisation under ``torch.manual_seed(seed)`` (tests);
- ``"pretrained"``: ``timm.create_model(name, pretrained=True)`` through the hub cache;
- a local ``.safetensors`` file (or another ``weights_only``-safe state dict): loaded into the
  architecture; a state dict without the classifier (a ``num_classes=0`` export) is accepted too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image

from ml.device import place_for_inference
from ml.embedding import EmbeddingModel, ModelInfo, WeightsSource
from ml.errors import ModelLoadError, WeightsFileError
from ml.weights import load_state_dict_file

__all__ = ["TimmEmbedder", "load_timm_embedder", "pre_logits_features"]


def pre_logits_features(module: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """A timm model's pooled pre-logits features (unnormalised)."""
    return module.forward_head(module.forward_features(pixels), pre_logits=True)  # type: ignore[operator]


class TimmEmbedder(EmbeddingModel):
    """A timm model as an :class:`~ml.embedding.ImageEmbedder` (pooled pre-logits features)."""

    def __init__(self, module: torch.nn.Module, info: ModelInfo, device: torch.device) -> None:
        from timm.data import create_transform, resolve_data_config

        self.module = module
        self.data_config: dict[str, Any] = resolve_data_config({}, model=module)
        self._transform = create_transform(**self.data_config, is_training=False)
        super().__init__(info, device, int(self.data_config["input_size"][-1]))

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self._transform(image)

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return pre_logits_features(self.module, pixels)


def load_timm_embedder(name: str, source: WeightsSource, *, device: torch.device, seed: int = 0) -> TimmEmbedder:
    """Build timm model ``name`` with ``source`` weights on ``device`` (eval mode). Raises ModelLoadError."""
    import timm

    if not timm.is_model(name):
        raise ModelLoadError(f"unknown timm model {name!r}")
    if source.kind == "directory":
        raise ModelLoadError("timm weights must be a state-dict file (.safetensors), not a directory")
    try:
        if source.kind == "pretrained":
            if source.value != "pretrained":
                raise ModelLoadError(f"timm weights must be 'pretrained', 'random' or a file, not {source.value!r}")
            module = timm.create_model(name, pretrained=True)
        else:
            with _seeded(seed):
                module = timm.create_model(name, pretrained=False)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot build timm {name} with weights {source.value!r}: {type(exc).__name__}: {exc}") from exc
    if source.kind == "file":
        try:
            state = load_state_dict_file(source.value)
        except WeightsFileError as exc:
            raise ModelLoadError(str(exc)) from exc
        _load_state(module, state, name, source.value)
    place_for_inference(module, device, f"timm {name}")
    return TimmEmbedder(module, ModelInfo(family="timm", variant=name, weights=source.value), device)


def _load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], name: str, origin: str) -> None:
    classifier = str(getattr(module, "pretrained_cfg", {}).get("classifier") or "")
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ModelLoadError(f"weights in {origin} do not fit timm {name}: {str(exc)[:500]}") from exc
    missing = [k for k in result.missing_keys if not (classifier and k.startswith(classifier + "."))]
    if missing or result.unexpected_keys:
        raise ModelLoadError(
            f"weights in {origin} do not fit timm {name}: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)})")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
