"""Decoding consumed records into contract models (one module-level TypeAdapter per input topic)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from schemas.annotation import AnyAnnotationRequest
from schemas.common import ErrorDetail, validation_details
from schemas.training import CancelRequest, TrainingRequest

ANNOTATION_ADAPTER: TypeAdapter[AnyAnnotationRequest] = TypeAdapter(AnyAnnotationRequest)
TRAINING_ADAPTER = TypeAdapter(TrainingRequest)
CANCEL_ADAPTER = TypeAdapter(CancelRequest)


MAX_ERROR_DETAILS = 20
"""At most this many field errors are listed in an ``invalid_request`` event (the rest are counted)."""

MAX_DETAIL_CHARS = 300
"""A field error's ``loc`` and ``msg`` are cut to this many characters."""


class NotAJsonObject(ValueError):
    """The record's value is not a UTF-8 JSON object: it belongs in the DLQ."""


class InvalidId(ValueError):
    """The body's id is a string that cannot be used as a key or header (not valid Unicode text)."""


@dataclass(frozen=True)
class Invalid:
    """A JSON object that failed validation; ``entity_id`` is None when it names no request."""

    entity_id: str | None
    message: str
    details: list[ErrorDetail]
    body: dict[str, Any]
    details_omitted: int = 0


def parse_json_object(raw: bytes | None) -> dict[str, Any]:
    """Parse a record value as a JSON object, or raise ``NotAJsonObject``."""
    if raw is None:
        raise NotAJsonObject("record has no value (tombstone)")
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise NotAJsonObject(f"value is not valid UTF-8 JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise NotAJsonObject("value is JSON nested too deeply to parse") from None
    if not isinstance(value, dict):
        raise NotAJsonObject(f"value is JSON {type(value).__name__}, not an object")
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \\udXXX escape
        return False
    return True


def unpaired_surrogate_at(raw: bytes, value: Any, path: str = "") -> str | None:
    """The dotted path of the first string holding an unpaired surrogate (JSON allows ``"\\ud800"``), or None.

    Such a string can be neither a Kafka key/header nor part of a UTF-8 event. Only walks the value
    when the raw bytes contain a ``\\ud8..\\udf`` escape, so ordinary records cost one byte search.
    """
    if not _SURROGATE_ESCAPE.search(raw or b""):
        return None
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:  # iterative: the parsed value may be as deep as json.loads allowed
        where, item = stack.pop()
        if isinstance(item, str):
            if not _encodable(item):
                return where or "(root)"
        elif isinstance(item, dict):
            for k, v in item.items():
                sub = f"{where}.{k}" if where else str(k)
                if not _encodable(k):
                    return where or "(root)"
                stack.append((sub, v))
        elif isinstance(item, list):
            stack.extend((f"{where}.{i}" if where else str(i), v) for i, v in enumerate(item))
    return None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB]", re.ASCII)


def entity_id_of(body: dict[str, Any], id_field: str, key: bytes | None) -> str | None:
    """The request/job id: from the body, else from the record key; None when neither names one."""
    value = body.get(id_field)
    if isinstance(value, str) and value.strip():
        if not _encodable(value):
            raise InvalidId(f"{id_field} is not valid Unicode text (unpaired surrogate)")
        return value.strip()[:256]
    if key:
        try:
            text = key.decode("utf-8").strip()
        except UnicodeDecodeError:
            return None
        return text[:256] or None
    return None


def _without_union_tag(errors: list[Any], body: dict[str, Any]) -> list[Any]:
    """Field paths as the sender wrote them: a tagged union (annotation ``task``) prefixes each error's
    ``loc`` with the tag (``classify.classes``); the message has no such level, so it is dropped
    (``classes``; an error of the whole request is reported at the root)."""
    tag = body.get("task")
    if not isinstance(tag, str):
        return errors
    for error in errors:
        loc = tuple(error.get("loc", ()))
        if loc and loc[0] == tag and error.get("type") not in ("union_tag_invalid", "union_tag_not_found"):
            error["loc"] = loc[1:]
    return errors


def decode(adapter: TypeAdapter[Any], body: dict[str, Any], id_field: str, key: bytes | None) -> Any:
    """Validate ``body``; fill the id from the key when absent. Returns the model or ``Invalid``."""
    entity_id = entity_id_of(body, id_field, key)
    try:
        model = adapter.validate_python(body)
    except ValidationError as exc:
        errors = _without_union_tag(exc.errors(include_url=False, include_input=False, include_context=False), body)
        details = validation_details(errors[:MAX_ERROR_DETAILS], max_chars=MAX_DETAIL_CHARS)
        summary = "; ".join(f"{d.loc}: {d.msg}" for d in details[:5])
        more = len(errors) - len(details)
        if more > 0:
            summary += f" (and {more} more field errors; the first {len(details)} are listed)"
        return Invalid(entity_id=entity_id, message=f"invalid request: {summary}", details=details, body=body,
                       details_omitted=max(0, more))
    except RecursionError:
        return Invalid(entity_id=entity_id, message="invalid request: nested too deeply", details=[], body=body)
    if getattr(model, id_field) is None and entity_id is not None:
        model = model.model_copy(update={id_field: entity_id})
    return model
