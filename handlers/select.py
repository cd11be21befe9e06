"""The select task: which unlabeled pool images a person should label next.

Per request: check the output location's fence, read the pool (inline, or a JSON Lines manifest) and the labeled
set (inline, ``labeled_url``, or none: a cold start), refuse what cannot run (pool and labeled set over
CLS_AUDIT_MAX_IMAGES, images x classes over CLS_AUDIT_MAX_CELLS, a label outside ``classes``, an id in both sets,
a budget over the pool) before any image is fetched; then embed both sets through the audit's
:func:`handlers.audit.embed_matrix` (fenced fetch, embedding cache, micro-batched forward: a pool embedded for
duplicates or an audit is not embedded again) and run ``ml.select.select`` (near-duplicates, clustering, the head)
in the CPU pool; with a text tower (clip, siglip) and ``classes``, the zero-shot classifier's probabilities of the
pool (text embeddings through the text cache) are the uncertainty while no head can be fitted. The whole pool's
ranking is written as ``<output>/<request id>/selection.csv`` (:data:`CSV_COLUMNS`; a row at a time to a temporary
file, then uploaded) before the first part is published. Parts are in selection order (rank 0 first), then the pool images that failed as
error entries; seeded throughout, so a redelivery yields the same parts, ids and file.
"""

from __future__ import annotations

import csv
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import structlog

from handlers.audit import checked_output, embed_matrix, listed_images, request_folder
from handlers.embedding import EmbedHandler
from handlers.errors import InvalidRequest
from handlers.parts import json_bytes
from ml.select import SelectError, SelectOptions, Selection, select
from schemas.annotation import (
    MAX_CLASSES,
    MAX_IMAGE_ERROR_CHARS,
    AnnotationResult,
    AuditImage,
    ImageRef,
    ImageResult,
    Prediction,
    SelectEntry,
    SelectRequest,
    SelectSummary,
    prompt_volume_problem,
    select_inputs_problem,
)

if TYPE_CHECKING:
    from handlers.context import AnnotationContext
    from handlers.models import EmbeddingHandle
    from handlers.storage import ObjectStore

log = structlog.get_logger("cls.select")

SELECTION_FILE = "selection.csv"
CSV_COLUMNS = ("id", "rank", "score", "reason", "predicted", "predicted_confidence", "error")
"""The columns of ``selection.csv``: a header row, one row per selected image in rank order, one per other candidate
(ranks going on), one per near-duplicate left out (no rank, reason ``duplicate``), then one per failed pool image
(its id and error code, the other cells empty)."""
DECIMALS = 6


