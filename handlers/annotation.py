"""The annotation handler: classify a request's images and yield its result parts in request order.

Per request: pick the model (loading it on first use), compute the class embeddings once (cached
across requests), then fetch -> decode+preprocess (``handlers.preprocessing``: the CPU pool, or batched
JPEG decoding on the model's GPU) -> micro-batched forward (GPU thread) for every image, with bounded concurrency. Part ``k`` (images ``[k*N, (k+1)*N)``) is yielded as soon
as its images are done, so the first results reach the backend before the last image is fetched.
One bad image is an error entry; only an unusable request or model fails the whole request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import aclosing

import structlog
import torch

from handlers.admission import Budget, admit
from handlers.audit import AuditHandler
from handlers.context import AnnotationConfig, AnnotationContext
from handlers.embedding import EmbedHandler
from handlers.errors import InvalidRequest
from handlers.fewshot import FewShotClassifier
from handlers.model_handles import LoadedModel
from handlers.parts import PART_BUDGET_BYTES, part_size_for, parts_in_order, rank
from handlers.select import SelectHandler
from schemas.annotation import (
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

__all__ = ["PART_BUDGET_BYTES", "AnnotationConfig", "AnnotationContext", "AnnotationHandler", "failed_result",
           "part_size_for", "rank"]  # the context, configs and part helpers live in handlers.context / handlers.parts

log = structlog.get_logger("cls.annotation")

class AnnotationHandler:
    """``handle(request) -> async iterator of AnnotationResult parts``."""

    def __init__(self, ctx: AnnotationContext) -> None:
        self.ctx = ctx
        self.embedder = EmbedHandler(ctx, ctx.store)
        self.few_shot = FewShotClassifier(ctx, self.embedder)
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
        admit(Budget("request_images", ctx.config.max_images_per_request, "CLS_MAX_IMAGES_PER_REQUEST", unit="count"),
              len(request.images), "images in one classify request")
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
        priority = request.priority or "bulk"
        multi_label = request.multi_label or bool(getattr(model, "multi_label", False))  # custom: the package decides
        if request.multi_label and request.model == "custom" and not getattr(model, "multi_label", False):
            raise InvalidRequest(f"multi_label is true but the package at {request.model_url} is single-label "
                                 "(trained without multi_label)")
        text_classes = list(classes)
        if multi_label and request.model != "custom":
            text_classes += list(getattr(model, "multi_label_extra_classes", ()))
        prepared, text_cache_hit, prompt_set = await self._prepare(model, request, text_classes, templates, priority)
        if ctx.on_text_cache is not None and request.model != "custom":
            ctx.on_text_cache(text_cache_hit)
        descriptor = model.descriptor if prompt_set is None else model.descriptor.model_copy(
            update={"prompt_set": prompt_set})
        top_k = request.top_k_for(len(classes))

        size = part_size_for(request, ctx.config.part_size, classes, ctx.config.part_budget_bytes, multi_label=multi_label)
        images = request.images
        parts = [images[i:i + size] for i in range(0, len(images), size)]
        # Admission is windowed per request: a bulk request holds at most request_window images in
        # flight, so the shared budget is split between concurrent bulk requests; interactive images
        # use their own budget and go first in the batcher.
        window = asyncio.Semaphore(ctx.config.request_window if priority == "bulk" else len(images))

        def handle(image: ImageRef) -> Awaitable[torch.Tensor | ImageResult]:
            return self.embedder.forward_image(model, image, request_id, priority, window)

        failed_images = 0
        async with aclosing(parts_in_order(parts, handle)) as stream:
            async for k, part_images, outputs in stream:
                results = await self._part_results(model, part_images, outputs, prepared, classes, top_k, request.threshold,
                                                   request.auto_accept_precision, multi_label)
                failed_images += sum(1 for r in results if r.error is not None)
                yield AnnotationResult.completed_part(
                    request_id, k, len(parts),
                    model=descriptor,
                    results=results,
                )
        if prompt_set == "quick":  # answered: now the full ensemble, for the next request with these classes
            model.start_background(classes, templates)  # type: ignore[attr-defined]
        log.info(
            "annotation_summary",
            model=model.descriptor.variant,
            weights=model.descriptor.weights,
            images=len(images),
            failed_images=failed_images,
            parts=len(parts),
            part_size=size,
            text_cache="hit" if text_cache_hit else "miss",
            prompt_set=prompt_set,
            batches_shared=ctx.batcher.forget(request_id),
            seconds=round(time.monotonic() - started, 3),
        )

    async def _prepare(self, model: LoadedModel, request: AnnotationRequest, classes: list[str],
                       templates: list[str], priority: str) -> tuple[object, bool, str | None]:
        """The class side of a request: (prepared, cache hit, prompt set). Zero-shot requests with the worker's
        default templates: an interactive one whose ensemble is not cached gets the quick set ('quick');
        everything else the templates in full ('full', or 'request' for the request's own templates)."""
        if request.model not in ("clip", "siglip"):
            prepared, hit = await model.prepare(classes, templates, self.ctx.executors)
            return prepared, hit, None
        if request.prompt_templates:
            prepared, hit = await model.prepare(classes, templates, self.ctx.executors)
            return prepared, hit, "request"
        quick = self.ctx.config.quick_templates
        if priority == "interactive" and quick and list(quick) != list(templates):
            prepared, hit, quick_used = await model.prepare_interactive(classes, templates, quick)  # type: ignore[attr-defined]
            return prepared, hit, "quick" if quick_used else "full"
        prepared, hit = await model.prepare(classes, templates, self.ctx.executors)
        return prepared, hit, "full"

    async def _part_results(self, model: LoadedModel, images: Sequence[ImageRef], outputs: list, prepared: object,
                            classes: Sequence[str], top_k: int, threshold: float,
                            auto_accept_precision: float | None = None, multi_label: bool = False) -> list[ImageResult]:
        good = [i for i, out in enumerate(outputs) if isinstance(out, torch.Tensor)]
        ranked: list[tuple[list[Prediction], float]] = []
        tag_sets: list[list[str] | None] = [None] * len(good)
        accepted: list[bool | None] = [None] * len(good)
        accepted_tags: list[list[str] | None] = [None] * len(good)
        if good and multi_label:
            rows = [outputs[i] for i in good]
            ranked, tag_sets, accepted_tags = await self.ctx.executors.on_gpu(
                _score_multi_label, model, rows, prepared, classes, top_k, threshold, auto_accept_precision)
        elif good:  # stacking, scoring and ranking on the GPU thread: no tensor work on the event loop
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
            if multi_label:
                results.append(ImageResult(id=image.id, predictions=predictions, labels=tag_sets[row_of[i]],
                                           accepted_labels=accepted_tags[row_of[i]]))
                continue
            results.append(ImageResult(id=image.id, predictions=predictions, margin=round(margin, 6),
                                       auto_accept=accepted[row_of[i]]))
        return results


def _score_and_rank(model: LoadedModel, rows: list[torch.Tensor], prepared: object, classes: Sequence[str],
                    top_k: int, threshold: float) -> list[tuple[list[Prediction], float]]:
    confidences = model.confidences(torch.stack(rows), prepared)
    return [rank(row, classes, top_k, threshold) for row in confidences]


def _score_multi_label(model: LoadedModel, rows: list[torch.Tensor], prepared: object, classes: Sequence[str],
                       top_k: int, threshold: float, auto_accept_precision: float | None = None
                       ) -> tuple[list[tuple[list[Prediction], float]], list[list[str]], list[list[str] | None]]:
    """Independent per-class probabilities ranked (``top_k`` caps, ``threshold`` per class), each image's tag set (a
    multi-label package's per-class thresholds, at most ``top_k``; else the predictions' classes) and, for a package
    asked for ``auto_accept_precision``, the tags its per-class auto-accept thresholds accept (else None)."""
    stacked = torch.stack(rows)
    thresholds = model.tag_thresholds(prepared) if hasattr(model, "tag_thresholds") else None
    confidences = (model.multi_label_confidences(stacked, prepared) if thresholds is None and hasattr(model, "multi_label_confidences")
                   else model.confidences(stacked, prepared))
    ranked = [rank(row, classes, top_k, threshold) for row in confidences]
    if thresholds is None:
        return ranked, [[p.class_name for p in predictions] for predictions, _ in ranked], [None] * len(ranked)
    tag_sets = _reaching(confidences, thresholds, classes, top_k)
    accepted: list[list[str] | None] = [None] * len(ranked)
    if auto_accept_precision is not None:
        accepted = list(_reaching(confidences, model.tag_auto_accept_thresholds(prepared, auto_accept_precision),
                                  classes, top_k))
    return ranked, tag_sets, accepted


def _reaching(confidences: torch.Tensor, thresholds: torch.Tensor, classes: Sequence[str], top_k: int) -> list[list[str]]:
    """Per row: the classes whose confidence reaches their own threshold, most confident first, at most ``top_k``."""
    out: list[list[str]] = []
    for row in confidences:
        hits = sorted(((float(p), c) for c, (p, t) in enumerate(zip(row.tolist(), thresholds.tolist())) if p >= t),
                      key=lambda hit: -hit[0])
        out.append([classes[c] for _, c in hits[:top_k]])
    return out


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
