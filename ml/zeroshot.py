"""Zero-shot image classification models: the protocol, the text side, and shared scoring.

The image side is family-neutral (``ml.embedding``); ``ml.backbones.load_zero_shot_model`` builds a model.

A model embeds images and class prompts into one space; class confidences come from the cosine
similarity of the two. CLIP confidences are a softmax over the given classes; SigLIP confidences
are independent sigmoids per class.

Weights specs accepted by ``ml.backbones.load_zero_shot_model``:

- ``"random"``: random initialisation of the variant's architecture, seeded, fully offline;
- a path to a local file (``.safetensors``, or a ``weights_only``-safe torch file) holding a
  state dict for the variant's architecture, or a local directory (see the family modules);
- anything else: a pretrained tag (CLIP, e.g. ``"openai"``) or hub id (SigLIP, ``"pretrained"``
  meaning the variant's own hub id), loaded through the library's usual hub cache.
"""

from __future__ import annotations

import hashlib
import threading
from abc import abstractmethod
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from ml.device import autocast_context
from ml.embedding import (
    RANDOM_WEIGHTS,
    EmbeddingModel,
    ImageEmbedder,
    ModelInfo,
    WeightsSource,
    encode_images_adaptive,
    warm_up_images,
)
from ml.text_cache import TextEmbeddingCache, text_cache_key
from ml.text_disk_cache import DiskTextCache

__all__ = [
    "DEFAULT_TEMPLATES",
    "QUICK_TEMPLATES",
    "RANDOM_WEIGHTS",
    "ModelInfo",
    "WeightsSource",
    "ZeroShotEmbeddingModel",
    "ZeroShotModel",
    "encode_images_adaptive",
    "check_prompt_inputs",
    "render_prompt_range",
    "render_prompts",
    "sigmoid_scores",
    "softmax_scores",
    "warm_up",
]


# The 80 OpenAI ImageNet prompt templates, in the order open_clip ships them
# (open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES, there as lambdas; a test checks they agree).
DEFAULT_TEMPLATES: list[str] = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
]
"""The 80 OpenAI ImageNet prompt templates (open_clip's zero-shot ensemble), with ``{}``."""

QUICK_TEMPLATES: list[str] = ["a photo of a {}."]
"""The one template an interactive request with new classes is answered with while the ensemble is computed:
CLIP's paper's default prompt ("A photo of a {label}."), one of the 80."""