def select_part_size(pool: Sequence[ImageRef], classes: Sequence[str], configured: int, budget_bytes: int) -> int:
    """N for a selection: the configured part size, lowered so a part's JSON (select entries or error entries, the
    envelope with its URL and summary) stays within ``budget_bytes``; depends only on the request."""
    longest_id = max(json_bytes(image.id) for image in pool)
    longest_class = max((json_bytes(c) for c in classes), default=10)
    entry = (len('{"id":,"rank":,"score":,"reason":"uncertain","predicted":{"class":,"confidence":}},') + longest_id
             + longest_class + 3 * 24)
    error = len('{"id":,"predictions":[],"error":{"code":"","message":""}},') + longest_id + 64 + 2 * MAX_IMAGE_ERROR_CHARS
    envelope = 2048 + 4096 + 1024  # ids, model, part fields, the URL (<= 4096), the summary
    return max(1, min(configured, (budget_bytes - envelope) // max(entry, error)))


@dataclass(frozen=True)
class _Picked:
    entries: list[SelectEntry]
    summary: SelectSummary
    selection: Selection  # rows are positions among `good`
    good: np.ndarray  # the pool positions that were embedded
    classes: list[str]


def zero_shot_probabilities(model: EmbeddingHandle, pool_matrix: np.ndarray, prepared: object) -> np.ndarray:
    """``[N, C]`` zero-shot class probabilities of the pool vectors as stored (float16), a block at a time."""
    import torch

    out = []
    for start in range(0, pool_matrix.shape[0], 4096):
        block = torch.from_numpy(pool_matrix[start:start + 4096].astype(np.float16).astype(np.float32))
        device = getattr(prepared, "device", None)
        scores = model.confidences(block.to(device) if device is not None else block, prepared)  # type: ignore[attr-defined]
        out.append(scores.float().cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 0))


class SelectHandler:
    """``handle(request) -> async iterator of AnnotationResult parts`` for ``"task": "select"``."""

    def __init__(self, ctx: AnnotationContext, embedder: EmbedHandler) -> None:
        self.ctx = ctx
        self.embedder = embedder

    async def handle(self, request: SelectRequest) -> AsyncIterator[AnnotationResult]:
        ctx = self.ctx
        limits = ctx.audit_config
        store = self.embedder.store
        started = time.monotonic()
        request_id = request.request_id or ""
        output = checked_output(ctx, store, request.output_path, "the selection")
        store = cast("ObjectStore", store)
        zero_shot = request.model in ("clip", "siglip") and bool(request.classes)
        templates = list(ctx.config.default_templates)
        if zero_shot:
            problem = prompt_volume_problem(list(request.classes or ()), templates,
                                            "default templates (CLS_DEFAULT_PROMPT_TEMPLATES)")
            if problem:
                raise InvalidRequest(problem)
        pool = await listed_images(ctx, request.images, request.manifest_url, ImageRef, limits.max_images, "a selection")
        labeled: list[AuditImage] = []
        if request.labeled is not None or request.labeled_url is not None:
            labeled = await listed_images(ctx, request.labeled, request.labeled_url, AuditImage,
                                          max(1, limits.max_images - len(pool)), "a selection (pool and labeled)")
        if len(pool) + len(labeled) > limits.max_images:
            raise InvalidRequest(f"{len(pool)} pool + {len(labeled)} labeled images; a selection is limited to "
                                 f"CLS_AUDIT_MAX_IMAGES={limits.max_images}")
        problem = select_inputs_problem(pool, labeled, request.classes, request.budget)
        if problem:
            raise InvalidRequest(problem)
        classes = list(request.classes) if request.classes else sorted({image.label for image in labeled})
        if len(classes) > MAX_CLASSES:
            raise InvalidRequest(f"{len(classes)} distinct labels; a selection takes at most {MAX_CLASSES} classes")
        cells = (len(pool) + len(labeled)) * max(1, len(classes))
        if cells > limits.max_cells:
            raise InvalidRequest(f"{len(pool) + len(labeled)} images x {len(classes)} classes = {cells}; a selection is "
                                 f"limited to CLS_AUDIT_MAX_CELLS={limits.max_cells}")
        key = ctx.model_config.key_for(request.model, request.model_variant, request.model_url)
        model: EmbeddingHandle = await ctx.models.get(key)
        prepared = None
        if zero_shot:  # the class side of the zero-shot classifier (text cache), before any image is fetched
            prepared, text_cache_hit = await model.prepare(classes, templates, ctx.executors)  # type: ignore[attr-defined]
            if ctx.on_text_cache is not None:
                ctx.on_text_cache(text_cache_hit)
        priority = request.priority or "bulk"
        pool_matrix, pool_errors = await embed_matrix(self.embedder, model, pool, request_id, priority)
        labeled_matrix, labeled_errors = await embed_matrix(self.embedder, model, labeled, request_id, priority)
        if len(pool_errors) == len(pool):
            first = next(iter(pool_errors.values())).error
            raise InvalidRequest(f"none of the {len(pool)} pool images could be embedded "
                                 f"(first: {first.code if first else '?'})")
        probabilities = None
        if prepared is not None:
            probabilities = await ctx.executors.on_gpu(zero_shot_probabilities, model, pool_matrix, prepared)

        picked = await ctx.executors.on_cpu(run_selection, request, pool, labeled, classes, pool_matrix, pool_errors,
                                            labeled_matrix, labeled_errors, probabilities)
        del pool_matrix, labeled_matrix, probabilities
        folder = request_folder(output, request_id)
        selection_url = f"{folder}/{SELECTION_FILE}"
        failed = [pool_errors[position] for position in sorted(pool_errors)]
        with tempfile.TemporaryDirectory(prefix="cls-select-") as scratch:  # the whole pool's ranking: streamed
            table = Path(scratch) / SELECTION_FILE
            await ctx.executors.on_cpu(write_selection_csv, table, picked, pool, failed)
            await store.upload_file(table, selection_url, "text/csv; charset=utf-8")

        size = select_part_size(pool, classes, ctx.config.part_size, ctx.config.part_budget_bytes)
        items: list[SelectEntry | ImageResult] = [*picked.entries, *failed]
        parts = max(1, (len(items) + size - 1) // size)
        for k in range(parts):
            chunk = items[k * size:(k + 1) * size]
            yield AnnotationResult.completed_part(
                request_id, k, parts,
                task="select",
                model=model.descriptor,
                results=[item for item in chunk if isinstance(item, ImageResult)],
                selection=[item for item in chunk if isinstance(item, SelectEntry)],
                selection_url=selection_url,
                dim=model.dim,
                select_summary=picked.summary,
            )
        summary = picked.summary
        log.info("select_summary", model=model.descriptor.variant, family=model.descriptor.family,
                 strategy=summary.strategy, requested_strategy=summary.requested_strategy, pool=summary.pool,
                 labeled=summary.labeled, candidates=summary.candidates, selected=summary.selected,
                 failed_images=len(pool_errors) + len(labeled_errors), parts=parts, part_size=size,
                 batches_shared=ctx.batcher.forget(request_id), seconds=round(time.monotonic() - started, 3))


def run_selection(request: SelectRequest, pool: Sequence[ImageRef], labeled: Sequence[AuditImage],
                  classes: Sequence[str], pool_matrix: np.ndarray, pool_errors: dict[int, ImageResult],
                  labeled_matrix: np.ndarray, labeled_errors: dict[int, ImageResult],
                  zero_shot: np.ndarray | None = None) -> _Picked:
    """``ml.select.select`` on the embedded images (failed ones left out), as entries in rank order and a summary;
    ``zero_shot``: the pool's zero-shot probabilities (rows as ``pool_matrix``). The vectors are rounded to float16
    first, as the embed task stores them: last-bit noise of a forward pass rarely reaches the selection."""
    good = np.array([p for p in range(len(pool)) if p not in pool_errors], dtype=np.int64)
    good_labeled = np.array([p for p in range(len(labeled)) if p not in labeled_errors], dtype=np.int64)
    class_index = {name: i for i, name in enumerate(classes)}
    labels = np.array([class_index[labeled[p].label] for p in good_labeled.tolist()], dtype=np.int64)
    x = pool_matrix[good].astype(np.float16).astype(np.float32)
    y = labeled_matrix[good_labeled].astype(np.float16).astype(np.float32) if good_labeled.size else \
        np.zeros((0, pool_matrix.shape[1]), np.float32)
    options = SelectOptions(duplicate_threshold=request.options.duplicate_threshold, seed=request.options.seed,
                            rank_all=True)
    try:
        selection: Selection = select(x, y, labels, max(1, len(classes)), request.budget, request.strategy, options,
                                      zero_shot=None if zero_shot is None else zero_shot[good])
    except SelectError as exc:
        raise InvalidRequest(f"cannot select from these images: {exc}") from exc
    entries = []
    for rank, (row, score, reason) in enumerate(zip(selection.rows.tolist(), selection.scores.tolist(),
                                                    selection.reasons, strict=True)):
        predicted = None
        if selection.predicted is not None and selection.predicted_probability is not None:
            predicted = Prediction(class_name=classes[int(selection.predicted[rank])],
                                   confidence=round(min(1.0, max(0.0, float(selection.predicted_probability[rank]))),
                                                    DECIMALS))
        entries.append(SelectEntry(id=pool[int(good[row])].id, rank=rank, score=round(float(score), DECIMALS),
                                   reason=reason, predicted=predicted))  # type: ignore[arg-type]
    summary = SelectSummary(strategy=selection.strategy, requested_strategy=request.strategy, pool=len(pool),
                            embedded=int(good.size), candidates=selection.candidates, labeled=int(good_labeled.size),
                            labeled_failed=len(labeled_errors), classes=len(classes), selected=len(entries),
                            cv_accuracy=None if selection.cv_accuracy is None else round(selection.cv_accuracy, DECIMALS),
                            predicted_by=selection.predicted_by)
    return _Picked(entries=entries, summary=summary, selection=selection, good=good, classes=list(classes))


def write_selection_csv(path: Path, picked: _Picked, pool: Sequence[ImageRef], failed: Sequence[ImageResult]) -> None:
    """``selection.csv`` (the header :data:`CSV_COLUMNS`), the whole pool: the selected images in rank order (as the
    parts carry them), every other candidate in the strategy's order after them (ranks go on), the near-duplicates
    left out (no rank; reason ``duplicate``), then the failed pool images (their error code). UTF-8, the csv
    module's quoting; written a row at a time."""
    selection, good, classes = picked.selection, picked.good, picked.classes
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        for entry in picked.entries:
            predicted = entry.predicted
            writer.writerow([entry.id, entry.rank, entry.score, entry.reason, predicted.class_name if predicted else "",
                             predicted.confidence if predicted else "", ""])
        reason = picked.entries[0].reason if picked.entries else ""
        for k, (row, score) in enumerate(zip(selection.rest.tolist(), selection.rest_scores.tolist(), strict=True)):
            guess = confidence = ""
            if selection.rest_predicted is not None and selection.rest_probability is not None:
                guess = classes[int(selection.rest_predicted[k])]
                confidence = round(min(1.0, max(0.0, float(selection.rest_probability[k]))), DECIMALS)
            writer.writerow([pool[int(good[row])].id, len(picked.entries) + k, round(float(score), DECIMALS), reason,
                             guess, confidence, ""])
        for row in selection.duplicates.tolist():
            writer.writerow([pool[int(good[row])].id, "", "", "duplicate", "", "", ""])
        for result in failed:
            writer.writerow([result.id, "", "", "", "", "", result.error.code if result.error else ""])
