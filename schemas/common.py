"""Envelope, error and id rules shared by every message of the contract.

Rules (DESIGN.md, "Names fixed here"):
- envelope fields: ``schema_version``, ``message_id``, ``request_id`` or ``job_id``, ``created_at``;
  all optional on input;
- produced message ids are UUIDv5 derived from the request/job id and the message's position,
  never from time, so a redelivered request produces the same ids;
- unknown input fields are ignored; workers accept the current and the previous major version.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = "1.0"
"""Version written on every produced message (``MAJOR.MINOR``)."""

CURRENT_MAJOR = 1
ACCEPTED_MAJORS = frozenset({CURRENT_MAJOR, CURRENT_MAJOR - 1})

MESSAGE_ID_NAMESPACE = uuid.UUID("6f0c7a52-4f0e-5d3e-9a57-0c1a55e0c1a5")
"""Namespace of every derived message id (fixed forever: changing it changes every id)."""

MAX_ID_LENGTH = 256

Identifier = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]


def derive_message_id(kind: str, entity_id: str, *position: object) -> str:
    """Deterministic message id: UUIDv5 of the kind, the request/job id and the position."""
    name = "/".join([kind, entity_id, *(str(p) for p in position)])
    return str(uuid.uuid5(MESSAGE_ID_NAMESPACE, name))


def utc_now() -> datetime:
    return datetime.now(UTC)


class InputModel(BaseModel):
    """Base of every consumed message: unknown fields ignored, strings stripped."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True, populate_by_name=True)

    schema_version: str | None = Field(
        default=None,
        description="MAJOR.MINOR of the contract the producer speaks; current and previous major accepted.",
        examples=[SCHEMA_VERSION],
    )
    message_id: str | None = Field(default=None, max_length=MAX_ID_LENGTH, description="Producer's message id (informational).")
    created_at: datetime | None = Field(default=None, description="When the producer created the message.")

    @field_validator("schema_version")
    @classmethod
    def _accepted_major(cls, value: str | None) -> str | None:
        if value is None:
            return value
        major_text = value.split(".", 1)[0]
        if not major_text.isdigit():
            raise ValueError(f"schema_version must look like MAJOR.MINOR, got {value!r}")
        if int(major_text) not in ACCEPTED_MAJORS:
            accepted = ", ".join(str(m) for m in sorted(ACCEPTED_MAJORS))
            raise ValueError(f"unsupported schema major version {major_text}; accepted: {accepted}")
        return value


class OutputModel(BaseModel):
    """Base of every produced message: strict (no unknown fields), always fully enveloped."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, ser_json_timedelta="float")

    schema_version: str = Field(default=SCHEMA_VERSION, description="MAJOR.MINOR of the contract.")
    message_id: str = Field(description="Deterministic UUIDv5 (request/job id + position); a redelivery repeats it.")
    created_at: datetime = Field(default_factory=utc_now, description="When the worker produced the message (UTC).")

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    loc: str = Field(description="Dotted path of the offending field.")
    msg: str
    type: str


class ErrorInfo(BaseModel):
    """A typed error: a stable machine-readable ``code`` and a human message."""

    model_config = ConfigDict(extra="forbid")
    code: str = Field(description="Stable error code, e.g. invalid_request, fetch_failed, model_unavailable.")
    message: str
    details: list[ErrorDetail] | None = Field(default=None, description="Per-field validation errors, when any (at most 20).")
    details_omitted: int | None = Field(default=None, description="How many further field errors were not listed.")
    retryable: bool | None = Field(default=None, description="True when the same request may succeed later.")


def validation_details(errors: list[dict[str, Any]], max_chars: int = 300) -> list[ErrorDetail]:
    """Turn pydantic's ``ValidationError.errors()`` into contract error details (each text cut to ``max_chars``)."""
    details = []
    for err in errors:
        loc = ".".join(_printable(part) for part in err.get("loc", ())) or "(root)"
        details.append(ErrorDetail(loc=loc[:max_chars], msg=_printable(err.get("msg", ""))[:max_chars],
                                   type=str(err.get("type", ""))[:64]))
    return details


def _printable(value: object) -> str:
    """``str(value)`` made safe for a UTF-8 event (an unpaired surrogate becomes U+FFFD)."""
    return str(value).encode("utf-8", "replace").decode("utf-8")
