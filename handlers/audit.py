"""The audit task: which of a labeled set's current labels are probably wrong, in review order.

Per request: check the output location's fence, read the images (inline, or a JSON Lines manifest of up to
CLS_AUDIT_MAX_IMAGES lines, streamed and parsed in the CPU pool) and their labels, refuse what cannot be audited (a label
outside ``classes``, a single label, a label held by one image, more images x classes than CLS_AUDIT_MAX_CELLS)
before any image is fetched, then embed every image through :meth:`EmbedHandler.embed_image` (fenced fetch,
embedding cache, micro-batched forward) into one preallocated float32 matrix, a chunk of images at a time.
Failed images become error entries and are left out of the fit. ``ml.audit.audit`` (k-fold logistic regression,
confident learning, neighbours, disagreeing near-duplicates) runs in the CPU pool, never on the event loop or
the GPU thread.

Before the first part is published, three objects are written under ``<output>/<request id>/``:
``embeddings.npz`` (``ml.embedding_files``: the audited images' vectors, request order), ``audit.csv`` (the
whole table in review order, :data:`CSV_COLUMNS`) and, when the conflicts do not fit the last part's record,
``label_conflicts.json``. Parts are in review order (rank order: highest issue score first, ties in request
order, failed images last); with fixed seeds and the same embeddings a redelivery yields the same parts, ids
and files. Each part's JSON has a known maximum size (:func:`audit_part_size`).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import structlog

from handlers.admission import Budget, admit
from handlers.embedding import EmbedHandler
from handlers.errors import InvalidRequest, PermanentError
from handlers.keys import key_segment
from handlers.manifests import read_manifest
from handlers.parts import json_bytes, parts_in_order
from ml.audit import AuditError, AuditOptions, AuditTable, audit
from ml.embedding_files import EMBEDDINGS_CONTENT_TYPE, write_embeddings
from schemas.annotation import (
    MAX_CLASSES,
    MAX_IMAGE_ERROR_CHARS,
    AnnotationResult,
    AuditEntry,
    AuditImage,
    AuditRequest,
    AuditSummary,
    ImageRef,
    ImageResult,
    LabelConflict,
    audit_label_problem,
    unique_image_ids,
)

if TYPE_CHECKING:
    from handlers.context import AnnotationContext, AuditConfig
    from handlers.model_handles import EmbeddingHandle
    from handlers.storage import ObjectStore

log = structlog.get_logger("cls.audit")

T = TypeVar("T", bound=ImageRef)

AUDIT_FILE = "audit.csv"
AUDIT_EMBEDDINGS_FILE = "embeddings.npz"
LABEL_CONFLICTS_FILE = "label_conflicts.json"
CSV_COLUMNS = ("id", "label", "label_probability", "label_issue", "suggested_label", "suggested_probability",
               "issue_score", "outlier_score", "error")
"""The columns of ``audit.csv`` (a header row, then one row per image in review order; a failed image has
its id, label and error code, the other cells empty; ``label_issue`` is ``true`` or ``false``)."""
DECIMALS = 6
"""Scores are rounded to this many decimals, the same in the parts and in the CSV."""
EMBED_CHUNK = 256
"""Images started at once (one chunk ahead, as parts are): 100,000 tasks at once would cost memory, not speed."""


def audit_part_size(images: Sequence[AuditImage], classes: Sequence[str], configured: int, budget_bytes: int) -> int:
    """N for an audit: the configured part size, lowered so a part's JSON (audit entries or error entries, the
    envelope with its URLs and summary) stays within ``budget_bytes``; depends only on the request."""
    longest_id = max(json_bytes(image.id) for image in images)
    longest_class = max(json_bytes(c) for c in classes)
    number = 24  # a rounded score or a rank, with its separator
    entry = (len('"audit":{"label":,"label_probability":,"label_issue":false,"suggested_label":,'
                 '"suggested_probability":,"issue_score":,"outlier_score":,"rank":}') + 2 * longest_class + 5 * number)
    error = len('"error":{"code":"","message":""}') + 64 + 2 * MAX_IMAGE_ERROR_CHARS
    per_image = len('{"id":,"predictions":[],},') + longest_id + max(entry, error)
    envelope = 2048 + 3 * 4096 + 1024  # ids, model, part fields, three URLs (each <= 4096), the summary
    return max(1, min(configured, (budget_bytes - envelope) // per_image))


def checked_output(ctx: AnnotationContext, store: ObjectStore | None, output_path: str | None, what: str) -> str:
    """The request's output prefix (default CLS_EMBED_OUTPUT_PATH), checked against the storage fence before any
    work: ``invalid_request`` without one, ``storage_unwritable`` without a store, ``blocked_url`` /
    ``unsupported_url`` from the store's check. ``what`` names the file(s) for the messages."""
    output = output_path or ctx.embed_config.output_path
    if output is None:
        raise InvalidRequest(f"no output_path and no default (CLS_EMBED_OUTPUT_PATH): nowhere to store {what}")
    if store is None:
        raise PermanentError("storage_unwritable", f"this worker has no object storage to write {what} to")
    store.check(output)  # blocked_url / unsupported_url before any work
    return output


