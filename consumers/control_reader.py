"""The control-topic reader: cancels for the training worker, read outside the consumer group.

Every training worker reads all partitions of the compacted control topic from the beginning before it
takes its first job (a cancel that arrived before its job, or before a restart, still applies), then
follows it.

Every record ends: a cancel cancels its job, a tombstone retracts the cancel of its key, and anything
else (not UTF-8 JSON, nested past the parser's depth, wrong types, no job id, an unexpected error) is
logged, dead-lettered once to ``<control topic>.dlq`` and skipped. Start-up never fails on a record's
content, and one bad record never drops the records behind it in its batch.

Dead-lettered *once*: the compacted topic keeps a bad record, so every start-up's catch-up reads it
again. Before catching up, the reader scans the control topic's DLQ for the highest
``dlq-source-offset`` per source partition and dead-letters only records above it. The DLQ itself is
the durable memory, so a record counts as dead-lettered exactly when its dead letter was acknowledged,
by whichever worker wrote it (no marker that can disagree with the DLQ). Limits: two workers that both
follow the topic when a bad record arrives may both dead-letter it (their dead letters carry the same
``dlq-source-*`` headers); a record whose dead letter has expired from the DLQ (``dlq_retention_ms``)
is dead-lettered once more on the next start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError

from consumers.dlq import DLQ_HEADROOM_BYTES, TRUNCATED_VALUE_BYTES, dead_letter
from consumers.settings import Settings
from consumers.topics_admin import topic_partitions
from handlers.cancels import CancelRegistry
from schemas.codec import CANCEL_ADAPTER, Invalid, NotAJsonObject, decode, parse_json_object
from schemas.topics import Headers, dlq_topic

log = structlog.get_logger("cls.control")

NOT_JSON_OBJECT = "not_json_object"
INVALID_CANCEL = "invalid_cancel"
DLQ_SEND_ATTEMPTS = 3


@dataclass(frozen=True)
class ControlAction:
    """What one control record means: cancel or uncancel a job, or dead-letter the record."""

    kind: Literal["cancel", "uncancel", "dead_letter"]
    job_id: str | None = None
    reason: str | None = None
    code: str = ""
    message: str = ""


def classify(record: Any) -> ControlAction:
    """The action for a control record; never raises on content."""
    try:
        return _classify(record)
    except Exception as exc:  # noqa: BLE001 - a record must never stop the reader
        return ControlAction("dead_letter", code=INVALID_CANCEL, message=f"unexpected error: {exc!r}"[:1000])


def _classify(record: Any) -> ControlAction:
    if record.value is None:  # tombstone: the cancel of this key is retracted (compaction removes both)
        job_id = record.key.decode("utf-8", "replace").strip() if record.key else ""
        if not job_id:
            return ControlAction("dead_letter", code=INVALID_CANCEL, message="tombstone without a key")
        return ControlAction("uncancel", job_id=job_id)
    try:
        body = parse_json_object(record.value)
    except NotAJsonObject as exc:
        return ControlAction("dead_letter", code=NOT_JSON_OBJECT, message=str(exc))
    except RecursionError:
        return ControlAction("dead_letter", code=NOT_JSON_OBJECT, message="value is not valid JSON: nested too deeply")
    cancel = decode(CANCEL_ADAPTER, body, "job_id", record.key)
    if isinstance(cancel, Invalid):
        return ControlAction("dead_letter", code=INVALID_CANCEL, message=cancel.message)
    if not cancel.job_id:
        return ControlAction("dead_letter", code=INVALID_CANCEL, message="the cancel names no job (no job_id, no key)")
    return ControlAction("cancel", job_id=cancel.job_id, reason=cancel.reason)


class ControlReader:
    """Follows the control topic (all partitions, no group) and feeds the cancel registry."""

    def __init__(self, settings: Settings, cancels: CancelRegistry, producer: Callable[[], Any]) -> None:
        self.settings = settings
        self.cancels = cancels
        self._producer = producer  # the runtime's producer, once it has started
        self.topic = settings.worker.training_control_topic
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self.dead_lettered: dict[int, int] = {}  # source partition -> highest offset already in the DLQ
        self._dlq_missing = False  # no DLQ topic (not provisioned): bad records are logged and skipped

    async def start(self, catch_up_timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + catch_up_timeout_s
        self._consumer = AIOKafkaConsumer(**self.settings.kafka.client_kwargs(), group_id=None,
                                          enable_auto_commit=False, auto_offset_reset="earliest")
        await self._consumer.start()
        tps = await topic_partitions(self._consumer, self.topic, catch_up_timeout_s)
        if not tps:
            raise ValueError(f"control topic {self.topic} does not exist (run `cls-worker topics create`)")
        self.dead_lettered = await self._scan_dead_letters(deadline)
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        ends = await self._consumer.end_offsets(tps)
        # catch up before the first job is taken
        while await self._behind(self._consumer, ends):
            if time.monotonic() > deadline:
                log.warning("control_catch_up_timeout")
                break
            try:
                await self._poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker, not a record (records never raise): retry until the deadline
                log.warning("control_poll_failed", error=repr(exc))
                await asyncio.sleep(0.5)
        self.cancels.caught_up.set()
        log.info("control_topic_caught_up", cancelled=len(self.cancels), dead_lettered_up_to=self.dead_lettered)
        self._task = asyncio.create_task(self._follow())

    @staticmethod
    async def _behind(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
        for tp, end in ends.items():
            if await consumer.position(tp) < end:
                return True
        return False

    async def _scan_dead_letters(self, deadline: float) -> dict[int, int]:
        """Highest ``dlq-source-offset`` per partition of the control topic found in its DLQ."""
        consumer = AIOKafkaConsumer(**self.settings.kafka.client_kwargs(), group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        highest: dict[int, int] = {}
        source = self.topic.encode()
        try:
            tps = await topic_partitions(consumer, dlq_topic(self.topic), min(5.0, max(0.0, deadline - time.monotonic())))
            if not tps:
                log.warning("control_dlq_missing", topic=dlq_topic(self.topic))
                self._dlq_missing = True
                return highest
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            while await self._behind(consumer, ends):
                if time.monotonic() > deadline:
                    log.warning("control_dlq_scan_timeout", found=highest)
                    break
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        headers = dict(record.headers or ())
                        if headers.get(Headers.DLQ_SOURCE_TOPIC) != source:
                            continue
                        try:
                            partition = int(headers[Headers.DLQ_SOURCE_PARTITION])
                            offset = int(headers[Headers.DLQ_SOURCE_OFFSET])
                        except (KeyError, ValueError):
                            continue
                        highest[partition] = max(highest.get(partition, -1), offset)
        finally:
            await consumer.stop()
        return highest

    async def _follow(self) -> None:
        while True:
            try:
                await self._poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep following: a broker hiccup must not stop cancels forever
                log.warning("control_poll_failed", error=repr(exc))
                await asyncio.sleep(1)

    async def _poll_once(self) -> None:
        assert self._consumer is not None
        batches = await self._consumer.getmany(timeout_ms=500)
        for records in batches.values():
            for record in records:
                await self._apply(record)

    async def _apply(self, record: Any) -> None:
        """One record; never raises (but CancelledError), so the rest of its batch is always applied."""
        try:
            action = classify(record)
            if action.kind == "cancel":
                assert action.job_id is not None
                self.cancels.cancel(action.job_id, action.reason)
                log.info("cancel_received", job_id=action.job_id, offset=record.offset)
            elif action.kind == "uncancel":
                assert action.job_id is not None
                self.cancels.uncancel(action.job_id)
                log.info("cancel_retracted", job_id=action.job_id, offset=record.offset)
            else:
                await self._dead_letter(record, action.code, action.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - logged; the record is skipped, the reader goes on
            log.error("control_record_skipped", partition=record.partition, offset=record.offset, error=repr(exc)[:300])

    async def _dead_letter(self, record: Any, code: str, message: str) -> None:
        log.warning("control_record_invalid", code=code, partition=record.partition, offset=record.offset,
                    error=message[:300])
        if record.offset <= self.dead_lettered.get(record.partition, -1):
            log.info("control_record_already_dead_lettered", partition=record.partition, offset=record.offset)
            return
        if self._dlq_missing:
            return  # producing to a missing topic would only time out, record after record
        await self._send_dead_letter(record, code, message)
        self.dead_lettered[record.partition] = record.offset
        log.warning("control_record_dead_lettered", code=code, partition=record.partition, offset=record.offset)

    async def _send_dead_letter(self, record: Any, code: str, message: str) -> None:
        """The dead letter, acknowledged; it is cut to fit the DLQ topic (``consumers.dlq``)."""
        limit = self.settings.worker.max_record_bytes + DLQ_HEADROOM_BYTES
        for attempt in range(1, DLQ_SEND_ATTEMPTS + 1):
            try:
                await dead_letter(self._producer(), record, code, message, limit=limit)
                return
            except (MessageSizeTooLargeError, RecordTooLargeError):
                limit = 2 * TRUNCATED_VALUE_BYTES  # a DLQ topic provisioned smaller than ours: its head only
            except KafkaError as exc:
                if attempt == DLQ_SEND_ATTEMPTS:
                    raise
                log.warning("control_dead_letter_retry", attempt=attempt, error=repr(exc))
                await asyncio.sleep(0.5 * attempt)
        raise RuntimeError("dead letter not sent")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()
