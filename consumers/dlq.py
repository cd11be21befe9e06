"""Dead-lettering: the original record (bytes, key, headers) plus headers saying why.

A dead letter always fits the dead-letter topic, whatever the record carried, so its send can only fail
for as long as the broker is away (never forever, which would stick the partition):

- incoming ``dlq-*`` headers are dropped (a reader takes the first ``dlq-error-code``: it must be ours);
- a record larger than ``limit`` keeps its value's head (``dlq-value-truncated``: the full size), then its
  key's head (``dlq-key-truncated``), then each header's name and value heads, then as many headers as fit
  (``dlq-headers-dropped``: how many did not).
"""

from __future__ import annotations

import dataclasses

from aiokafka import AIOKafkaProducer, ConsumerRecord

from consumers import metrics
from schemas.topics import Headers, dlq_topic

TRUNCATED_VALUE_BYTES = 64 * 1024
"""A value too large for the dead-letter topic is kept as its first 64 KiB (``dlq-value-truncated``)."""
TRUNCATED_KEY_BYTES = 1024
"""A key (or a header's name or value) of a dead letter that does not fit is kept as its first 1 KiB."""
DLQ_HEADROOM_BYTES = 32 * 1024
"""A dead letter may be this much larger than ``CLS_MAX_RECORD_BYTES`` (room for the ``dlq-*`` headers; the
producer accepts 64 KiB more, the provisioned DLQ topics 96 KiB more)."""
DLQ_PREFIX = "dlq-"
DLQ_KEY_TRUNCATED = "dlq-key-truncated"
DLQ_HEADERS_DROPPED = "dlq-headers-dropped"

Header = tuple[str, bytes]


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """What is produced to ``<topic>.dlq`` for one record."""

    topic: str
    value: bytes | None
    key: bytes | None
    headers: list[Header]

    @property
    def size(self) -> int:
        return record_size(self.value, self.key, self.headers)


HEADER_OVERHEAD_BYTES = 8
"""What one header costs in a record batch besides its name and value (their lengths, as varints)."""


def record_size(value: bytes | None, key: bytes | None, headers: list[Header] | tuple[Header, ...] | None) -> int:
    """Bytes of a record's value, key and headers (names, values and their lengths)."""
    return len(value or b"") + len(key or b"") + sum(len(name.encode("utf-8", "replace")) + len(v or b"")
                                                     + HEADER_OVERHEAD_BYTES for name, v in headers or ())


def _why_headers(record: ConsumerRecord, code: str, message: str) -> list[Header]:
    return [
        (Headers.DLQ_ERROR_CODE, code.encode()),
        (Headers.DLQ_ERROR_MESSAGE, message[:1000].encode("utf-8", "replace")),
        (Headers.DLQ_SOURCE_TOPIC, record.topic.encode()),
        (Headers.DLQ_SOURCE_PARTITION, str(record.partition).encode()),
        (Headers.DLQ_SOURCE_OFFSET, str(record.offset).encode()),
    ]


def _original_headers(record: ConsumerRecord) -> list[Header]:
    """The record's headers without any ``dlq-*`` one (those are the dead letter's own)."""
    return [(name, value) for name, value in record.headers or () if not name.lower().startswith(DLQ_PREFIX)]


def _head(text: str, limit: int) -> str:
    return text.encode("utf-8", "replace")[:limit].decode("utf-8", "ignore")


def dead_letter_for(record: ConsumerRecord, code: str, message: str, limit: int) -> DeadLetter:
    """The dead letter of ``record``, at most ``limit`` bytes (value, key and headers; ``limit`` leaves
    room for the batch overhead the broker adds)."""
    why = _why_headers(record, code, message)
    value, key = record.value, record.key
    headers = _original_headers(record)
    notes: list[Header] = []

    def size() -> int:
        return record_size(value, key, headers + notes + why)

    if size() > limit and len(value or b"") > TRUNCATED_VALUE_BYTES:
        notes.append((Headers.DLQ_VALUE_TRUNCATED, str(len(value or b"")).encode()))
        value = (value or b"")[:TRUNCATED_VALUE_BYTES]
    if size() > limit and len(key or b"") > TRUNCATED_KEY_BYTES:
        notes.append((DLQ_KEY_TRUNCATED, str(len(key or b"")).encode()))
        key = (key or b"")[:TRUNCATED_KEY_BYTES]
    if size() > limit:
        headers = [(_head(name, TRUNCATED_KEY_BYTES), (v or b"")[:TRUNCATED_KEY_BYTES]) for name, v in headers]
    if size() > limit:
        kept: list[Header] = []
        room = limit - record_size(value, key, notes + why) - 64  # 64: the dlq-headers-dropped note itself
        for header in headers:
            cost = record_size(None, None, [header])
            if cost <= room:
                kept.append(header)
                room -= cost
        notes.append((DLQ_HEADERS_DROPPED, str(len(headers) - len(kept)).encode()))
        headers = kept
    if size() > limit:  # only with a limit below the fixed parts: keep the why and the value's head
        value = (value or b"")[: max(0, limit - record_size(None, key, notes + why))]
    return DeadLetter(topic=dlq_topic(record.topic), value=value, key=key, headers=headers + notes + why)


async def dead_letter(producer: AIOKafkaProducer, record: ConsumerRecord, code: str, message: str,
                      limit: int | None = None) -> None:
    """Produce ``record`` to ``<topic>.dlq`` (cut to ``limit`` bytes when given) and wait for the acknowledgement."""
    letter = dead_letter_for(record, code, message, limit if limit is not None else 2**62)
    await producer.send_and_wait(letter.topic, value=letter.value, key=letter.key, headers=letter.headers)
    metrics.RECORDS_DLQ.labels(record.topic, code).inc()
