"""The annotation handler: classify a request's images and yield its result parts in request order.

Per request: pick the model (loading it on first use), compute the class embeddings once (cached
across requests), then fetch -> decode+preprocess (``handlers.preprocessing``: the CPU pool, or batched
JPEG decoding on the model's GPU) -> micro-batched forward (GPU thread) for every image, with bounded concurrency. Part ``k`` (images ``[k*N, (k+1)*N)``) is yielded as soon
as its images are done, so the first results reach the backend before the last image is fetched.
One bad image is an error entry; only an unusable request or model fails the whole request.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

import structlog
import torch

from handlers.audit import AuditConfig, AuditHandler
from handlers.batcher import MicroBatcher
from handlers.embedding import EmbedConfig, EmbedHandler, content_hash
from handlers.errors import ImageError, InvalidRequest, PermanentError
from handlers.executor import Executors
from handlers.fewshot import FewShotClassifier, FewShotConfig, FewShotHeads
from handlers.parts import parts_in_order
from handlers.fetch import Fetcher
from handlers.images import DecodeLimits
from handlers.models import LoadedModel, ModelConfig, ModelRegistry
from handlers.preprocessing import Preprocessor
from handlers.select import SelectHandler
from handlers.storage import ObjectStore
from ml.embedding_cache import EmbeddingCache
from schemas.annotation import (
    MAX_IMAGE_ERROR_CHARS,
    AnnotationRequest,
    AnnotationResult,
    AuditRequest,
    EmbedRequest,
    ImageRef,
    ImageResult,
    Prediction,
    SelectRequest,
    prompt_volume_problem,
)
from schemas.common import ErrorInfo

log = structlog.get_logger("cls.annotation")

PART_BUDGET_BYTES = 512 * 1024
"""A result part is kept well below 1 MB (Kafka's default max message size) and CLS_MAX_RECORD_BYTES."""


@dataclass
class AnnotationConfig:
    part_size: int = 500
    max_images_per_request: int = 10_000
    default_templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    images_in_flight: int = 128  # bulk images in fetch/decode/forward at once, all bulk requests together
    # of which one bulk request holds at most this many (admission is windowed); the worker sets two batches,
    # so one request alone has its next batch decoded while one runs (one batch's worth split its batches
    # in two: a few images, then the rest)
    request_window: int = 64
    interactive_images_in_flight: int = 64  # interactive images: their own budget, never behind bulk ones
    part_budget_bytes: int = PART_BUDGET_BYTES
    preprocess: str = "tensor"  # CLS_PREPROCESS: "tensor" (ml.preprocess) or "pil" (the families' Pillow transforms)
    gpu_decode: bool = True  # CLS_GPU_DECODE: with "tensor" and a model on CUDA, baseline JPEGs decoded there in batches


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
    on_text_cache: Callable[[bool], None] | None = None  # metrics hook: True on a hit
    store: ObjectStore | None = None  # where embed writes vectors and reads 'against' files
    embed_config: EmbedConfig = field(default_factory=EmbedConfig)
    embedding_cache: EmbeddingCache | None = None  # image embeddings by (content hash, model): classify and embed
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)  # classify with examples: limits, head cache size
    fewshot_heads: FewShotHeads = field(init=False)  # fitted few-shot heads by support-set key, single flight
    audit_config: AuditConfig = field(default_factory=AuditConfig)  # "task": "audit" limits
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


