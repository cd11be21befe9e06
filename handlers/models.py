"""The loaded-model cache of the annotation worker: resolve weights, load on the GPU thread, keep warm.

A model is identified by (family, variant, weights). Weights given as ``s3://`` URLs and trained
packages (``"model": "custom"``) are first copied into the local model directory (handlers move
files; ``ml`` reads local paths only). Loading happens once per key, on the GPU thread; concurrent
requests for the same model wait for the same load. The cache is bounded (least recently used out).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
import torch
from PIL import Image

from handlers.errors import BLOCKED_URL, PermanentError
from handlers.executor import Executors
from handlers.storage import ObjectStore
from ml.device import StagedBatch, stage_batch
from ml.preprocess import tensor_preprocess_for
from ml.text_cache import TextEmbeddingCache, text_cache_key
from schemas.annotation import ModelDescriptor

log = structlog.get_logger("cls.models")

MODEL_UNAVAILABLE = "model_unavailable"


@dataclass(frozen=True)
class ModelKey:
    family: str
    variant: str
    weights: str


DEFAULT_TIMM_VARIANTS = frozenset({"resnet50", "convnext_tiny", "efficientnet_b0", "vit_base_patch16_224",
                                   "vit_small_patch16_224", "resnet18", "resnet10t", "test_vit", "test_resnet"})
"""timm model names an embed request may name when CLS_ALLOWED_MODEL_VARIANTS is not set."""


@dataclass(frozen=True)
class ModelConfig:
    clip_variant: str = "ViT-B-32"
    clip_weights: str = "laion2b_s34b_b79k"
    siglip_variant: str = "google/siglip-base-patch16-224"
    siglip_weights: str = "pretrained"
    device: str = "auto"
    seed: int = 0
    text_cache_size: int = 512
    text_cache_bytes: int | None = 256 * 1024 * 1024  # one cache shared by every loaded zero-shot model
    cache_size: int = 2
    model_dir: str = "~/.cache/cls-workers/models"
    clip_variant_weights: tuple[tuple[str, str], ...] = ()  # (variant, weights) overrides, CLS_CLIP_VARIANT_WEIGHTS
    allowed_variants: frozenset[str] | None = None  # "family:variant" (or "family:*"); None: the default policy
    timm_variants: frozenset[str] = DEFAULT_TIMM_VARIANTS  # timm names allowed by the default policy
    timm_weights: str = "pretrained"  # timm weights without model_url: the hub cache ('random' in tests)

    def key_for(self, family: str, variant: str | None, model_url: str | None = None) -> ModelKey:
        """The cache key of a request's model; a variant a message names must pass the allow-list first."""
        if family == "custom":
            if not model_url:
                raise PermanentError("invalid_request", "model 'custom' needs model_url")
            return ModelKey("custom", model_url, model_url)
        if family == "clip":
            from ml.clip import canonical_variant

            name = canonical_variant(variant) if variant else self.clip_variant
            self._check_allowed("clip", name)
            return ModelKey("clip", name, self.clip_weights_for(name))
        if family == "siglip":
            name = variant or self.siglip_variant
            self._check_allowed("siglip", name)
            return ModelKey("siglip", name, self.siglip_weights)
        if family == "timm":
            if not variant:
                raise PermanentError("invalid_request", "model 'timm' needs model_variant (a timm model name)")
            self._check_allowed("timm", variant)
            return ModelKey("timm", variant, model_url or self.timm_weights)
        raise PermanentError("invalid_request", f"unknown model family {family!r}")

    def clip_weights_for(self, variant: str) -> str:
        """Weights of a CLIP variant: CLS_CLIP_VARIANT_WEIGHTS, else CLS_CLIP_WEIGHTS for the configured variant
        (or for any variant when it is 'random' or one of that variant's tags), else the variant's default tag
        from open_clip's table; ``model_unavailable`` naming the setting when there is none."""
        from ml.clip import default_pretrained_tag, pretrained_tags

        overrides = dict(self.clip_variant_weights)
        if variant in overrides:
            return overrides[variant]
        if variant == self.clip_variant or self.clip_weights == "random":
            return self.clip_weights
        if self.clip_weights in pretrained_tags(variant):
            return self.clip_weights
        tag = default_pretrained_tag(variant)
        if tag is None:
            raise PermanentError(
                MODEL_UNAVAILABLE,
                f"no pretrained weights known for CLIP {variant!r} (open_clip lists no tag for it); set "
                f"CLS_CLIP_VARIANT_WEIGHTS={variant}=<tag, local path or s3:// URL>",
            )
        return tag

    def _check_allowed(self, family: str, variant: str) -> None:
        if family != "timm" and variant == (self.clip_variant if family == "clip" else self.siglip_variant):
            return  # the configured default is always allowed
        if self.allowed_variants is not None:
            allowed = {f"{family}:{variant}", f"{family}:*"} & self.allowed_variants
        elif family == "timm":
            allowed = variant in self.timm_variants
        elif family == "clip":
            from ml.clip import known_variants

            allowed = variant in known_variants() or dict(self.clip_variant_weights).get(variant) is not None
        else:
            from ml.siglip import known_variants as siglip_variants

            allowed = variant in siglip_variants()
        if not allowed:
            known = "" if self.allowed_variants is not None else " (not a variant this worker knows)"
            raise PermanentError(
                MODEL_UNAVAILABLE,
                f"model_variant {variant!r} is not allowed for {family} on this worker{known}; an operator can allow "
                f"it with CLS_ALLOWED_MODEL_VARIANTS={family}:<variant>",
            )


