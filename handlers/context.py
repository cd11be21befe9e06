"""What the annotation handlers share, built once at worker start-up: the configs of each task and the context.

``AnnotationContext`` holds the model registry, fetcher, batcher, executors, caches and the admission budgets;
every task handler (classify, few-shot, embed, audit) takes it, and nothing here imports a task handler.
"""

from __future__ import annotations

import asyncio
import functools
import threading
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
    # CLS_QUICK_PROMPT_TEMPLATES: an interactive request whose classes' default ensemble is not cached is answered
    # with these at once, the ensemble computed in the background (empty: interactive requests wait for it)
    quick_templates: list[str]
    images_in_flight: int  # bulk images in fetch/decode/forward at once, all bulk requests together
    # of which one bulk request holds at most this many (admission is windowed); the worker sets two batches,
    # so one request alone has its next batch decoded while one runs (one batch's worth split its batches
    # in two: a few images, then the rest)
    request_window: int
    interactive_images_in_flight: int  # interactive images: their own budget, never behind bulk ones
    part_budget_bytes: int  # one result part's bytes: within PART_BUDGET_BYTES and half of CLS_MAX_RECORD_BYTES


@dataclass(frozen=True)
class EmbedConfig:
    output_path: str | None  # CLS_EMBED_OUTPUT_PATH: default prefix (s3://bucket/prefix or file://...)
    inline_max_images: int  # CLS_EMBED_INLINE_MAX_IMAGES: "inline": true only up to this many images
    against_max_bytes: int  # CLS_EMBED_AGAINST_MAX_MB: the against files together, stored and read


@dataclass(frozen=True)
class FewShotConfig:
    max_examples: int  # CLS_FEWSHOT_MAX_EXAMPLES: support examples per request (inline or manifest)
    head_cache_bytes: int  # CLS_FEWSHOT_HEAD_CACHE_MB: fitted heads kept across requests
    max_fit_cost: int  # CLS_FEWSHOT_MAX_FIT_COST: classes x examples x embedding dim of one fit
    head_cache_entries: int = 64


@dataclass(frozen=True)
class AuditConfig:
    max_images: int  # CLS_AUDIT_MAX_IMAGES: images of one audit (inline images stay within schemas.annotation.MAX_IMAGES_PER_REQUEST)
    max_cells: int  # CLS_AUDIT_MAX_CELLS: images x classes (the fit's time and probability table)
    max_select_work: int  # CLS_SELECT_MAX_WORK: pool images x budget of one selection
    jobs: int = 2  # folds fitted at once (each fit's BLAS single-threaded)


class FewShotHeads:
    """Fitted heads by support-set key: a bounded cache plus single flight, so concurrent requests with the same
    support set fit once. ``fits`` counts the fits started (metrics, tests)."""

    def __init__(self, config: FewShotConfig) -> None:
        self.cache = FewShotHeadCache(max_entries=config.head_cache_entries, max_bytes=config.head_cache_bytes)
        self._pending: dict[str, _Flight] = {}
        self.fits = 0
        self.cancelled = 0  # fits stopped because every request waiting for them was cancelled (tests, logs)
        self.on_head: Callable[[bool], None] | None = None  # metrics hook: True when this request fitted
        self.on_fit: Callable[[float], None] | None = None  # metrics hook: seconds of one fit

    async def get_or_fit(self, key: str, fit: Callable[..., FewShotResult],
                         executors: Executors) -> tuple[FewShotResult, bool]:
        """(the head for ``key``, whether this call fitted it). ``fit(should_stop=...)`` runs in the executors' fit
        pool, as a task of its own: a cancelled request does not cancel a fit that other requests wait for; when the
        last request waiting for a fit is cancelled (its handler timed out, the worker drains), the fit is dropped
        if it has not started, and told to stop if it has."""
        cached = self.cache.get(key)
        if cached is not None:
            if self.on_head is not None:
                self.on_head(False)
            return cached, False
        flight = self._pending.get(key)
        fitted = flight is None
        if flight is None:
            self.fits += 1
            stop = threading.Event()
            flight = _Flight(asyncio.ensure_future(self._fit(key, fit, executors, stop)), stop)
            self._pending[key] = flight
            flight.task.add_done_callback(functools.partial(self._done, key, flight))
        flight.waiters += 1
        try:
            result = await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():  # every waiter is gone: nobody needs this fit
                flight.stop.set()
                flight.task.cancel()
                self.cancelled += 1
        if self.on_head is not None:
            self.on_head(fitted)
        return result, fitted

    async def _fit(self, key: str, fit: Callable[..., FewShotResult], executors: Executors,
                   stop: threading.Event) -> FewShotResult:
        started = time.monotonic()
        result = await executors.on_fit(fit, should_stop=stop.is_set)
        if self.on_fit is not None:
            self.on_fit(time.monotonic() - started)
        self.cache.put(key, result)
        return result

    def _done(self, key: str, flight: _Flight, task: asyncio.Task[FewShotResult]) -> None:
        if self._pending.get(key) is flight:
            del self._pending[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter re-raises it itself


@dataclass
class _Flight:
    """One fit in progress: its task, its stop flag, and how many requests wait for it."""

    task: asyncio.Task[FewShotResult]
    stop: threading.Event
    waiters: int = 0


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
    manifest_limits: ManifestLimits  # examples_url / manifest_url bounds
    on_text_cache: Callable[[bool], None] | None = None  # metrics hook: True on a hit
    store: ObjectStore | None = None  # where embed writes vectors and reads 'against' files
    embedding_cache: EmbeddingCache | None = None  # image embeddings by (content hash, model): classify and embed
    fewshot_heads: FewShotHeads = field(init=False)  # fitted few-shot heads by support-set key, single flight
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
