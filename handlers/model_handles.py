"""Loaded models, one handle per family: what classify and embed call on a model (preprocess, forward,
embed, confidences) whatever the family is: CLIP/SigLIP (zero-shot), trained packages (custom), timm
backbones (embed only)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from PIL import Image

from handlers.errors import PermanentError
from handlers.executor import Executors
from handlers.model_config import ModelKey
from ml.device import StagedBatch, stage_batch
from ml.preprocess import tensor_preprocess_for
from ml.text_cache import text_cache_key
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

    def __init__(self, key: ModelKey, model: Any) -> None:
        from ml.embedding import encode_images_adaptive

        self.key = key
        self.model = model
        self._encode = encode_images_adaptive
        self._text_pending: dict[Any, asyncio.Future[torch.Tensor]] = {}  # identical requests share one pass
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
        """Text embeddings for this request; the bool says whether the cache had them.

        The cache is looked up first; on a miss, prompts are rendered and tokenised chunk by chunk on the
        CPU pool (the next chunk while the model encodes this one), and only the forwards run on the GPU
        thread, so no request builds all its prompts at once.
        """
        from ml.zeroshot import check_prompt_inputs

        model = self.model
        classes, templates = list(classes), list(templates)
        check_prompt_inputs(classes, templates)
        key = text_cache_key(model.info, classes, templates)
        pending = self._text_pending.get(key)
        if pending is not None:  # an identical request is computing them: share its result
            text = await asyncio.shield(pending)
            cached = model.text_cache.get(key)  # counted as the hit it is (None if too large to cache)
            return (text if cached is None else cached), True
        cached = model.text_cache.get(key)
        if cached is not None:
            return cached, True
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self._text_pending[key] = future
        try:
            text = await self._compute_text(classes, templates, executors)
            model.text_cache.put(key, text)
            future.set_result(text)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._text_pending[key]
        return text, False

    async def _compute_text(self, classes: list[str], templates: list[str], executors: Executors) -> torch.Tensor:
        model = self.model
        chunks = model.text_chunks(classes, templates)
        sums = None
        next_tokens = asyncio.ensure_future(executors.on_cpu(model.tokenize_prompts, classes, templates, *chunks[0]))
        try:
            for i, (start, _) in enumerate(chunks):
                tokens = await next_tokens
                if i + 1 < len(chunks):  # tokenise the next chunk while the model encodes this one
                    next_tokens = asyncio.ensure_future(
                        executors.on_cpu(model.tokenize_prompts, classes, templates, *chunks[i + 1]))
                sums = await executors.on_gpu(model.add_text_features, sums, tokens, start, len(classes),
                                              len(templates))
        finally:
            next_tokens.cancel()
        return await executors.on_gpu(model.finish_text_embeddings, sums, len(templates))

    def confidences(self, outputs: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        return self.model.scores(outputs, prepared)

class CustomHandle:
    """A model trained here: forward = softmax over all its classes; a requested subset renormalises."""

    def __init__(self, key: ModelKey, model: Any) -> None:
        self.key = key
        self.model = model
        self.descriptor = ModelDescriptor(family="custom", variant=model.info_variant, weights=key.weights)
        self.preprocess_bytes_per_pixel = 0  # timm's eval transform resizes with Pillow first
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

    def forward(self, pixels: torch.Tensor | StagedBatch) -> torch.Tensor:
        # log-probabilities over all classes: a subset renormalises them without underflow (calibrated
        # confidences of a low temperature are tiny for the unlikely classes)
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
        # softmax over a subset of the logits == the full softmax renormalised over that subset
        return outputs[:, prepared].softmax(dim=1)

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
