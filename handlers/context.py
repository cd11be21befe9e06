"""What the annotation handlers share, built once at worker start-up: the configs of each task and the context.

``AnnotationContext`` holds the model registry, fetcher, batcher, executors, caches and the admission budgets;
every task handler (classify, few-shot, embed, audit) takes it, and nothing here imports a task handler.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from handlers.batcher import MicroBatcher
from handlers.executor import Executors
from handlers.fetch import Fetcher
from handlers.images import DecodeLimits
from handlers.manifests import ManifestLimits
from handlers.model_config import ModelConfig
from handlers.models import ModelRegistry
from handlers.parts import PART_BUDGET_BYTES
from handlers.preprocessing import Preprocessor
from handlers.storage import ObjectStore
from ml.embedding_cache import EmbeddingCache
from ml.fewshot import FewShotHeadCache, FewShotResult


@dataclass
class AnnotationConfig:
    """Classify's settings (``consumers.annotation_worker`` builds every config here from ``CLS_*``; the defaults
    of the settings live in ``consumers.settings`` only)."""

    part_size: int  # CLS_RESULT_PART_SIZE
    max_images_per_request: int  # CLS_MAX_IMAGES_PER_REQUEST
    default_templates: list[str]  # CLS_DEFAULT_PROMPT_TEMPLATES
    preprocess: str  # CLS_PREPROCESS: "tensor" (ml.preprocess) or "pil" (the families' Pillow transforms)
    gpu_decode: bool  # CLS_GPU_DECODE: with "tensor" and a model on CUDA, baseline JPEGs decoded there in batches
    images_in_flight: int = 128  # bulk images in fetch/decode/forward at once, all bulk requests together
    # of which one bulk request holds at most this many (admission is windowed); the worker sets two batches,
    # so one request alone has its next batch decoded while one runs (one batch's worth split its batches
    # in two: a few images, then the rest)
    request_window: int = 64
    interactive_images_in_flight: int = 64  # interactive images: their own budget, never behind bulk ones
    part_budget_bytes: int = PART_BUDGET_BYTES


@dataclass(frozen=True)
class EmbedConfig:
    output_path: str | None  # CLS_EMBED_OUTPUT_PATH: default prefix (s3://bucket/prefix or file://...)
    inline_max_images: int  # CLS_EMBED_INLINE_MAX_IMAGES: "inline": true only up to this many images
    against_max_bytes: int  # CLS_EMBED_AGAINST_MAX_MB: all 'against' files together


@dataclass(frozen=True)
class FewShotConfig:
    max_examples: int  # CLS_FEWSHOT_MAX_EXAMPLES: support examples per request (inline or manifest)
    head_cache_bytes: int  # CLS_FEWSHOT_HEAD_CACHE_MB: fitted heads kept across requests
    head_cache_entries: int = 64


@dataclass(frozen=True)
class AuditConfig:
    max_images: int  # CLS_AUDIT_MAX_IMAGES: images of one audit (inline images stay <= 10,000)
    max_cells: int  # CLS_AUDIT_MAX_CELLS: images x classes (the fit's time and probability table)
    jobs: int = 2  # folds fitted at once (each fit's BLAS single-threaded)


class FewShotHeads:
    """Fitted heads by support-set key: a bounded cache plus single flight, so concurrent requests with the same
    support set fit once. ``fits`` counts the fits started (metrics, tests)."""

    def __init__(self, config: FewShotConfig) -> None:
        self.cache = FewShotHeadCache(max_entries=config.head_cache_entries, max_bytes=config.head_cache_bytes)
        self._pending: dict[str, asyncio.Task[FewShotResult]] = {}
        self.fits = 0
        self.on_head: Callable[[bool], None] | None = None  # metrics hook: True when this request fitted
        self.on_fit: Callable[[float], None] | None = None  # metrics hook: seconds of one fit

    async def get_or_fit(self, key: str, fit: Callable[[], FewShotResult],
                         executors: Executors) -> tuple[FewShotResult, bool]:
        """(the head for ``key``, whether this call fitted it). ``fit`` runs in the CPU pool, as a task of its own:
        a cancelled request does not cancel a fit that other requests wait for."""
        cached = self.cache.get(key)
        if cached is not None:
            if self.on_head is not None:
                self.on_head(False)
            return cached, False
        task = self._pending.get(key)
        fitted = task is None
        if task is None:
            self.fits += 1
            task = asyncio.ensure_future(self._fit(key, fit, executors))
            self._pending[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        result = await asyncio.shield(task)
        if self.on_head is not None:
            self.on_head(fitted)
        return result, fitted

    async def _fit(self, key: str, fit: Callable[[], FewShotResult], executors: Executors) -> FewShotResult:
        started = time.monotonic()
        result = await executors.on_cpu(fit)
        if self.on_fit is not None:
            self.on_fit(time.monotonic() - started)
        self.cache.put(key, result)
        return result

    def _done(self, key: str, task: asyncio.Task[FewShotResult]) -> None:
        self._pending.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: every waiter re-raises it itself


@dataclass
class AnnotationContext:
    """Everything the handler needs, built once at worker start-up."""

    config: AnnotationConfig
    model_config: ModelConfig
    models: ModelRegistry
    fetcher: Fetcher
    decode_limits: DecodeLimits
    batcher: MicroBatcher
    executors: Executors
    embed_config: EmbedConfig
    fewshot: FewShotConfig  # classify with examples: limits, head cache size
    audit_config: AuditConfig  # "task": "audit" limits
    on_text_cache: Callable[[bool], None] | None = None  # metrics hook: True on a hit
    store: ObjectStore | None = None  # where embed writes vectors and reads 'against' files
    embedding_cache: EmbeddingCache | None = None  # image embeddings by (content hash, model): classify and embed
    fewshot_heads: FewShotHeads = field(init=False)  # fitted few-shot heads by support-set key, single flight
    manifest_limits: ManifestLimits = field(default_factory=ManifestLimits)  # examples_url / manifest_url bounds
    images_semaphore: asyncio.Semaphore = field(init=False)
    interactive_semaphore: asyncio.Semaphore = field(init=False)
    preprocessor: Preprocessor = field(init=False)  # fetched bytes -> model input, for classify and embed

    def __post_init__(self) -> None:
        self.images_semaphore = asyncio.Semaphore(self.config.images_in_flight)
        self.interactive_semaphore = asyncio.Semaphore(self.config.interactive_images_in_flight)
        self.fewshot_heads = FewShotHeads(self.fewshot)
        self.preprocessor = Preprocessor(self.config.preprocess, self.decode_limits, self.executors,
                                         gpu_decode=self.config.gpu_decode, max_batch=self.batcher.max_batch,
                                         max_wait_ms=self.batcher.max_wait_ms)
