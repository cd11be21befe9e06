"""Family-neutral image embeddings: the protocol every backbone implements and its shared base.

An :class:`ImageEmbedder` turns preprocessed images into L2-normalised float32 vectors on the CPU.
CLIP and SigLIP (their image towers, ``ml.clip`` / ``ml.siglip``), timm backbones (``ml.timm_backbone``)
and models trained here (``ml.trained``: the pooled pre-logits features) all implement it; zero-shot
classification (``ml.zeroshot``) adds text embeddings and scores on top. ``ml.backbones`` builds any of
them by family. This module imports no family module, so there is no import circle between them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from PIL import Image

from ml.device import DevicePolicy, StagedBatch, policy_for, run_halving_on_oom
from ml.errors import ModelLoadError

__all__ = [
    "RANDOM_WEIGHTS",
    "EmbeddingModel",
    "ImageEmbedder",
    "ModelInfo",
    "ModelLoadError",
    "WeightsSource",
    "embed_images",
    "encode_images_adaptive",
    "warm_up_images",
]

RANDOM_WEIGHTS = "random"


@dataclass(frozen=True)
class ModelInfo:
    """What produced a prediction or an embedding: model family, architecture variant, and weights spec."""

    family: str
    variant: str
    weights: str  # "random" when randomly initialised


@dataclass(frozen=True)
class WeightsSource:
    """A parsed weights spec: ``kind`` is ``random``, ``file``, ``directory`` or ``pretrained``."""

    kind: Literal["random", "file", "directory", "pretrained"]
    value: str

    @classmethod
    def parse(cls, weights: str) -> WeightsSource:
        """Classify a weights spec string (local paths must exist to count as paths)."""
        if not weights or not weights.strip():
            raise ModelLoadError("empty weights spec")
        if weights == RANDOM_WEIGHTS:
            return cls("random", weights)
        path = Path(weights).expanduser()
        if path.is_file():
            return cls("file", str(path))
        if path.is_dir():
            return cls("directory", str(path))
        if weights.startswith(("/", "./", "../", "~")) or weights.endswith((".safetensors", ".pt", ".pth", ".bin")):
            raise ModelLoadError(f"weights path {weights!r} does not exist")
        return cls("pretrained", weights)


@runtime_checkable
class ImageEmbedder(Protocol):
    """A loaded image backbone: preprocess one image, embed a batch."""

    info: ModelInfo
    device: torch.device
    image_size: int
    preprocess_bytes_per_pixel: int  # what preprocess allocates per input pixel (0: it resizes with Pillow first)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An image -> the backbone's reference ``[3, H, W]`` float input tensor, on the CPU."""
        ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` preprocessed images -> L2-normalised ``[B, D]`` float32 embeddings on the CPU."""
        ...


class EmbeddingModel(ABC):
    """Shared implementation of :class:`ImageEmbedder`: device transfer, autocast, normalisation.
    A backbone supplies ``preprocess`` and the raw ``_image_features``."""

    preprocess_bytes_per_pixel = 0
    """Bytes :meth:`preprocess` allocates per pixel of its input (0: it resizes with Pillow first)."""

    def __init__(self, info: ModelInfo, device: torch.device, image_size: int) -> None:
        self.info = info
        self.device = device
        self.image_size = image_size
        self._policy: DevicePolicy | None = None

    @property
    def policy(self) -> DevicePolicy:
        """The device/precision policy of this model (ml.device), decided once from the device and the module."""
        if self._policy is None:
            self._policy = policy_for(self.device, getattr(self, "module", None))
        return self._policy

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor: ...

    @abstractmethod
    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised image features for a batch already on the device."""

    def encode_images(self, pixels: torch.Tensor | StagedBatch) -> torch.Tensor:
        if isinstance(pixels, StagedBatch):
            pixels = pixels.get()
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected a [B, 3, H, W] batch, got shape {tuple(pixels.shape)}")
        with torch.inference_mode():
            batch = self.policy.to_device(pixels)
            with self.policy.autocast():
                features = self._image_features(batch)
            features = F.normalize(features.float().flatten(1), dim=-1)
        return features.cpu()

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Preprocess and embed ``images``: ``[len(images), D]`` normalised float32 on the CPU."""
        return embed_images(self, images)


def embed_images(model: ImageEmbedder, images: Sequence[Image.Image]) -> torch.Tensor:
    """Preprocess and embed ``images`` with any :class:`ImageEmbedder` (one batch)."""
    if not images:
        raise ValueError("no images to embed")
    return encode_images_adaptive(model, torch.stack([model.preprocess(image) for image in images]))


def encode_images_adaptive(model: ImageEmbedder, pixels: torch.Tensor | StagedBatch) -> torch.Tensor:
    """``model.encode_images(pixels)``; on a CUDA out-of-memory error, halve the batch and retry
    each half (recursively, down to single images, where the error is re-raised)."""
    if isinstance(pixels, StagedBatch):
        pixels = pixels.get()
    return run_halving_on_oom(model.encode_images, pixels, model.device)


def warm_up_images(model: ImageEmbedder) -> None:
    """Run one blank image through ``model`` (kernels, allocator)."""
    blank = Image.new("RGB", (model.image_size, model.image_size))
    model.encode_images(model.preprocess(blank).unsqueeze(0))
