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
from collections.abc import Callable
from pathlib import Path

import structlog

from handlers.errors import BLOCKED_URL, PermanentError
from handlers.executor import Executors
from handlers.keys import local_child
from handlers.model_config import (  # noqa: F401 - the model's identity and config, importable from here
    DEFAULT_CLIP_VARIANTS,
    DEFAULT_TIMM_VARIANTS,
    MODEL_UNAVAILABLE,
    ModelConfig,
    ModelKey,
    parse_allowed_variants,
    parse_variant_weights,
)
from handlers.model_handles import (  # noqa: F401 - the per-family handles, importable from here
    CustomHandle,
    EmbeddingHandle,
    LoadedModel,
    TimmHandle,
    ZeroShotHandle,
    probe_dim,
)
from handlers.storage import ObjectStore
from ml.errors import ModelLoadError
from handlers.text_pass import TextPasses
from ml.text_cache import TextEmbeddingCache
from ml.text_disk_cache import DiskTextCache

log = structlog.get_logger("cls.models")


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
        self.disk_text_cache = (DiskTextCache(config.text_cache_dir, config.text_cache_disk_bytes)
                                if config.text_cache_dir and config.text_cache_disk_bytes > 0 else None)
        self.text_passes = TextPasses(executors)

    async def close(self) -> None:
        """Cancel background work (text ensembles); the models stay until the executors shut down."""
        await self.text_passes.close()

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
        from ml.zeroshot import warm_up

        try:
            model = load_zero_shot_model(key.family, key.variant, weights, device=self.config.device,  # type: ignore[arg-type]
                                         text_cache=self.text_cache, seed=self.config.seed)
            model.disk_cache = self.disk_text_cache
            warm_up(model)
        except ModelLoadError as exc:
            raise PermanentError(MODEL_UNAVAILABLE, f"{key.family} {key.variant} ({key.weights}): {exc}") from exc
        except Exception as exc:  # unknown architecture names, hub errors, ...
            raise PermanentError(MODEL_UNAVAILABLE, f"{key.family} {key.variant} ({key.weights}): {type(exc).__name__}: {exc}") from exc
        handle = ZeroShotHandle(key, model, self.text_passes)
        if key.weights.startswith("s3://"):
            handle.descriptor = handle.descriptor.model_copy(update={"weights": key.weights})
        return handle

    def _load_timm(self, key: ModelKey, weights: str) -> TimmHandle:
        from ml.backbones import load_image_embedder

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
                    local = local_child(target, url[len(weights):], MODEL_UNAVAILABLE)  # never outside target
                    await self.store.download_file(url, local)
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
