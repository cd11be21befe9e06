"""Loaded models, one handle per family: what classify and embed call on a model (preprocess, forward,
embed, confidences) whatever the family is: CLIP/SigLIP (zero-shot), trained packages (custom), timm
backbones (embed only)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from PIL import Image

from handlers.errors import PermanentError
from handlers.executor import Executors
from handlers.model_config import ModelKey
from handlers.text_pass import TextPasses
from ml.device import StagedBatch, stage_batch
from ml.preprocess import tensor_preprocess_for
from schemas.annotation import ModelDescriptor

class EmbeddingHandle(Protocol):
    """What the embed task needs of a loaded model: preprocess, and a normalised embedding per image."""

    key: ModelKey
    descriptor: ModelDescriptor
    preprocess_bytes_per_pixel: int
    dim: int  # the embedding's dimension (probed once at load)
    embed_lane: Any  # the batcher lane of ``embed`` (the classify lane when ``embed`` is ``forward``)
    forward_is_embedding: bool  # classify's forward output is the embedding (cacheable by content hash)
    tensor_preprocess: Any  # ml.preprocess.TensorPreprocess, or None: this model has only the Pillow path

    def preprocess(self, image: Image.Image) -> torch.Tensor: ...
    def embed(self, pixels: torch.Tensor) -> torch.Tensor: ...

class LoadedModel(EmbeddingHandle, Protocol):
    def stage(self, rows: list[torch.Tensor]) -> Any: ...  # ml.device.StagedBatch: stacked, copy to the device begun
    def forward(self, pixels: torch.Tensor) -> torch.Tensor: ...
    def class_names(self, requested: Sequence[str] | None) -> list[str]: ...
    async def prepare(self, classes: Sequence[str], templates: Sequence[str], executors: Executors) -> tuple[Any, bool]: ...
    def confidences(self, outputs: torch.Tensor, prepared: Any) -> torch.Tensor: ...

class ZeroShotHandle:
    """CLIP / SigLIP: forward = image embeddings; confidences against the (cached) text embeddings."""

    def __init__(self, key: ModelKey, model: Any, text: TextPasses | None = None) -> None:
        from ml.embedding import encode_images_adaptive

        self.key = key
        self.model = model
        self.text = text  # the worker's text passes (caches, single flight, background ensembles); None: image side only
        self._encode = encode_images_adaptive
        self.preprocess_bytes_per_pixel = int(getattr(model, "preprocess_bytes_per_pixel", 0))
        self.tensor_preprocess = tensor_preprocess_for(model)
        self.descriptor = ModelDescriptor(family=key.family, variant=model.info.variant, weights=model.info.weights)
        self.dim = probe_dim(self)
        self.embed_lane = key
        self.forward_is_embedding = True

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.model.preprocess(image)

    def stage(self, rows: list[torch.Tensor]) -> StagedBatch:
        return stage_batch(rows, self.model.device)

    def forward(self, pixels: torch.Tensor | StagedBatch) -> torch.Tensor:
        return self._encode(self.model, pixels)

    embed = forward

    def class_names(self, requested: Sequence[str] | None) -> list[str]:
        if not requested:
            raise PermanentError("invalid_request", f"classes are required for model {self.key.family!r}")
        return list(requested)

    async def prepare(self, classes: Sequence[str], templates: Sequence[str],
                      executors: Executors) -> tuple[torch.Tensor, bool]:
        """Text embeddings of exactly ``templates`` (``handlers.text_pass``); the bool says whether a cache had them."""
        from ml.zeroshot import check_prompt_inputs

        classes, templates = list(classes), list(templates)
        check_prompt_inputs(classes, templates)
        return await self._text().full(self.model, classes, templates)

    async def prepare_interactive(self, classes: Sequence[str], templates: Sequence[str],
                                  quick: Sequence[str]) -> tuple[torch.Tensor, bool, bool]:
        """For a person waiting: the full ensemble when it is ready, else ``quick``'s embeddings (third value
        True); then the caller calls :meth:`start_background`."""
        from ml.zeroshot import check_prompt_inputs

        classes, templates, quick = list(classes), list(templates), list(quick)
        check_prompt_inputs(classes, templates)
        check_prompt_inputs(classes, quick)
        return await self._text().interactive(self.model, classes, templates, quick)

    def start_background(self, classes: Sequence[str], templates: Sequence[str]) -> bool:
        """Compute the full ensemble for ``classes`` in the background (bounded, deduplicated)."""
        return self._text().start_background(self.model, list(classes), list(templates))

    def _text(self) -> TextPasses:
        if self.text is None:
            raise RuntimeError("this handle was built without text passes (ModelRegistry builds them with)")
        return self.text

    def confidences(self, outputs: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        return self.model.scores(outputs, prepared)

    @property
    def multi_label_extra_classes(self) -> tuple[str, ...]:
        """Text rows a multi-label request adds after its classes (CLIP: the class-neutral prompt)."""
        return tuple(getattr(self.model, "multi_label_extra_classes", ()))

    def multi_label_confidences(self, outputs: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        """Independent per-class probabilities (SigLIP: its sigmoid; CLIP: class prompt vs neutral prompt)."""
        return self.model.multi_label_scores(outputs, prepared)

class CustomHandle:
    """A model trained here: forward = softmax over all its classes; a requested subset renormalises."""

    def __init__(self, key: ModelKey, model: Any) -> None:
        self.key = key
        self.model = model
        self.descriptor = ModelDescriptor(family="custom", variant=model.info_variant, weights=key.weights)
        self.preprocess_bytes_per_pixel = 0  # timm's eval transform resizes with Pillow first ...
        self.preprocess_work_bytes = model.preprocess_work_bytes  # ... to the package's size: reserved per image
        self.embed_lane = ("embed", key)  # another output than forward: never in one batch with classify images
        self.forward_is_embedding = False
        self.dim = probe_dim(self)
        self.tensor_preprocess = tensor_preprocess_for(model)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.model.preprocess(image)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pooled pre-logits features of the trained model."""
        return self.model.embed(pixels)

    def stage(self, rows: list[torch.Tensor]) -> StagedBatch:
        return stage_batch(rows, self.model.device)

    @property
    def multi_label(self) -> bool:
        return bool(getattr(self.model, "multi_label", False))

    def forward(self, pixels: torch.Tensor | StagedBatch) -> torch.Tensor:
        # multi-label: calibrated per-class logits (their sigmoid is each tag's probability); else log-probabilities
        # over all classes: a subset renormalises them without underflow (calibrated confidences of a low
        # temperature are tiny for the unlikely classes)
        if self.multi_label:
            return self.model.calibrated_logits(pixels)
        return self.model.log_probabilities(pixels)

    def class_names(self, requested: Sequence[str] | None) -> list[str]:
        names = list(self.model.class_names)
        if not requested:
            return names
        unknown = [c for c in requested if c not in names]
        if unknown:
            raise PermanentError(
                "invalid_request",
                f"classes {unknown[:10]} are not classes of the model at {self.key.weights}; its classes are {names[:50]}",
            )
        return list(requested)

    async def prepare(self, classes: Sequence[str], templates: Sequence[str],
                      executors: Executors) -> tuple[list[int], bool]:
        names = list(self.model.class_names)
        return [names.index(c) for c in classes], False

    def auto_accept(self, outputs: torch.Tensor, precision: float) -> list[tuple[str, bool]]:
        """Per row of full-class (calibrated) log-probabilities: (top-1 class, accepted at ``precision``)."""
        names = self.model.class_names
        tops = [names[i] for i in outputs.argmax(dim=1).tolist()]
        return list(zip(tops, self.model.auto_accept(outputs.exp(), precision), strict=True))

    def confidences(self, outputs: torch.Tensor, prepared: list[int]) -> torch.Tensor:
        if self.multi_label:  # independent per class: a subset selects
            return outputs[:, prepared].sigmoid()
        # softmax over a subset of the logits == the full softmax renormalised over that subset
        return outputs[:, prepared].softmax(dim=1)

    def tag_thresholds(self, prepared: list[int]) -> torch.Tensor | None:
        """Multi-label: the package's per-class thresholds for the prepared classes; None for single-label."""
        return self.model.thresholds[prepared] if self.multi_label else None

    def tag_auto_accept_thresholds(self, prepared: list[int], precision: float) -> torch.Tensor:
        """Multi-label: per prepared class, the probability at which its tag is auto-accepted (``inf``: never)."""
        return self.model.tag_auto_accept_thresholds(precision)[prepared]