def parse_variant_weights(text: str) -> tuple[tuple[str, str], ...]:
    """``"ViT-L-14=openai,RN50=s3://b/rn50.safetensors"`` -> pairs (CLS_CLIP_VARIANT_WEIGHTS)."""
    pairs = []
    for item in text.split(","):
        if item.strip():
            variant, sep, weights = item.partition("=")
            if not sep or not variant.strip() or not weights.strip():
                raise ValueError(f"CLS_CLIP_VARIANT_WEIGHTS entry {item!r} is not variant=weights")
            pairs.append((variant.strip().replace("/", "-"), weights.strip()))
    return tuple(pairs)


def parse_allowed_variants(text: str) -> frozenset[str] | None:
    """``"clip:ViT-L-14,siglip:google/siglip-so400m-patch14-384"`` -> entries; empty -> None (default policy)."""
    entries = frozenset(item.strip() for item in text.split(",") if item.strip())
    for entry in entries:
        if entry.partition(":")[0] not in ("clip", "siglip", "timm") or not entry.partition(":")[2]:
            raise ValueError(f"CLS_ALLOWED_MODEL_VARIANTS entry {entry!r} is not clip:<variant>, siglip:<hub id> "
                             "or timm:<model name>")
    return entries or None


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


class ModelRegistry:
    """Bounded LRU of loaded models; loads run on the GPU thread, one load per key at a time."""

    def __init__(self, config: ModelConfig, executors: Executors, store: ObjectStore | None,
                 on_loaded: Callable[[ModelKey, float], None] | None = None) -> None:
        self.on_loaded = on_loaded
        self.on_evicted: Callable[[ModelKey], None] | None = None  # e.g. metrics
        self.config = config
        self.executors = executors
        self.store = store
        self.model_dir = Path(config.model_dir).expanduser()
        self._loaded: OrderedDict[ModelKey, LoadedModel] = OrderedDict()
        self._loading: dict[ModelKey, asyncio.Future[LoadedModel]] = {}
        self.text_cache = TextEmbeddingCache(config.text_cache_size, config.text_cache_bytes)

    def peek(self, key: ModelKey) -> LoadedModel | None:
        """The loaded model of ``key`` now, if any (no load, no LRU update)."""
        return self._loaded.get(key)

    async def get(self, key: ModelKey) -> LoadedModel:
        model = self._loaded.get(key)
        if model is not None:
            self._loaded.move_to_end(key)
            return model
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[LoadedModel] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            model = await self._load(key)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            self._loading.pop(key, None)
        future.set_result(model)
        self._loaded[key] = model
        while len(self._loaded) > self.config.cache_size:
            evicted, _ = self._loaded.popitem(last=False)
            if self.on_evicted is not None:
                self.on_evicted(evicted)
            log.info("model_evicted", family=evicted.family, variant=evicted.variant)
        return model

    async def _load(self, key: ModelKey) -> LoadedModel:
        started = time.monotonic()
        if key.family == "custom":
            package_dir = await self._fetch_package(key.weights)
            model = await self.executors.on_gpu(self._load_custom, key, package_dir)
        elif key.family == "timm":
            weights = await self._timm_weights(key.weights)
            model = await self.executors.on_gpu(self._load_timm, key, weights)
        else:
            weights = await self._local_weights(key.weights)
            model = await self.executors.on_gpu(self._load_zero_shot, key, weights)
        elapsed = time.monotonic() - started
        if self.on_loaded is not None:
            self.on_loaded(key, elapsed)
        log.info("model_loaded", family=key.family, variant=model.descriptor.variant,
                 weights=model.descriptor.weights, seconds=round(elapsed, 2))
        return model

    def _load_zero_shot(self, key: ModelKey, weights: str) -> ZeroShotHandle:
        from ml.backbones import load_zero_shot_model
        from ml.embedding import ModelLoadError
        from ml.zeroshot import warm_up

        try:
            model = load_zero_shot_model(key.family, key.variant, weights, device=self.config.device,  # type: ignore[arg-type]
                                         text_cache=self.text_cache, seed=self.config.seed)
            warm_up(model)
        except ModelLoadError as exc:
            raise PermanentError(MODEL_UNAVAILABLE, f"{key.family} {key.variant} ({key.weights}): {exc}") from exc
        except Exception as exc:  # unknown architecture names, hub errors, ...
            raise PermanentError(MODEL_UNAVAILABLE, f"{key.family} {key.variant} ({key.weights}): {type(exc).__name__}: {exc}") from exc
        handle = ZeroShotHandle(key, model)
        if key.weights.startswith("s3://"):
            handle.descriptor = handle.descriptor.model_copy(update={"weights": key.weights})
        return handle

    def _load_timm(self, key: ModelKey, weights: str) -> TimmHandle:
        from ml.backbones import load_image_embedder
        from ml.embedding import ModelLoadError

        try:
            model = load_image_embedder("timm", key.variant, weights, device=self.config.device, seed=self.config.seed)
            return TimmHandle(key, model, key.weights)
        except ModelLoadError as exc:
            raise PermanentError(MODEL_UNAVAILABLE, f"timm {key.variant} ({key.weights}): {exc}") from exc
        except Exception as exc:
            raise PermanentError(MODEL_UNAVAILABLE, f"timm {key.variant} ({key.weights}): {type(exc).__name__}: {exc}") from exc

    async def _timm_weights(self, weights: str) -> str:
        """timm weights: 'pretrained' / 'random' as they are; an s3:// file downloaded once; a file:// URL inside the
        file fence (blocked_url otherwise). Only safetensors files are accepted from a message."""
        if weights in ("pretrained", "random"):
            return weights
        if not weights.endswith(".safetensors"):
            raise PermanentError(MODEL_UNAVAILABLE, f"timm model_url must name a .safetensors file: {weights!r}")
        if weights.startswith("file://"):
            if self.store is None:
                raise PermanentError(MODEL_UNAVAILABLE, "file:// weights need the file fence settings")
            self.store.check(weights)
            return str(self.store.files.path(weights))
        if not weights.startswith("s3://"):
            raise PermanentError(MODEL_UNAVAILABLE, f"timm model_url must be an s3:// or file:// URL: {weights[:200]!r}")
        if self.store is not None:
            self.store.check(weights)
        return await self._local_weights(weights)

    def _load_custom(self, key: ModelKey, package_dir: Path) -> CustomHandle:
        from ml.trained import TrainedModel

        try:
            model = TrainedModel.load(package_dir, device=self.config.device)
        except Exception as exc:
            raise PermanentError(MODEL_UNAVAILABLE, f"trained model at {key.weights}: {type(exc).__name__}: {exc}") from exc
        return CustomHandle(key, model)

    def _cache_dir(self, url: str) -> Path:
        return self.model_dir / hashlib.sha256(url.encode()).hexdigest()[:24]

    async def _local_weights(self, weights: str) -> str:
        """s3:// weights are downloaded once into the model directory; anything else is passed on."""
        if not weights.startswith("s3://"):
            return weights
        if self.store is None:
            raise PermanentError(MODEL_UNAVAILABLE, "s3:// weights need object storage settings")
        target = self._cache_dir(weights)
        if weights.endswith("/"):
            if not (target / ".complete").exists():
                for url in await self.store.list(weights):
                    relative = url[len(weights):]
                    await self.store.download_file(url, target / relative)
                target.mkdir(parents=True, exist_ok=True)
                (target / ".complete").touch()
            return str(target)
        path = target / weights.rsplit("/", 1)[-1]
        if not path.exists():
            await self.store.download_file(weights, path)
        return str(path)

    async def _fetch_package(self, model_url: str) -> Path:
        """Copy a trained package (config.json, model.safetensors) from storage, once per URL.

        The files land in a fresh temporary folder (unpredictable name); config.json is checked against the
        package schema (``ml.training.package.check_package_config``: allowed ``model_kwargs`` only, no
        paths) before the weights are even fetched, and only a valid package is moved into the cache.
        """
        from ml.training.errors import PackageError
        from ml.training.package import CONFIG_FILE, MAX_CONFIG_BYTES, WEIGHTS_FILE, parse_package_config

        if self.store is None:
            raise PermanentError(MODEL_UNAVAILABLE, "custom models need object storage settings")
        base = model_url.rstrip("/")
        self.store.check(base)  # the fences first: blocked_url before any read
        target = self._cache_dir(base)
        if (target / ".complete").exists():
            return target
        self.model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".package-", dir=self.model_dir))
        try:
            try:
                raw = await self.store.get_bytes(f"{base}/{CONFIG_FILE}", max_bytes=MAX_CONFIG_BYTES)
                parse_package_config(raw)
                (staging / CONFIG_FILE).write_bytes(raw)
                await self.store.download_file(f"{base}/{WEIGHTS_FILE}", staging / WEIGHTS_FILE)
            except PackageError as exc:
                raise PermanentError(MODEL_UNAVAILABLE, f"trained model at {model_url}: {exc}") from exc
            except PermanentError as exc:
                if exc.code == BLOCKED_URL:
                    raise
                raise PermanentError(MODEL_UNAVAILABLE, f"no trained model package at {model_url}: {exc.message}") from exc
            (staging / ".complete").touch()
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target