def request_folder(prefix: str, request_id: str) -> str:
    """``<prefix>/<request id>`` (the id as one key segment, ``handlers.keys.key_segment``, as the embed task's
    part files)."""
    return f"{prefix.rstrip('/')}/{key_segment(request_id)}"


@dataclass(frozen=True)
class _Review:
    """The audit in review order: request positions, and per audited position its entry's fields."""

    order: list[int]
    entries: dict[int, dict[str, Any]]
    conflicts: list[LabelConflict]
    summary: AuditSummary


class AuditHandler:
    """``handle(request) -> async iterator of AnnotationResult parts`` for ``"task": "audit"``."""

    def __init__(self, ctx: AnnotationContext, embedder: EmbedHandler) -> None:
        self.ctx = ctx
        self.embedder = embedder

    async def handle(self, request: AuditRequest) -> AsyncIterator[AnnotationResult]:
        ctx = self.ctx
        config = ctx.audit_config
        store = self.embedder.store
        started = time.monotonic()
        request_id = request.request_id or ""
        output = checked_output(ctx, store, request.output_path, "the audit table")
        images = await self._images(request, config)
        classes = list(request.classes) if request.classes else sorted({image.label for image in images})
        problem = audit_label_problem([image.label for image in images], request.classes)
        if problem:
            raise InvalidRequest(problem)
        if len(classes) > MAX_CLASSES:
            raise InvalidRequest(f"{len(classes)} distinct labels; an audit takes at most {MAX_CLASSES} classes")
        admit(Budget("audit_cells", config.max_cells, "CLS_AUDIT_MAX_CELLS", unit="count"), len(images) * len(classes),
              f"{len(images)} images x {len(classes)} classes")
        key = ctx.model_config.key_for(request.model, request.model_variant, request.model_url)
        model: EmbeddingHandle = await ctx.models.get(key)
        priority = request.priority or "bulk"
        matrix, errors = await self._embed_all(model, images, request_id, priority)

        good = np.array([p for p in range(len(images)) if p not in errors], dtype=np.int64)
        class_index = {name: i for i, name in enumerate(classes)}
        labels = np.array([class_index[image.label] for image in images], dtype=np.int64)
        embeddings = matrix if not errors else matrix[good]
        del matrix
        options = AuditOptions(folds=request.options.folds, neighbours=request.options.neighbours,
                               duplicate_threshold=request.options.duplicate_threshold, jobs=config.jobs)
        try:
            table = await ctx.executors.on_fit(fit_audit, embeddings, labels[good], len(classes), options)
        except AuditError as exc:
            if errors:
                first = next(iter(errors.values())).error
                raise InvalidRequest(f"{len(errors)} of {len(images)} images failed (first: {first.code if first else '?'}); "
                                     f"the rest cannot be audited: {exc}") from exc
            raise InvalidRequest(f"cannot audit these images: {exc}") from exc
        budget = ctx.config.part_budget_bytes
        review = await ctx.executors.on_cpu(review_order, images, classes, good, errors, table)

        folder = request_folder(output, request_id)
        embeddings_url = f"{folder}/{AUDIT_EMBEDDINGS_FILE}"
        data = await ctx.executors.on_cpu(write_embeddings, [images[p].id for p in good.tolist()], embeddings)
        del embeddings
        await store.put_bytes(embeddings_url, data, EMBEDDINGS_CONTENT_TYPE)
        audit_url = f"{folder}/{AUDIT_FILE}"
        table_csv = await ctx.executors.on_cpu(audit_csv, images, review, errors)
        await store.put_bytes(audit_url, table_csv, "text/csv; charset=utf-8")
        conflicts, conflicts_url = await self._fit_conflicts(review.conflicts, folder, budget // 4)

        size = audit_part_size(images, classes, ctx.config.part_size, budget - budget // 4)
        order = review.order
        parts = (len(order) + size - 1) // size
        for k in range(parts):
            results = []
            for position in order[k * size:(k + 1) * size]:
                if position in errors:
                    results.append(errors[position])
                else:
                    results.append(ImageResult(id=images[position].id, audit=AuditEntry(**review.entries[position])))
            last = k == parts - 1
            yield AnnotationResult.completed_part(
                request_id, k, parts,
                task="audit",
                model=model.descriptor,
                results=results,
                embeddings_url=embeddings_url,
                dim=model.dim,
                audit_url=audit_url,
                audit_summary=review.summary,
                label_conflicts=conflicts if last else None,
                label_conflicts_url=conflicts_url if last else None,
            )
        log.info("audit_summary", model=model.descriptor.variant, family=model.descriptor.family, images=len(images),
                 failed_images=len(errors), classes=len(classes), folds=table.folds,
                 label_issues=review.summary.label_issues, label_conflicts=len(review.conflicts), parts=parts,
                 part_size=size, batches_shared=ctx.batcher.forget(request_id),
                 seconds=round(time.monotonic() - started, 3))

    async def _images(self, request: AuditRequest, config: AuditConfig) -> list[AuditImage]:
        """The request's images, inline or from its manifest (bounded by CLS_AUDIT_MAX_IMAGES lines)."""
        return await listed_images(self.ctx, request.images, request.manifest_url, AuditImage, config.max_images,
                                   "an audit")

    async def _embed_all(self, model: EmbeddingHandle, images: Sequence[AuditImage], request_id: str,
                         priority: str) -> tuple[np.ndarray, dict[int, ImageResult]]:
        return await embed_matrix(self.embedder, model, images, request_id, priority)

    async def _fit_conflicts(self, conflicts: list[LabelConflict], folder: str,
                             budget: int) -> tuple[list[LabelConflict], str | None]:
        """The conflicts that fit ``budget`` bytes of the last part; all of them in a JSON file when some do not."""
        kept: list[LabelConflict] = []
        used = 0
        for conflict in conflicts:
            used += len(conflict.model_dump_json().encode()) + 1
            if used > budget:
                break
            kept.append(conflict)
        if len(kept) == len(conflicts):
            return kept, None
        url = f"{folder}/{LABEL_CONFLICTS_FILE}"
        body = json.dumps([c.model_dump() for c in conflicts]).encode()
        await self.embedder.store.put_bytes(url, body, "application/json")  # type: ignore[union-attr]
        return kept, url


async def listed_images(ctx: AnnotationContext, inline: Sequence[T] | None, url: str | None, entry: type[T],
                        max_images: int, what: str) -> list[T]:
    """A request's images, inline or from a JSON Lines manifest at ``url`` (read through the fenced fetcher,
    parsed in the CPU pool), at most ``max_images`` (CLS_AUDIT_MAX_IMAGES); ids unique. ``what`` names the task."""
    if inline is not None:
        if len(inline) > max_images:
            raise InvalidRequest(f"{len(inline)} images; {what} is limited to CLS_AUDIT_MAX_IMAGES={max_images}")
        return list(inline)
    url = url or ""
    images = await read_manifest(ctx.fetcher, url, entry, executors=ctx.executors, error_code="invalid_request",
                                 limits=ctx.manifest_limits, max_lines=max_images, limit_name="CLS_AUDIT_MAX_IMAGES")
    if not images:
        raise InvalidRequest(f"manifest {url} has no entries")
    try:
        unique_image_ids(images)  # type: ignore[arg-type]
    except ValueError as exc:
        raise InvalidRequest(f"manifest {url}: {exc}") from exc
    return images


async def embed_matrix(embedder: EmbedHandler, model: EmbeddingHandle, images: Sequence[ImageRef], request_id: str,
                       priority: str) -> tuple[np.ndarray, dict[int, ImageResult]]:
    """Every image's normalised embedding (row = request position; zero for a failed image) and the error entries
    by position, through :meth:`EmbedHandler.embed_image` a chunk at a time. Images with the same bytes get the
    first one's vector (two forwards of the same pixels in different batches may differ in the last bits)."""
    ctx = embedder.ctx
    matrix = np.zeros((len(images), model.dim), dtype=np.float32)
    errors: dict[int, ImageResult] = {}
    first_of: dict[str, int] = {}
    window = asyncio.Semaphore(ctx.config.request_window if priority == "bulk" else max(1, min(len(images), EMBED_CHUNK)))
    chunks = [range(start, min(start + EMBED_CHUNK, len(images))) for start in range(0, len(images), EMBED_CHUNK)]

    def handle(position: int):  # noqa: ANN202 - the embedder's own return type
        return embedder.embed_image(model, images[position], request_id, priority, window)

    async with aclosing(parts_in_order(chunks, handle)) as stream:
        async for _, positions, outputs in stream:
            for position, out in zip(positions, outputs, strict=True):
                if isinstance(out, ImageResult):
                    errors[position] = out
                else:
                    digest, vector = out
                    if digest in first_of:
                        matrix[position] = matrix[first_of[digest]]
                    else:
                        first_of[digest] = position
                        matrix[position] = vector.float().numpy()
    return matrix, errors


def fit_audit(embeddings: np.ndarray, labels: np.ndarray, num_classes: int, options: AuditOptions) -> AuditTable:
    """``ml.audit.audit`` on the vectors as ``embeddings.npz`` stores them (float16), L2-normalised again, in
    place: the table is a function of the stored file, and noise in the last bits of a forward pass rarely
    reaches it."""
    embeddings[...] = embeddings.astype(np.float16)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    np.divide(embeddings, norms, out=embeddings, where=norms > 0)
    return audit(embeddings, labels, num_classes, options)


def _rounded(values: np.ndarray, low: float, high: float) -> list[float]:
    return np.round(np.clip(values.astype(np.float64), low, high), DECIMALS).tolist()


def review_order(images: Sequence[AuditImage], classes: Sequence[str], good: np.ndarray,
                 errors: dict[int, ImageResult], table: AuditTable) -> _Review:
    """The table in review order: audited images by issue score as published (rounded to :data:`DECIMALS`;
    highest first, ties in request order), then the failed ones in request order; each audited position's entry
    fields; the conflicts by id."""
    positions = good.tolist()
    issue_score = _rounded(table.issue_score, 0.0, 1.0)
    ranked = good[np.argsort(-np.asarray(issue_score), kind="stable")].tolist()  # ties as published: request order
    order = ranked + sorted(errors)
    label_probability = _rounded(table.label_probability, 0.0, 1.0)
    suggested_probability = _rounded(table.suggested_probability, 0.0, 1.0)
    outlier_score = _rounded(table.outlier_score, 0.0, 2.0)
    issue = table.label_issue.tolist()
    suggested = table.suggested_label.tolist()
    row_of = {position: row for row, position in enumerate(positions)}
    entries: dict[int, dict[str, Any]] = {}
    for rank, position in enumerate(ranked):
        row = row_of[position]
        entries[position] = {
            "label": images[position].label, "label_probability": label_probability[row], "label_issue": bool(issue[row]),
            "suggested_label": classes[suggested[row]], "suggested_probability": suggested_probability[row],
            "issue_score": issue_score[row], "outlier_score": outlier_score[row], "rank": rank,
        }
    conflicts = [LabelConflict(ids=[images[positions[i]].id, images[positions[j]].id],
                               labels=[images[positions[i]].label, images[positions[j]].label],
                               similarity=round(max(-1.0, min(1.0, similarity)), DECIMALS))
                 for i, j, similarity in table.duplicate_pairs]
    summary = AuditSummary(images=len(images), audited=len(positions), label_issues=int(table.label_issue.sum()),
                           label_conflicts=len(conflicts), classes=len(classes), folds=table.folds,
                           cv_accuracy=round(table.cv_accuracy, DECIMALS))
    return _Review(order=order, entries=entries, conflicts=conflicts, summary=summary)


FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
"""A text cell starting with one of these is read as a formula by spreadsheets (OWASP's CSV injection list)."""


def spreadsheet_text(value: str) -> str:
    """A text cell a spreadsheet shows as text: prefixed with ``'`` when it starts with a formula trigger."""
    return "'" + value if value.startswith(FORMULA_TRIGGERS) else value


def audit_csv(images: Sequence[AuditImage], review: _Review, errors: dict[int, ImageResult]) -> bytes:
    """``audit.csv``: the header :data:`CSV_COLUMNS`, then one row per image in review order (UTF-8, the csv
    module's quoting). Text cells (ids, labels, error codes) that start with ``=``, ``+``, ``-``, ``@``, a tab
    or a carriage return get a leading ``'`` (:func:`spreadsheet_text`), so no spreadsheet evaluates them."""
    text = spreadsheet_text
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for position in review.order:
        image = images[position]
        entry = review.entries.get(position)
        if entry is None:
            error = errors[position].error
            writer.writerow([text(image.id), text(image.label), "", "", "", "", "", "", text(error.code) if error else ""])
            continue
        writer.writerow([text(image.id), text(entry["label"]), entry["label_probability"],
                         "true" if entry["label_issue"] else "false", text(entry["suggested_label"]),
                         entry["suggested_probability"], entry["issue_score"], entry["outlier_score"], ""])
    return buffer.getvalue().encode("utf-8")