def part_size_for(request: AnnotationRequest, configured: int, class_names: Sequence[str],
                  budget_bytes: int = PART_BUDGET_BYTES, extra_envelope_bytes: int = 0) -> int:
    """N for this request: the configured part size, lowered so a part's JSON stays within ``budget_bytes``.

    The bound is on the encoded size of the worst case of every image (its id, ``top_k`` of the longest
    class names, or an error entry whose message is cut to ``MAX_IMAGE_ERROR_CHARS``), so it holds
    whatever the outcome; and it depends only on the request (and the model's class names), so a
    redelivery gets the same parts. ``extra_envelope_bytes``: a bound of what else every part carries (the
    few-shot summary).
    """
    top_k = min(request.top_k, len(class_names))
    longest_class = max((_json_bytes(c) for c in class_names), default=10)
    longest_id = max(_json_bytes(img.id) for img in request.images)
    predictions = 2 + top_k * (longest_class + len('{"class":,"confidence":0.12345678901234567},'))
    error = len('"error":{"code":"","message":""}') + 64 + 2 * MAX_IMAGE_ERROR_CHARS  # 2: escaped quotes and backslashes
    per_image = len('{"id":,"predictions":,"margin":-0.12345678901234567,"auto_accept":false},') + longest_id + predictions + error
    envelope = 2048 + extra_envelope_bytes  # request id, model descriptor, part fields, created_at
    return max(1, min(configured, (budget_bytes - envelope) // per_image))


def _json_bytes(text: str) -> int:
    """Encoded size of ``text`` as a JSON string (UTF-8, quotes and escapes included)."""
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8", "replace"))


def rank(confidences: torch.Tensor, classes: Sequence[str], top_k: int, threshold: float) -> tuple[list[Prediction], float]:
    """Sorted predictions of one image: ``top_k`` first, then ``threshold``; and the top-1/top-2 margin."""
    values, indices = torch.sort(confidences.float(), descending=True)
    values_list = values.tolist()
    margin = values_list[0] - values_list[1] if len(values_list) > 1 else values_list[0]
    predictions = [
        Prediction(class_name=classes[i], confidence=min(1.0, max(0.0, v)))
        for v, i in zip(values_list[:top_k], indices[:top_k].tolist(), strict=True)
        if v >= threshold
    ]
    return predictions, margin


class AnnotationHandler:
    """``handle(request) -> async iterator of AnnotationResult parts``."""

    def __init__(self, ctx: AnnotationContext) -> None:
        self.ctx = ctx
        self.embedder = EmbedHandler(ctx, ctx.store)
        self.few_shot = FewShotClassifier(self)
        self.auditor = AuditHandler(ctx, self.embedder)
        self.selector = SelectHandler(ctx, self.embedder)

    async def handle(self, request: AnnotationRequest | EmbedRequest | AuditRequest | SelectRequest
                     ) -> AsyncIterator[AnnotationResult]:
        if isinstance(request, EmbedRequest):
            async for part in self.embedder.handle(request):
                yield part
            return
        if isinstance(request, AuditRequest):
            async for part in self.auditor.handle(request):
                yield part
            return
        if isinstance(request, SelectRequest):
            async for part in self.selector.handle(request):
                yield part
            return
        async for part in self.classify(request):
            yield part

    async def classify(self, request: AnnotationRequest) -> AsyncIterator[AnnotationResult]:
        ctx = self.ctx
        started = time.monotonic()
        request_id = request.request_id or ""
        if len(request.images) > ctx.config.max_images_per_request:
            raise PermanentError(
                "invalid_request",
                f"{len(request.images)} images; this worker accepts at most {ctx.config.max_images_per_request} per request",
            )
        if request.has_examples:  # few-shot: a head fitted on the request's labeled examples
            async for part in self.few_shot.classify(request):
                yield part
            return
        key = ctx.model_config.key_for(request.model, request.model_variant, request.model_url)
        model = await ctx.models.get(key)
        classes = model.class_names(request.classes)
        templates = request.prompt_templates or ctx.config.default_templates
        if request.model != "custom":  # the schema checked request templates; the defaults count too
            problem = prompt_volume_problem(classes, templates, "templates" if request.prompt_templates
                                            else "default templates (CLS_DEFAULT_PROMPT_TEMPLATES)")
            if problem:
                raise InvalidRequest(problem)
        prepared, text_cache_hit = await model.prepare(classes, templates, ctx.executors)
        if ctx.on_text_cache is not None and request.model != "custom":
            ctx.on_text_cache(text_cache_hit)
        top_k = min(request.top_k, len(classes))

        size = part_size_for(request, ctx.config.part_size, classes, ctx.config.part_budget_bytes)
        images = request.images
        parts = [images[i:i + size] for i in range(0, len(images), size)]
        priority = request.priority or "bulk"
        # Admission is windowed per request: a bulk request holds at most request_window images in
        # flight, so the shared budget is split between concurrent bulk requests; interactive images
        # use their own budget and go first in the batcher.
        window = asyncio.Semaphore(ctx.config.request_window if priority == "bulk" else len(images))

        def handle(image: ImageRef) -> Awaitable[torch.Tensor | ImageResult]:
            return self._embed(model, image, request_id, priority, window)

        failed_images = 0
        async with aclosing(parts_in_order(parts, handle)) as stream:
            async for k, part_images, outputs in stream:
                results = await self._part_results(model, part_images, outputs, prepared, classes, top_k, request.threshold,
                                                   request.auto_accept_precision)
                failed_images += sum(1 for r in results if r.error is not None)
                yield AnnotationResult.completed_part(
                    request_id, k, len(parts),
                    model=model.descriptor,
                    results=results,
                )
        log.info(
            "annotation_summary",
            model=model.descriptor.variant,
            weights=model.descriptor.weights,
            images=len(images),
            failed_images=failed_images,
            parts=len(parts),
            part_size=size,
            text_cache="hit" if text_cache_hit else "miss",
            batches_shared=ctx.batcher.forget(request_id),
            seconds=round(time.monotonic() - started, 3),
        )

    async def _embed(self, model: LoadedModel, image: ImageRef, request_id: str, priority: str,
                     window: asyncio.Semaphore) -> torch.Tensor | ImageResult:
        """One image -> its model output row, or an error entry."""
        ctx = self.ctx
        budget = ctx.interactive_semaphore if priority == "interactive" else ctx.images_semaphore
        on_cpu = ctx.executors.on_cpu_first if priority == "interactive" else ctx.executors.on_cpu
        async with window, budget:
            cache = ctx.embedding_cache if model.forward_is_embedding else None
            digest = None
            try:
                data = await ctx.fetcher.fetch(image.url)
                if cache is not None:  # the same bytes, the same model: the embedding an embed request stored
                    digest = await on_cpu(content_hash, data)
                    cached = cache.get(digest, model.key)
                    if cached is not None:
                        return cached
                pixels = await ctx.preprocessor.pixels(data, model, request_id, priority)
            except ImageError as exc:
                return ImageResult(id=image.id, error=ErrorInfo(code=exc.code, message=exc.message))
            # the key's model loaded now: after an eviction and reload, queued images go to the new instance
            current = ctx.models.peek(model.key) or model
            output = await ctx.batcher.submit(model.key, current.forward, pixels, request_id, priority,
                                              stage=current.stage)
            if cache is not None and digest is not None:
                cache.put(digest, model.key, output)
            return output

    async def _part_results(self, model: LoadedModel, images: Sequence[ImageRef], outputs: list, prepared: object,
                            classes: Sequence[str], top_k: int, threshold: float,
                            auto_accept_precision: float | None = None) -> list[ImageResult]:
        good = [i for i, out in enumerate(outputs) if isinstance(out, torch.Tensor)]
        ranked: list[tuple[list[Prediction], float]] = []
        accepted: list[bool | None] = [None] * len(good)
        if good:  # stacking, scoring and ranking on the GPU thread: no tensor work on the event loop
            rows = [outputs[i] for i in good]
            ranked = await self.ctx.executors.on_gpu(_score_and_rank, model, rows, prepared, classes, top_k, threshold)
            if auto_accept_precision is not None:
                accepted = await self.ctx.executors.on_gpu(_auto_accept, model, rows, ranked, auto_accept_precision)
        row_of = {index: row for row, index in enumerate(good)}
        results: list[ImageResult] = []
        for i, image in enumerate(images):
            out = outputs[i]
            if isinstance(out, ImageResult):
                results.append(out)
                continue
            predictions, margin = ranked[row_of[i]]
            results.append(ImageResult(id=image.id, predictions=predictions, margin=round(margin, 6),
                                       auto_accept=accepted[row_of[i]]))
        return results


def _score_and_rank(model: LoadedModel, rows: list[torch.Tensor], prepared: object, classes: Sequence[str],
                    top_k: int, threshold: float) -> list[tuple[list[Prediction], float]]:
    confidences = model.confidences(torch.stack(rows), prepared)
    return [rank(row, classes, top_k, threshold) for row in confidences]


def _auto_accept(model: LoadedModel, rows: list[torch.Tensor], ranked: list[tuple[list[Prediction], float]],
                 precision: float) -> list[bool | None]:
    """Per image: the model accepts its top-1 class over ALL its classes at ``precision`` (thresholds validated at
    training time, on calibrated full-softmax confidences), and that class is the first reported prediction."""
    decide = getattr(model, "auto_accept", None)
    if decide is None:  # zero-shot models have no validated thresholds (the request schema refuses them)
        return [None] * len(rows)
    classes_and_ok = decide(torch.stack(rows), precision)
    return [ok and bool(predictions) and predictions[0].class_name == top
            for (top, ok), (predictions, _) in zip(classes_and_ok, ranked, strict=True)]


def failed_result(request_id: str, error: ErrorInfo) -> AnnotationResult:
    """The contract's whole-request failure (invalid request, model not loadable, ...)."""
    return AnnotationResult(
        message_id=AnnotationResult.message_id_for(request_id, "failed"),
        request_id=request_id,
        status="failed",
        error=error,
    )
