"""A request's images in result parts: handled in order, one part ahead (``parts_in_order``, shared by
classify, embed and audit); how many images a part holds so its JSON stays within a budget
(``part_size_for``); one image's ranked predictions (``rank``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import torch

from schemas.annotation import MAX_IMAGE_ERROR_CHARS, AnnotationRequest, Prediction

T = TypeVar("T")
R = TypeVar("R")


async def parts_in_order(parts: Sequence[Sequence[T]],
                         handle: Callable[[T], Awaitable[R]]) -> AsyncIterator[tuple[int, Sequence[T], list[R]]]:
    """Yield ``(k, part k's items, their outputs)`` for each part in order.

    Part k+1's items are started when part k is awaited, so fetching and decoding overlap the model
    (admission is bounded by the caller's ``handle``: its window and budgets). When a part fails, or the
    consumer stops early (use ``contextlib.aclosing``), every task still pending is cancelled.
    """
    tasks: dict[int, list[asyncio.Task[R]]] = {}

    def start(k: int) -> None:
        tasks[k] = [asyncio.ensure_future(handle(item)) for item in parts[k]]

    try:
        if parts:
            start(0)
        for k, items in enumerate(parts):
            if k + 1 < len(parts):
                start(k + 1)
            current = tasks.pop(k)
            try:
                outputs = list(await asyncio.gather(*current))
            except BaseException:
                for task in current:
                    task.cancel()
                raise
            yield k, items, outputs
    finally:
        for pending in tasks.values():
            for task in pending:
                task.cancel()


PART_BUDGET_BYTES = 512 * 1024
"""A result part is kept well below 1 MB (Kafka's default max message size) and CLS_MAX_RECORD_BYTES."""


def part_size_for(request: AnnotationRequest, configured: int, class_names: Sequence[str],
                  budget_bytes: int = PART_BUDGET_BYTES, extra_envelope_bytes: int = 0, multi_label: bool = False) -> int:
    """N for this request: the configured part size, lowered so a part's JSON stays within ``budget_bytes``.

    The bound is on the encoded size of the worst case of every image (its id, ``top_k`` of the longest
    class names, or an error entry whose message is cut to ``MAX_IMAGE_ERROR_CHARS``), so it holds
    whatever the outcome; and it depends only on the request (and the model's class names), so a
    redelivery gets the same parts. ``extra_envelope_bytes``: a bound of what else every part carries (the
    few-shot summary). ``multi_label``: every image also lists up to ``top_k`` class names as its ``labels`` (and as its
    ``accepted_labels`` when the request set ``auto_accept_precision``).
    """
    top_k = request.top_k_for(len(class_names))
    longest_class = max((json_bytes(c) for c in class_names), default=10)
    longest_id = max(json_bytes(img.id) for img in request.images)
    predictions = 2 + top_k * (longest_class + len('{"class":,"confidence":0.12345678901234567},'))
    error = len('"error":{"code":"","message":""}') + 64 + 2 * MAX_IMAGE_ERROR_CHARS  # 2: escaped quotes and backslashes
    per_image = len('{"id":,"predictions":,"margin":-0.12345678901234567,"auto_accept":false},') + longest_id + predictions + error
    if multi_label:
        per_image += len('"labels":[],') + top_k * (longest_class + 1)
        if request.auto_accept_precision is not None:
            per_image += len('"accepted_labels":[],') + top_k * (longest_class + 1)
    envelope = 2048 + extra_envelope_bytes  # request id, model descriptor, part fields, created_at
    return max(1, min(configured, (budget_bytes - envelope) // per_image))


def json_bytes(text: str) -> int:
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
