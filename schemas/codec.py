"""Decoding consumed records into contract models (one module-level TypeAdapter per input topic)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from schemas.annotation import AnnotationRequest
from schemas.common import ErrorDetail, validation_details
from schemas.training import CancelRequest, TrainingRequest

ANNOTATION_ADAPTER = TypeAdapter(AnnotationRequest)
TRAINING_ADAPTER = TypeAdapter(TrainingRequest)
CANCEL_ADAPTER = TypeAdapter(CancelRequest)


class NotAJsonObject(ValueError):
    """The record's value is not a UTF-8 JSON object: it belongs in the DLQ."""


@dataclass(frozen=True)
class Invalid:
    """A JSON object that failed validation; ``entity_id`` is None when it names no request."""

    entity_id: str | None
    message: str
    details: list[ErrorDetail]
    body: dict[str, Any]


def parse_json_object(raw: bytes | None) -> dict[str, Any]:
    """Parse a record value as a JSON object, or raise ``NotAJsonObject``."""
    if raw is None:
        raise NotAJsonObject("record has no value (tombstone)")
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise NotAJsonObject(f"value is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(value, dict):
        raise NotAJsonObject(f"value is JSON {type(value).__name__}, not an object")
    return value


def entity_id_of(body: dict[str, Any], id_field: str, key: bytes | None) -> str | None:
    """The request/job id: from the body, else from the record key; None when neither names one."""
    value = body.get(id_field)
    if isinstance(value, str) and value.strip():
        return value.strip()[:256]
    if key:
        try:
            text = key.decode("utf-8").strip()
        except UnicodeDecodeError:
            return None
        return text[:256] or None
    return None


def decode(adapter: TypeAdapter[Any], body: dict[str, Any], id_field: str, key: bytes | None) -> Any:
    """Validate ``body``; fill the id from the key when absent. Returns the model or ``Invalid``."""
    entity_id = entity_id_of(body, id_field, key)
    try:
        model = adapter.validate_python(body)
    except ValidationError as exc:
        details = validation_details(exc.errors(include_url=False))
        summary = "; ".join(f"{d.loc}: {d.msg}" for d in details[:5])
        return Invalid(entity_id=entity_id, message=f"invalid request: {summary}", details=details, body=body)
    if getattr(model, id_field) is None and entity_id is not None:
        model = model.model_copy(update={id_field: entity_id})
    return model
