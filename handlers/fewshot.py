"""Few-shot classify: a classify request with labeled examples (``examples`` or ``examples_url``).

Per request: pick the model, read the support set (inline, or a JSON Lines manifest through the fenced
fetcher / object store, bounded by CLS_FEWSHOT_MAX_EXAMPLES), embed every example through
``EmbedHandler.embed_image`` (fenced fetch, the embedding cache by content hash, the batcher's embed lane:
a support set sent again is not embedded again), skip and count the examples that fail, then fit the head
(``ml.fewshot.fit_few_shot``) in the fit pool (``Executors.fit``) -- never on the event loop, the GPU thread or the
CPU pool that decodes images. Fitted heads are
kept in a bounded cache by ``ml.fewshot.support_set_key`` (model, classes, zero-shot weights, support
embeddings and labels, method), and concurrent requests with the same key share one fit (single flight).

The query images are embedded like the examples: for CLIP/SigLIP the classify forward is the normalised
embedding (shared with zero-shot classify through the cache), for ``custom`` and ``timm`` the embed path
(pooled pre-logits features). Their confidences are the head's softmax over the classes, ranked with the
request's ``top_k`` and ``threshold`` as any classify result; every part carries the ``few_shot`` summary.

Classes without examples keep their zero-shot weights where there is a text tower (clip, siglip); without
one (custom, timm) they are an ``invalid_request`` naming them.

Multi-label (``multi_label: true``, examples with ``labels``): one-vs-rest heads (``ml.fewshot_multilabel``), one
logistic head per class on the embeddings, anchored at the zero-shot per-class logit where there is a text tower
(SigLIP's sigmoid, CLIP's class-vs-neutral-prompt rule) and fitted in the same fit pool and head cache. A class
without a positive example keeps its zero-shot rule (clip, siglip) or is an ``invalid_request`` (custom, timm).
Results are the multi-label classify result: independent probabilities, ``top_k`` caps, ``threshold`` per class,
``labels`` (the classes of the predictions), no ``margin``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING

import numpy as np
import structlog
import torch

from handlers.admission import Budget, admit
from handlers.errors import InvalidRequest
from handlers.manifests import read_manifest
from handlers.parts import json_bytes, part_size_for, parts_in_order, rank
from ml import fewshot_multilabel
from ml.fewshot import (
    FewShotError,
    FewShotResult,
    SupportSet,
    ZeroShotWeights,
    fit_few_shot,
    support_set_key,
)
from schemas.annotation import (
    MAX_CLASSES,
    AnnotationRequest,
    AnnotationResult,
    FewShotSummary,
    ImageRef,
    ImageResult,
    LabeledExample,
    Prediction,
    example_label_names,
    examples_problem,
    prompt_volume_problem,
)

if TYPE_CHECKING:
    from handlers.context import AnnotationContext
    from handlers.embedding import EmbedHandler

log = structlog.get_logger("cls.fewshot")

MAX_FEW_SHOT_EXAMPLES_LIMIT = "CLS_FEWSHOT_MAX_EXAMPLES"
MANIFEST_BYTES_PER_EXAMPLE = 8 * 1024
"""A manifest line is a URL (<= 4096 characters) and a label (<= 200): a manifest of N examples may be this many
bytes per example (plus 1 MiB), so an oversized object is refused before it is parsed."""
SUMMARY_BYTES = len('"few_shot":{"method":"logistic_regression","examples_per_class":{},"examples_failed":10000,'
                    '"cv_accuracy":0.12345678901234567,"fitted":false},')
PER_CLASS_BYTES = len(':10000,')


def summary_bytes(classes: Sequence[str]) -> int:
    """Upper bound of the encoded ``few_shot`` summary over ``classes`` (counted in a part's envelope)."""
    return SUMMARY_BYTES + sum(json_bytes(c) + PER_CLASS_BYTES for c in classes)


def model_key_text(key: object) -> str:
    return "\x1f".join(str(getattr(key, name)) for name in ("family", "variant", "weights"))


class FewShotClassifier:
    """``classify(request) -> async iterator of AnnotationResult parts`` for a classify request with examples."""

    def __init__(self, ctx: AnnotationContext, embedder: EmbedHandler) -> None:
        self.ctx = ctx
        self.embedder = embedder

    async def examples(self, request: AnnotationRequest) -> list[LabeledExample]:
        """The support set as given: inline, or read from ``examples_url``; bounded by CLS_FEWSHOT_MAX_EXAMPLES."""
        limit = self.ctx.fewshot.max_examples
        if request.examples is not None:
            if len(request.examples) > limit:
                raise InvalidRequest(f"{len(request.examples)} examples; this worker accepts at most {limit} per "
                                     f"request ({MAX_FEW_SHOT_EXAMPLES_LIMIT})")
            return list(request.examples)
        assert request.examples_url is not None
        max_bytes = min(self.ctx.manifest_limits.max_bytes, 2**20 + limit * MANIFEST_BYTES_PER_EXAMPLE)
        examples = await read_manifest(self.ctx.fetcher, request.examples_url, LabeledExample, executors=self.ctx.executors,
                                       error_code="invalid_request", limits=self.ctx.manifest_limits, max_lines=limit,
                                       max_bytes=max_bytes, limit_name=MAX_FEW_SHOT_EXAMPLES_LIMIT)
        if not examples:
            raise InvalidRequest(f"manifest {request.examples_url} holds no examples")
        return examples

    @staticmethod
    def classes_of(request: AnnotationRequest, examples: Sequence[LabeledExample]) -> list[str]:
        """The request's classes; without them, the examples' labels (sorted). Labels must be among the classes."""
        labels = example_label_names(list(examples))
        if request.classes:
            unknown = sorted(labels - set(request.classes))
            if unknown:
                raise InvalidRequest(f"example labels that are not among the classes: {unknown[:10]}"
                                     + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
            return list(request.classes)
        if len(labels) > MAX_CLASSES:
            raise InvalidRequest(f"{len(labels)} distinct example labels; at most {MAX_CLASSES} classes")
        return sorted(labels)

    async def classify(self, request: AnnotationRequest) -> AsyncIterator[AnnotationResult]:
        ctx = self.ctx
        started = time.monotonic()
        request_id = request.request_id or ""
        key = ctx.model_config.key_for(request.model, request.model_variant, request.model_url)
        model = await ctx.models.get(key)
        examples = await self.examples(request)
        if request.examples_url is not None:  # inline examples were checked by the schema
            problem = examples_problem(examples, request.multi_label, request.classes,
                                       where=f"manifest {request.examples_url} entry {{i}}")
            if problem:
                raise InvalidRequest(problem)
        classes = self.classes_of(request, examples)
        # the fit's work grows with classes x examples x dim: admitted before any example is fetched or embedded
        admit(Budget("fewshot_fit", ctx.fewshot.max_fit_cost, "CLS_FEWSHOT_MAX_FIT_COST", unit="count"),
              len(classes) * len(examples) * model.dim,
              f"a few-shot fit of {len(classes)} classes x {len(examples)} examples x {model.dim}-d embeddings",
              hint="send fewer classes or examples")
        if request.multi_label:
            async for part in self._classify_multi_label(request, model, examples, classes, started):
                yield part
            return
        has_text = request.model in ("clip", "siglip")
        zero_shot = None
        text_cache_hit = None
        if has_text:
            rows, text_cache_hit = await self._class_text(request, model, classes, classes)
            zero_shot = ZeroShotWeights(rows.numpy(), float(model.model.logit_scale))
        else:
            self._check_every_class_has_examples(classes, {example.label for example in examples})

        priority = request.priority or "bulk"
        window = self._window(request, examples, priority)
        support, failed = await self._support_set(model, examples, classes, request_id, priority, window)
        method = request.few_shot.method if request.few_shot is not None else "auto"
        head_key = await ctx.executors.on_cpu(support_set_key, model_key_text(model.key), support, method, zero_shot)
        try:
            head, fitted = await ctx.fewshot_heads.get_or_fit(
                head_key, functools.partial(fit_few_shot, support, method, zero_shot), ctx.executors)
        except FewShotError as exc:  # e.g. a class whose every example failed, without a text tower
            raise InvalidRequest(str(exc)) from exc
        summary = FewShotSummary(
            method=head.method, examples_per_class=dict(head.examples_per_class), examples_failed=failed,
            cv_accuracy=None if head.cv_accuracy is None else round(float(head.cv_accuracy), 6), fitted=fitted)
        top_k = request.top_k_for(len(classes))
        parts = self._parts(request, classes, multi_label=False)

        def handle(image: ImageRef) -> Awaitable[torch.Tensor | ImageResult]:
            return self._query_embedding(model, image, request_id, priority, window)

        failed_images = 0
        async with aclosing(parts_in_order(parts, handle)) as stream:
            async for k, part_images, outputs in stream:
                results = await self._part_results(head, part_images, outputs, classes, top_k, request.threshold)
                failed_images += sum(1 for r in results if r.error is not None)
                yield AnnotationResult.completed_part(
                    request_id, k, len(parts),
                    model=model.descriptor,
                    results=results,
                    few_shot=summary,
                )
        log.info(
            "few_shot_summary",
            model=model.descriptor.variant,
            family=model.descriptor.family,
            method=head.method,
            requested_method=method,
            examples=len(examples),
            examples_failed=failed,
            classes=len(classes),
            cv_accuracy=summary.cv_accuracy,
            fitted=fitted,
            images=len(request.images),
            failed_images=failed_images,
            parts=len(parts),
            part_size=len(parts[0]) if parts else 0,
            text_cache=None if text_cache_hit is None else ("hit" if text_cache_hit else "miss"),
            batches_shared=ctx.batcher.forget(request_id),
            seconds=round(time.monotonic() - started, 3),
        )

    async def _classify_multi_label(self, request: AnnotationRequest, model, examples: Sequence[LabeledExample],  # noqa: ANN001
                                    classes: list[str], started: float) -> AsyncIterator[AnnotationResult]:
        """Few-shot with tag sets: one-vs-rest heads over the zero-shot per-class logits (see the module docstring)."""
        ctx = self.ctx
        request_id = request.request_id or ""
        text: torch.Tensor | None = None  # clip/siglip: the text rows of the zero-shot multi-label rule
        text_cache_hit = None
        if request.model in ("clip", "siglip"):
            text, text_cache_hit = await self._class_text(request, model, classes,
                                                          classes + list(model.multi_label_extra_classes))
        else:
            self._check_every_class_has_examples(classes, example_label_names(list(examples)))
        priority = request.priority or "bulk"
        window = self._window(request, examples, priority)
        vectors, used, failed = await self._embed_examples(model, examples, request_id, priority, window)
        label_sets = [list(example.labels or ()) for example in used]
        embeddings, zero_shot = await ctx.executors.on_cpu(_multi_label_inputs, model, vectors, text)
        head_key = await ctx.executors.on_cpu(fewshot_multilabel.support_key, model_key_text(model.key), embeddings,
                                              label_sets, classes, zero_shot)
        try:
            fit, fitted = await ctx.fewshot_heads.get_or_fit(
                head_key, functools.partial(fewshot_multilabel.fit, embeddings, label_sets, classes, zero_shot),
                ctx.executors)
        except FewShotError as exc:  # e.g. a class whose every positive example failed, without a text tower
            raise InvalidRequest(str(exc)) from exc
        summary = FewShotSummary(method=fit.method, examples_per_class=dict(fit.examples_per_class),
                                 examples_failed=failed, cv_accuracy=None, fitted=fitted)
        top_k = request.top_k_for(len(classes))
        parts = self._parts(request, classes, multi_label=True)

        def handle(image: ImageRef) -> Awaitable[torch.Tensor | ImageResult]:
            return self._query_embedding(model, image, request_id, priority, window)

        failed_images = 0
        async with aclosing(parts_in_order(parts, handle)) as stream:
            async for k, part_images, outputs in stream:
                good = [i for i, out in enumerate(outputs) if isinstance(out, torch.Tensor)]
                ranked: list[list[Prediction]] = []
                if good:
                    ranked = await ctx.executors.on_cpu(_rank_multi_label, fit.head, model, text,
                                                        [outputs[i] for i in good], classes, top_k, request.threshold)
                row_of = {index: row for row, index in enumerate(good)}
                results = [out if isinstance(out, ImageResult) else
                           ImageResult(id=image.id, predictions=ranked[row_of[i]],
                                       labels=[p.class_name for p in ranked[row_of[i]]])
                           for i, (image, out) in enumerate(zip(part_images, outputs, strict=True))]
                failed_images += sum(1 for r in results if r.error is not None)
                yield AnnotationResult.completed_part(request_id, k, len(parts), model=model.descriptor,
                                                      results=results, few_shot=summary)
        log.info("few_shot_summary", model=model.descriptor.variant, family=model.descriptor.family,
                 method=fit.method, multi_label=True, examples=len(examples), examples_failed=failed,
                 classes=len(classes), fitted=fitted, images=len(request.images), failed_images=failed_images,
                 parts=len(parts), part_size=len(parts[0]) if parts else 0,
                 text_cache=None if text_cache_hit is None else ("hit" if text_cache_hit else "miss"),
                 batches_shared=ctx.batcher.forget(request_id), seconds=round(time.monotonic() - started, 3))

    async def _class_text(self, request: AnnotationRequest, model, classes: list[str],  # noqa: ANN001
                          text_classes: list[str]) -> tuple[torch.Tensor, bool]:
        """The prompt ensemble of ``text_classes`` (the request's templates, else the default ones) as float32 rows
        on the CPU, and whether the text cache had it; InvalidRequest when ``classes`` x templates is over the
        prompt volume bound."""
        ctx = self.ctx
        templates = request.prompt_templates or ctx.config.default_templates
        problem = prompt_volume_problem(classes, templates, "templates" if request.prompt_templates
                                        else "default templates (CLS_DEFAULT_PROMPT_TEMPLATES)")
        if problem:
            raise InvalidRequest(problem)
        prepared, text_cache_hit = await model.prepare(text_classes, templates, ctx.executors)
        if ctx.on_text_cache is not None:
            ctx.on_text_cache(text_cache_hit)
        return prepared.float().cpu(), text_cache_hit

    def _window(self, request: AnnotationRequest, examples: Sequence[LabeledExample], priority: str) -> asyncio.Semaphore:
        """The request's admission window: a bulk request's images and examples share the worker's
        ``request_window``; an interactive request admits them all at once."""
        return asyncio.Semaphore(self.ctx.config.request_window if priority == "bulk"
                                 else len(request.images) + len(examples))

    @staticmethod
    def _check_every_class_has_examples(classes: Sequence[str], labels: set[str]) -> None:
        missing = [c for c in classes if c not in labels]
        if missing:
            raise InvalidRequest(f"classes without examples and no text tower to fall back to: {missing[:10]}"
                                 + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
                                 + " (give examples of every class, or use clip/siglip for a zero-shot fallback)")

    async def _support_set(self, model, examples: Sequence[LabeledExample], classes: Sequence[str],  # noqa: ANN001
                           request_id: str, priority: str, window: asyncio.Semaphore) -> tuple[SupportSet, int]:
        """Embed every example (:meth:`_embed_examples`); (the support set of those that worked, how many failed)."""
        vectors, used, failed = await self._embed_examples(model, examples, request_id, priority, window)
        try:
            support = await self.ctx.executors.on_cpu(_support, vectors, [e.label for e in used], classes)
        except FewShotError as exc:
            raise InvalidRequest(str(exc)) from exc
        return support, failed

    async def _embed_examples(self, model, examples: Sequence[LabeledExample], request_id: str,  # noqa: ANN001
                              priority: str, window: asyncio.Semaphore
                              ) -> tuple[list[torch.Tensor], list[LabeledExample], int]:
        """Embed every example (concurrently, under the request's window; a URL named twice is fetched once);
        (the embeddings of those that worked, those examples, how many failed). None worked: InvalidRequest."""
        embedder = self.embedder
        urls = list(dict.fromkeys(example.url for example in examples))
        refs = [ImageRef(id=f"example-{i}", url=url) for i, url in enumerate(urls)]
        tasks = [asyncio.ensure_future(embedder.embed_image(model, ref, request_id, priority, window)) for ref in refs]
        try:
            embedded = await asyncio.gather(*tasks)
        except BaseException:  # one failed beyond an image error (or the request was cancelled): stop the others
            for task in tasks:
                task.cancel()
            raise
        output_of = dict(zip(urls, embedded, strict=True))
        vectors: list[torch.Tensor] = []
        used: list[LabeledExample] = []
        errors: Counter[str] = Counter()
        for example in examples:
            out = output_of[example.url]
            if isinstance(out, ImageResult):
                errors[out.error.code if out.error else "unknown"] += 1
                continue
            vectors.append(out[1])
            used.append(example)
        failed = sum(errors.values())
        if failed:
            log.info("few_shot_examples_failed", request_id=request_id, failed=failed, codes=dict(errors))
        if not vectors:
            codes = ", ".join(f"{code} x{n}" for code, n in errors.most_common(5))
            raise InvalidRequest(f"none of the {len(examples)} examples could be used ({codes})")
        return vectors, used, failed

    def _parts(self, request: AnnotationRequest, classes: Sequence[str], multi_label: bool) -> list[list[ImageRef]]:
        """The request's images in result parts, sized so a part with the few-shot summary fits its budget."""
        config = self.ctx.config
        size = part_size_for(request, config.part_size, list(classes), config.part_budget_bytes,
                             extra_envelope_bytes=summary_bytes(list(classes)), multi_label=multi_label)
        images = request.images
        return [images[i:i + size] for i in range(0, len(images), size)]

    async def _query_embedding(self, model, image: ImageRef, request_id: str, priority: str,  # noqa: ANN001
                               window: asyncio.Semaphore) -> torch.Tensor | ImageResult:
        """One query image -> its normalised embedding, or an error entry. Zero-shot models: the classify path
        (its forward is the embedding, staged to the device, cached); custom and timm: the embed path."""
        if model.forward_is_embedding and getattr(model, "stage", None) is not None:
            return await self.embedder.forward_image(model, image, request_id, priority, window)
        out = await self.embedder.embed_image(model, image, request_id, priority, window)
        return out if isinstance(out, ImageResult) else out[1]

    async def _part_results(self, head: FewShotResult, images: Sequence[ImageRef], outputs: list,
                            classes: Sequence[str], top_k: int, threshold: float) -> list[ImageResult]:
        good = [i for i, out in enumerate(outputs) if isinstance(out, torch.Tensor)]
        ranked: list[tuple[list[Prediction], float]] = []
        if good:  # the head is numpy: scoring in the CPU pool
            ranked = await self.ctx.executors.on_cpu(_rank_rows, head, [outputs[i] for i in good], classes, top_k,
                                                     threshold)
        row_of = {index: row for row, index in enumerate(good)}
        results: list[ImageResult] = []
        for i, image in enumerate(images):
            out = outputs[i]
            if isinstance(out, ImageResult):
                results.append(out)
                continue
            predictions, margin = ranked[row_of[i]]
            results.append(ImageResult(id=image.id, predictions=predictions, margin=round(margin, 6)))
        return results


def _support(vectors: list[torch.Tensor], labels: list[str], classes: Sequence[str]) -> SupportSet:
    embeddings = torch.stack([v.float().cpu() for v in vectors]).numpy()
    return SupportSet.from_examples(embeddings, labels, classes)


def _rank_rows(head: FewShotResult, rows: list[torch.Tensor], classes: Sequence[str], top_k: int,
               threshold: float) -> list[tuple[list[Prediction], float]]:
    features = torch.stack([r.float().cpu() for r in rows]).numpy()
    probabilities = torch.from_numpy(np.ascontiguousarray(head.probabilities(features)))
    return [rank(row, classes, top_k, threshold) for row in probabilities]


def _multi_label_inputs(model, vectors: list[torch.Tensor],  # noqa: ANN001
                        text: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The support embeddings ``[N, D]`` and their zero-shot per-class logits ``[N, C]`` (None without text)."""
    features = torch.stack([v.float().cpu() for v in vectors])
    zero_shot = None if text is None else model.model.multi_label_logits(features, text).double().numpy()
    return features.numpy(), zero_shot


def _rank_multi_label(head: fewshot_multilabel.OneVsRestHead, model, text: torch.Tensor | None,  # noqa: ANN001
                      rows: list[torch.Tensor], classes: Sequence[str], top_k: int,
                      threshold: float) -> list[list[Prediction]]:
    features, zero_shot = _multi_label_inputs(model, rows, text)
    probabilities = torch.from_numpy(np.ascontiguousarray(head.probabilities(features, zero_shot)))
    return [rank(row, classes, top_k, threshold)[0] for row in probabilities]
