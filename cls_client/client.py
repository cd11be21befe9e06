"""Requests in, events out: what a backend needs to talk to the workers, and nothing that loads a model.

- :func:`build_request` validates a request body with the workers' own models (the same ``TypeAdapter`` the
  workers decode with) and gives it an id when it has none, so the caller knows the key to follow.
- :func:`encode_request` turns it into the record the workers expect: topic by ``task``, key = the
  request/job id, a UTF-8 JSON value, ``content-type`` and ``request-id`` / ``job-id`` headers.
- :func:`send_request` produces it (an ``AIOKafkaProducer`` the caller owns) and returns the id.
- :func:`read_event` is the reference fold's parsing (``examples/fold.py``): a record value that is a
  JSON object with a ``message_id`` and a known ``event_type``, else None (skip it, never crash);
  :func:`check_storable` rejects what SQL databases store differently or not at all.
  :func:`parse_event` validates an event with the contract's models.
- :func:`wait_for_events` follows one request's or job's events until its final one.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from schemas import topics
from schemas.annotation import ANNOTATION_RESULT_EVENT, AnnotationResult
from schemas.codec import ANNOTATION_ADAPTER, CANCEL_ADAPTER, TRAINING_ADAPTER, Invalid, decode
from schemas.common import ErrorDetail
from schemas.topics import CONTENT_TYPE_JSON, Headers
from schemas.training import TRAINING_STATUS_EVENT, TrainingStatus

REQUEST_TOPICS: dict[str, str] = {
    "classify": topics.ANNOTATION_REQUESTS, "embed": topics.ANNOTATION_REQUESTS, "audit": topics.ANNOTATION_REQUESTS,
    "train": topics.TRAINING_REQUESTS, "cancel": topics.TRAINING_CONTROL,
}
"""The default topic of each request ``task`` (the workers' topic names are settings: pass ``topic=``)."""

RESULT_TOPICS: dict[str, str] = {
    topics.ANNOTATION_REQUESTS: topics.ANNOTATION_RESULTS, topics.ANNOTATION_INTERACTIVE: topics.ANNOTATION_RESULTS,
    topics.TRAINING_REQUESTS: topics.TRAINING_STATUS,
}
"""Where the events of a request sent to each default request topic come out."""

FINAL_TRAINING_STATUSES = frozenset({"completed", "failed", "cancelled"})
MAX_DEPTH = 64
INT64 = 2**63

_ADAPTERS: dict[str, tuple[TypeAdapter[Any], str]] = {
    "classify": (ANNOTATION_ADAPTER, "request_id"), "embed": (ANNOTATION_ADAPTER, "request_id"),
    "audit": (ANNOTATION_ADAPTER, "request_id"), "train": (TRAINING_ADAPTER, "job_id"),
    "cancel": (CANCEL_ADAPTER, "job_id"),
}
_EVENT_MODELS: dict[str, type[BaseModel]] = {ANNOTATION_RESULT_EVENT: AnnotationResult,
                                             TRAINING_STATUS_EVENT: TrainingStatus}


class InvalidRequest(ValueError):
    """A request the workers would refuse; ``details`` are the contract's field errors."""

    def __init__(self, message: str, details: list[ErrorDetail] | None = None) -> None:
        super().__init__(message)
        self.details = details or []


class InvalidEvent(ValueError):
    """A record value that is not a valid result or status event."""


class UnfoldableEvent(ValueError):
    """An event holds a value that SQLite and PostgreSQL would not store the same way."""


@dataclass(frozen=True)
class OutgoingRecord:
    """One Kafka record: what :func:`send_request` produces."""

    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


def build_request(body: Mapping[str, Any] | BaseModel) -> BaseModel:
    """The validated request model of ``body`` (any ``task``), with its id set (a new UUID when absent).

    Raises :class:`InvalidRequest` naming the fields, as the workers' ``invalid_request`` event would."""
    if isinstance(body, BaseModel):
        body = body.model_dump(mode="json", by_alias=True, exclude_unset=True)
    task = body.get("task")
    if task not in _ADAPTERS:
        raise InvalidRequest(f"unknown task {task!r}: one of {sorted(_ADAPTERS)}")
    adapter, id_field = _ADAPTERS[task]
    request = decode(adapter, dict(body), id_field, None)  # what the workers run on the record's value
    if isinstance(request, Invalid):
        raise InvalidRequest(f"{task} {request.message}", request.details)
    if getattr(request, id_field) is None:
        request = request.model_copy(update={id_field: str(uuid.uuid4())})
    return request


def request_id_of(request: BaseModel) -> str:
    """The request id or job id of a built request."""
    return str(getattr(request, "request_id", None) or getattr(request, "job_id"))


def encode_request(body: Mapping[str, Any] | BaseModel, topic: str | None = None) -> OutgoingRecord:
    """The record for ``body`` (validated by :func:`build_request`): topic by task unless given."""
    request = build_request(body)
    task = getattr(request, "task")
    entity_id = request_id_of(request)
    id_header = Headers.JOB_ID if task in ("train", "cancel") else Headers.REQUEST_ID
    value = json.dumps(request.model_dump(mode="json", by_alias=True, exclude_unset=True)).encode()
    return OutgoingRecord(topic=topic or REQUEST_TOPICS[task], key=entity_id.encode(), value=value,
                          headers=[(Headers.CONTENT_TYPE, CONTENT_TYPE_JSON.encode()), (id_header, entity_id.encode())])


async def send_request(producer: Any, body: Mapping[str, Any] | BaseModel, topic: str | None = None) -> str:
    """Validate, produce and wait for the broker's acknowledgement; returns the request/job id.

    ``producer``: a started ``aiokafka.AIOKafkaProducer`` (``acks="all"`` recommended)."""
    record = encode_request(body, topic)
    await producer.send_and_wait(record.topic, record.value, key=record.key, headers=record.headers)
    return record.key.decode()


def check_storable(value: Any, depth: int = 0) -> None:
    """Raise :class:`UnfoldableEvent` for a NUL in a string (PostgreSQL text cannot hold it), a non-finite
    number, an integer beyond 64 bits, or nesting deeper than 64 levels."""
    if depth > MAX_DEPTH:
        raise UnfoldableEvent(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        if "\x00" in value:
            raise UnfoldableEvent("a string holds a NUL character (PostgreSQL text cannot)")
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if not -INT64 <= value < INT64:
            raise UnfoldableEvent("an integer does not fit in 64 bits")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise UnfoldableEvent("a number is not finite")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_storable(key, depth + 1)
            check_storable(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            check_storable(item, depth + 1)


def read_event(value: bytes | None) -> dict[str, Any] | None:
    """The event of a result/status record as a dict, or None when the record is no event to fold (no value,
    not JSON, not an object, no ``message_id``, an unknown ``event_type``): skip those, never crash on them."""
    if value is None:
        return None
    try:
        event = json.loads(value)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
        return None
    if not isinstance(event, dict):
        return None
    message_id = event.get("message_id")
    if not isinstance(message_id, str) or not message_id or event.get("event_type") not in _EVENT_MODELS:
        return None
    return event


def parse_event(value: bytes | None) -> AnnotationResult | TrainingStatus:
    """The validated event (an annotation result part or a training status); :class:`InvalidEvent` otherwise."""
    event = read_event(value)
    if event is None:
        raise InvalidEvent("not a result or status event (no JSON object with message_id and a known event_type)")
    try:
        return _EVENT_MODELS[event["event_type"]].model_validate(event)
    except ValidationError as exc:
        raise InvalidEvent(f"invalid {event['event_type']} event: {exc.errors(include_url=False)[:5]}") from None


@dataclass
class EventProgress:
    """What has arrived for one request or job: result parts by index, or status events in order."""

    parts: dict[int, AnnotationResult] = field(default_factory=dict)
    statuses: list[TrainingStatus] = field(default_factory=list)

    def add(self, event: AnnotationResult | TrainingStatus) -> bool:
        """Record an event; True when it is the final one (every part, a failed result, a terminal status)."""
        if isinstance(event, AnnotationResult):
            self.parts.setdefault(event.part, event)  # a redelivered part is the same part
            return event.status == "failed" or len(self.parts) >= event.parts
        self.statuses.append(event)
        return event.status in FINAL_TRAINING_STATUSES and not getattr(event, "heartbeat", False)

    @property
    def events(self) -> list[AnnotationResult | TrainingStatus]:
        return [self.parts[k] for k in sorted(self.parts)] if self.parts else list(self.statuses)


async def wait_for_events(consumer: Any, entity_id: str, timeout_s: float = 120) -> list[AnnotationResult | TrainingStatus]:
    """Read ``consumer`` (started, subscribed or assigned to the result/status topic) until the request or job
    ``entity_id`` has its final event; returns its events (result parts in part order). Records of other
    keys are skipped; a record of this key that is not a valid event raises :class:`InvalidEvent`.
    ``TimeoutError`` after ``timeout_s``."""
    progress = EventProgress()
    key = entity_id.encode()
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        batches = await consumer.getmany(timeout_ms=int(min(left, 0.5) * 1000) + 1)
        for records in batches.values():
            for record in records:
                if record.key == key and progress.add(parse_event(record.value)):
                    return progress.events
        await asyncio.sleep(0)
    raise TimeoutError(f"no final event for {entity_id} within {timeout_s:.0f} s ({len(progress.events)} so far)")
