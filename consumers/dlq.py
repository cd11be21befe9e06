"""Dead-lettering: the original record (bytes, key, headers) plus headers saying why."""

from __future__ import annotations

import dataclasses

from aiokafka import AIOKafkaProducer, ConsumerRecord

from consumers import metrics
from schemas.topics import Headers, dlq_topic


TRUNCATED_VALUE_BYTES = 64 * 1024
"""A value too large for the dead-letter topic is kept as its first 64 KiB (``dlq-value-truncated``)."""


def truncated(record: ConsumerRecord) -> ConsumerRecord:
    """``record`` with its value cut to its head and a ``dlq-value-truncated`` header giving the full size."""
    size = len(record.value or b"")
    return dataclasses.replace(record, value=(record.value or b"")[:TRUNCATED_VALUE_BYTES],
                               headers=[*(record.headers or ()), (Headers.DLQ_VALUE_TRUNCATED, str(size).encode())])


def dlq_headers(record: ConsumerRecord, code: str, message: str) -> list[tuple[str, bytes]]:
    return list(record.headers or ()) + [
        (Headers.DLQ_ERROR_CODE, code.encode()),
        (Headers.DLQ_ERROR_MESSAGE, message[:1000].encode("utf-8", "replace")),
        (Headers.DLQ_SOURCE_TOPIC, record.topic.encode()),
        (Headers.DLQ_SOURCE_PARTITION, str(record.partition).encode()),
        (Headers.DLQ_SOURCE_OFFSET, str(record.offset).encode()),
    ]


async def dead_letter(producer: AIOKafkaProducer, record: ConsumerRecord, code: str, message: str) -> None:
    """Produce ``record`` unchanged to ``<topic>.dlq`` and wait for the acknowledgement."""
    await producer.send_and_wait(dlq_topic(record.topic), value=record.value, key=record.key,
                                 headers=dlq_headers(record, code, message))
    metrics.RECORDS_DLQ.labels(record.topic, code).inc()