class TimmHandle:
    """A timm backbone (embed only): its pooled pre-logits features, normalised."""

    def __init__(self, key: ModelKey, model: Any, weights_label: str) -> None:
        from ml.embedding import encode_images_adaptive

        self.key = key
        self.model = model
        self._encode = encode_images_adaptive
        self.preprocess_bytes_per_pixel = 0  # timm's eval transform resizes with Pillow first
        self.tensor_preprocess = tensor_preprocess_for(model)
        self.descriptor = ModelDescriptor(family="timm", variant=key.variant, weights=weights_label)
        self.embed_lane = key
        self.forward_is_embedding = True
        self.dim = probe_dim(self)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.model.preprocess(image)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._encode(self.model, pixels)

    forward = embed

    def class_names(self, requested: Sequence[str] | None) -> list[str]:
        raise PermanentError("invalid_request", "model 'timm' embeds images only (task 'embed'); it cannot classify")

    async def prepare(self, classes: Sequence[str], templates: Sequence[str], executors: Executors) -> tuple[Any, bool]:
        raise PermanentError("invalid_request", "model 'timm' embeds images only")

    def confidences(self, outputs: torch.Tensor, prepared: Any) -> torch.Tensor:
        raise PermanentError("invalid_request", "model 'timm' embeds images only")

def probe_dim(handle: Any) -> int:
    """The embedding dimension of a handle: one blank image through ``embed`` (the model's thread, at load)."""
    size = int(getattr(handle.model, "image_size", 32) or 32)
    blank = Image.new("RGB", (size, size))
    return int(handle.embed(handle.preprocess(blank).unsqueeze(0)).shape[-1])