@runtime_checkable
class ZeroShotModel(ImageEmbedder, Protocol):
    """A loaded zero-shot classifier: an :class:`~ml.embedding.ImageEmbedder` with a text tower (see the
    module docstring for the confidence semantics)."""

    text_cache: TextEmbeddingCache

    def text_embeddings(self, classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """One L2-normalised ``[C, D]`` float32 CPU embedding per class (the template ensemble), cached.

        The result is shared with the cache; it is an inference tensor, so in-place changes outside
        ``torch.inference_mode`` are refused (embeddings from :meth:`encode_images` are too).
        """
        ...

    def scores(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` confidences in [0, 1]."""
        ...


def check_prompt_inputs(classes: Sequence[str], templates: Sequence[str]) -> None:
    """ValueError/TypeError unless ``classes`` and ``templates`` are non-empty string lists whose templates
    name the class with ``{c}`` or ``{}``."""
    if isinstance(classes, str) or isinstance(templates, str):
        raise TypeError("classes and templates must be sequences of strings, not a string")
    if not classes:
        raise ValueError("at least one class is required")
    if not templates:
        raise ValueError("at least one template is required")
    for template in templates:
        if "{c}" not in template and "{}" not in template:
            raise ValueError(f"template {template!r} has no class placeholder ({{}} or {{c}})")


def render_prompt_range(classes: Sequence[str], templates: Sequence[str], start: int, stop: int) -> list[str]:
    """Prompts ``[start, stop)`` of :func:`render_prompts`' order, rendered without building the others."""
    count = len(templates)
    prompts = []
    for index in range(start, min(stop, len(classes) * count)):
        name, template = classes[index // count], templates[index % count]
        prompts.append(template.replace("{c}", name) if "{c}" in template else template.replace("{}", name))
    return prompts


def render_prompts(classes: Sequence[str], templates: Sequence[str]) -> list[str]:
    """All prompts, class-major: ``templates[j]`` with ``classes[i]`` at index ``i * T + j``.

    A template names the class with ``{c}`` or ``{}``; a template with neither is rejected.
    """
    check_prompt_inputs(classes, templates)
    return render_prompt_range(classes, templates, 0, len(classes) * len(templates))


def softmax_scores(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP confidences: ``softmax(logit_scale * cos)`` over the classes (rows sum to 1)."""
    logits = logit_scale * (image_embeddings.float() @ text_embeddings.float().T)
    return logits.softmax(dim=-1)


NEUTRAL_CLASS = "object"
"""CLIP's multi-label rule compares each class prompt with this class-neutral one (rendered with the same templates)."""


def neutral_sigmoid_scores(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP multi-label confidences: the LAST text row is the class-neutral prompt (:data:`NEUTRAL_CLASS`);
    ``p_c = sigmoid(logit_scale * (cos_c - cos_neutral))``, i.e. the two-way softmax of class c's prompt against
    the neutral prompt, independent per class. Returns ``[B, C]`` (the neutral column dropped)."""
    logits = logit_scale * (image_embeddings.float() @ text_embeddings.float().T)
    return (logits[:, :-1] - logits[:, -1:]).sigmoid()


def sigmoid_scores(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """SigLIP confidences: ``sigmoid(logit_scale * cos + logit_bias)``, independent per class."""
    logits = logit_scale * (image_embeddings.float() @ text_embeddings.float().T) + logit_bias
    return logits.sigmoid()


class ZeroShotEmbeddingModel(EmbeddingModel):
    """Shared implementation of :class:`ZeroShotModel`: the image side from
    :class:`~ml.embedding.EmbeddingModel`, plus prompt-ensemble text embeddings with caching.
    Families supply the raw feature functions."""

    text_batch_size = 64  # prompts per text forward: same speed as 256 on CPU, far less peak memory
    """Prompts per text forward pass."""

    def __init__(
        self, info: ModelInfo, device: torch.device, image_size: int, text_cache: TextEmbeddingCache
    ) -> None:
        super().__init__(info, device, image_size)
        self.text_cache = text_cache
        self.disk_cache: DiskTextCache | None = None  # class embeddings shared across restarts and processes
        self._text_lock = threading.Lock()
        self._identity: str | None = None

    @property
    def identity(self) -> str:
        """What the text embeddings of this model depend on: family, variant, weights spec, the device type
        (autocast precision) and a digest of a strided sample of every parameter (other weights under the same
        name, e.g. a replaced local file or another seed, get another identity). Computed once."""
        if self._identity is None:
            digest = hashlib.blake2b(digest_size=16)
            with torch.no_grad():
                for name, param in sorted(self.module.named_parameters(), key=lambda item: item[0]):  # type: ignore[attr-defined]
                    flat = param.detach().reshape(-1)
                    sample = flat[:: max(1, flat.numel() // 256)][:256]
                    digest.update(f"{name}:{tuple(param.shape)}:".encode())
                    digest.update(sample.float().cpu().numpy().tobytes())
            info = self.info
            self._identity = f"{info.family}|{info.variant}|{info.weights}|{self.device.type}|{digest.hexdigest()}"
        return self._identity

    @abstractmethod
    def scores(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids of ``prompts`` on the CPU (pure CPU work: any thread may call it)."""

    @abstractmethod
    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised text features of token ids already on the device."""

    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        """Unnormalised text features for a list of prompts (tokenised here), on the device."""
        return self._encode_tokens(self.tokenize(prompts).to(self.device))

    def text_embeddings(self, classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        check_prompt_inputs(classes, templates)
        key = text_cache_key(self.info, classes, templates)
        cached = self.text_cache.get(key)
        if cached is not None:
            return cached
        with self._text_lock:  # one text pass at a time; a concurrent identical request waits for it
            cached = self.text_cache.peek(key)
            if cached is not None:
                return cached
            stored = self.read_disk(classes, templates)
            missing = [i for i, row in enumerate(stored) if row is None]
            if missing:
                names = [classes[i] for i in missing]
                sums = None
                for start, stop in self.text_chunks(names, templates):
                    tokens = self.tokenize_prompts(names, templates, start, stop)
                    sums = self.add_text_features(sums, tokens, start, len(names), len(templates))
                computed = self.finish_text_embeddings(sums, len(templates))
                self.write_disk(names, templates, computed)
            else:
                computed = None
            embeddings = merge_class_rows(stored, missing, computed)
            self.text_cache.put(key, embeddings)
        return embeddings

    def read_disk(self, classes: Sequence[str], templates: Sequence[str]) -> list[torch.Tensor | None]:
        """Per class its ensemble embedding from the disk cache, or None (no disk cache: all None). File I/O."""
        if self.disk_cache is None:
            return [None] * len(classes)
        return self.disk_cache.get_many(self.identity, classes, templates)

    def write_disk(self, classes: Sequence[str], templates: Sequence[str], embeddings: torch.Tensor) -> None:
        """Store computed class embeddings (``[C, D]``, CPU) in the disk cache, if there is one. File I/O."""
        if self.disk_cache is not None:
            self.disk_cache.put_many(self.identity, classes, templates, embeddings)

    # The text pass in pieces, so a caller can render and tokenise on CPU threads (after the cache lookup)
    # and run only the forwards on the model's thread (see handlers.model_handles.ZeroShotHandle.prepare).

    def text_chunks(self, classes: Sequence[str], templates: Sequence[str]) -> list[tuple[int, int]]:
        """``[start, stop)`` prompt ranges of one text forward each."""
        total = len(classes) * len(templates)
        return [(start, min(start + self.text_batch_size, total)) for start in range(0, total, self.text_batch_size)]

    def tokenize_prompts(self, classes: Sequence[str], templates: Sequence[str], start: int, stop: int) -> torch.Tensor:
        """Render prompts ``[start, stop)`` and tokenise them (CPU only, any thread)."""
        return self.tokenize(render_prompt_range(classes, templates, start, stop))

    def add_text_features(self, sums: torch.Tensor | None, tokens: torch.Tensor, start: int, num_classes: int,
                          num_templates: int) -> torch.Tensor:
        """Add the normalised embeddings of prompts ``[start, start + len(tokens))`` to their classes' sums
        (``[C, D]`` on the device; None: start new sums). The model's thread."""
        with torch.inference_mode():
            with autocast_context(self.device):
                features = self._encode_tokens(tokens.to(self.device))
            features = F.normalize(features.float(), dim=-1)
            if sums is None:
                sums = torch.zeros(num_classes, features.shape[-1], device=self.device)
            class_index = torch.arange(start, start + features.shape[0], device=self.device) // num_templates
            sums.index_add_(0, class_index, features)
        return sums

    def finish_text_embeddings(self, sums: torch.Tensor | None, num_templates: int) -> torch.Tensor:
        """Per class: the normalised mean of its normalised prompt embeddings (open_clip's ensemble), on the CPU."""
        assert sums is not None
        with torch.inference_mode():
            embeddings = F.normalize(sums / num_templates, dim=-1)
        return embeddings.cpu()


def merge_class_rows(stored: Sequence[torch.Tensor | None], missing: Sequence[int],
                     computed: torch.Tensor | None) -> torch.Tensor:
    """``[C, D]`` from per-class rows read from disk and the rows computed for the ``missing`` positions."""
    if computed is not None and len(missing) == len(stored):
        return computed
    rows = list(stored)
    for j, i in enumerate(missing):
        assert computed is not None
        rows[i] = computed[j]
    with torch.inference_mode():
        return torch.stack([r for r in rows if r is not None]).float()


def warm_up(model: ZeroShotModel) -> None:
    """Run one image and one prompt through ``model`` (kernels, allocator) without touching the cache; compute
    its :attr:`~ZeroShotEmbeddingModel.identity`."""
    warm_up_images(model)
    if isinstance(model, ZeroShotEmbeddingModel):
        with model._text_lock, torch.inference_mode(), autocast_context(model.device):
            model._text_features(["a photo."])
        _ = model.identity
