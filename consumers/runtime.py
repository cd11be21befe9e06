"""The consumer runtime: poll, validate, dispatch, publish, then commit. Nothing is lost.

Per record:
1. not a JSON object, or a JSON object naming no request -> the DLQ (original bytes, key, headers + dlq-*);
2. a JSON object with an id that fails validation -> a ``failed`` event with code ``invalid_request``;
3. else the pipeline's handler runs; every event it yields is produced (idempotent producer,
   acks=all) and acknowledged; retryable errors are retried with backoff, then become a failed event;
4. only then is the offset committed (in partition order, even with concurrent handling).

At most ``max_in_flight`` records are handled at once; at capacity every assigned partition is paused
while polling continues, so a long handler never makes the group evict the worker. On SIGTERM the
runtime stops taking records, lets in-flight work finish within the drain deadline, commits what
finished and leaves the rest for redelivery. Lane admission (slots per lane, parked records, which
partitions to pause) is ``consumers.lanes.LaneAdmission``; the crash-loop count in the commit metadata is
``consumers.attempts``; the committable offset is ``consumers.offsets``.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    CommitFailedError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RequestTimedOutError,
)

from consumers import metrics
from consumers.dlq import DLQ_HEADROOM_BYTES, dead_letter_for
from consumers.attempts import Head, Suspects, attempts_from_metadata, attempts_metadata
from consumers.lanes import LaneAdmission
from consumers.offsets import PartitionOffsets
from consumers.pipeline import Pipeline
from consumers.settings import Settings
from handlers.errors import HandlerError, RetryableError
from handlers.lifecycle import Abandoned
from schemas.codec import (
    Invalid,
    InvalidId,
    NotAJsonObject,
    decode,
    entity_id_of,
    parse_json_object,
    unpaired_surrogate_at,
)
from schemas.common import ErrorInfo, OutputModel, derive_message_id

log = structlog.get_logger("cls.runtime")


@dataclass
class _Job:
    record: ConsumerRecord
    tp: TopicPartition
    entity_id: str | None = None
    task: asyncio.Task[None] | None = None
    started: float = field(default_factory=time.monotonic)
    # How many times this record has been started, this time included, by any process (the count is
    # written into the commit metadata while it is the partition's head; see ``consumers.attempts``).
    start_count: int = 1
    mark_first: bool = False  # the record is the head: record the attempt durably before handling
    crash_loop: bool = False  # killed the worker max_attempts times: dead-letter it, do not handle it
    held: bool = False  # suspected of killing the worker: handled alone in the process (``attempts.Suspects``)
    lane: str = "default"
    body: dict[str, Any] | None = None  # the parsed value, when it parsed (lane choice)
    parked: bool = False  # taken (its offset pending) but waiting for a slot in its lane


def is_transport_error(exc: BaseException) -> bool:
    """Broker unreachable, timeouts, leader moves: retried for as long as the broker is away."""
    if isinstance(exc, (KafkaTimeoutError, RequestTimedOutError)):
        return True
    if isinstance(exc, KafkaError):
        return bool(getattr(exc, "retriable", False))
    return isinstance(exc, (ConnectionError, TimeoutError))


def error_code_of(exc: BaseException) -> str:
    """The code a record that failed with ``exc`` ends with (failed event or dead letter)."""
    if isinstance(exc, (EventTooLarge, MessageSizeTooLargeError, RecordTooLargeError)):
        return "event_too_large"
    return "attempts_exhausted"


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, runtime: "ConsumerRuntime") -> None:
        self._runtime = runtime

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._runtime._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._runtime._on_assigned(set(assigned))


def new_producer(settings: Settings) -> AIOKafkaProducer:
    """The idempotent, acks=all producer every worker publishes with."""
    return AIOKafkaProducer(
        **settings.kafka.client_kwargs(),
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_request_size=settings.worker.max_record_bytes + 64 * 1024,
    )


class EventTooLarge(Exception):
    """An event (or a dead letter) is larger than the configured maximum record size."""

    def __init__(self, size: int, limit: int, what: str) -> None:
        super().__init__(f"{what} is {size} bytes; the maximum record size (CLS_MAX_RECORD_BYTES) is {limit}")
        self.size = size
        self.limit = limit


class ConsumerRuntime:
    """Runs one pipeline on one consumer group until stopped (or ``max_records`` handled).

    Termination rule (one place, ``_run_job``): a transport error (broker unreachable, timeouts) is
    retried in place with backoff for as long as the broker is away; any other failure is retried up
    to ``CLS_MAX_ATTEMPTS`` times, then ends the record with a ``failed`` event (when one can be built
    and fits) or a dead letter whose ``dlq-error-code`` says why. A record that killed the process
    ``CLS_MAX_ATTEMPTS`` times (counted in the commit metadata) is dead-lettered as ``crash_loop``; after a
    death, the suspects run one at a time with nothing else in flight (``consumers.attempts.Suspects``), so
    the count is the record's own. A dead-lettered record whose request/job id can be read (body, else key)
    is also answered with a ``failed`` event carrying the dead letter's code, so the backend hears an end.
    """

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        *,
        group_id: str,
        producer: AIOKafkaProducer | None = None,
        max_in_flight: int | None = None,
        max_records: int | None = None,
        max_poll_interval_ms: int | None = None,
        on_started: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.group_id = group_id
        self.max_in_flight = max_in_flight or settings.worker.max_in_flight
        self.max_records = max_records
        self._max_poll_interval_ms = max_poll_interval_ms or settings.worker.max_poll_interval_ms
        self._on_started = on_started
        self._producer = producer
        self._owns_producer = producer is None
        self._consumer: AIOKafkaConsumer | None = None
        self._jobs: dict[tuple[TopicPartition, int], _Job] = {}
        self._offsets: dict[TopicPartition, PartitionOffsets] = {}
        self._heads: dict[TopicPartition, Head] = {}
        self._held: set[TopicPartition] = set()  # partitions whose suspect record waits or runs: read after it
        self._suspects: Suspects[_Job] = Suspects()
        self._commit_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._taken = 0
        self._rewind: dict[TopicPartition, int] = {}
        self._handled = 0
        self._paused_by_us: set[TopicPartition] = set()
        self._fail_publishes = _parse_fault_counts(settings.worker.fault_fail_publish)
        first_lane = pipeline.lane_of_topic(pipeline.input_topic)
        self._lanes: LaneAdmission[_Job] = LaneAdmission({**pipeline.lane_budgets, first_lane: self.max_in_flight},
                                                         settings.worker.lane_lookahead)
        self._parked = self._lanes.parked  # lane -> records taken but waiting for a slot
        self.ready = False
        self.stats: dict[str, int] = {"handled": 0, "dlq": 0, "invalid": 0, "failed": 0, "abandoned": 0}

    # ---------------------------------------------------------------- lifecycle
    def stop(self) -> None:
        """Ask the runtime to stop taking records and drain (idempotent; safe from a signal handler)."""
        self._stopping.set()

    @property
    def producer(self) -> AIOKafkaProducer:
        assert self._producer is not None
        return self._producer

    @property
    def max_attempts(self) -> int:
        return self.settings.worker.max_attempts

    async def run(self) -> None:
        """Consume until ``stop()`` (or ``max_records``), then drain and commit."""
        worker = self.settings.worker
        self._consumer = AIOKafkaConsumer(
            **self.settings.kafka.client_kwargs(),
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_interval_ms=self._max_poll_interval_ms,
            session_timeout_ms=worker.session_timeout_ms,
            heartbeat_interval_ms=worker.heartbeat_interval_ms,
            max_partition_fetch_bytes=worker.max_record_bytes + 64 * 1024,
            isolation_level="read_committed",
            fetch_max_wait_ms=worker.fetch_max_wait_ms,
        )
        if self._producer is None:
            self._producer = new_producer(self.settings)
        try:
            if self._owns_producer:
                await self._producer.start()
            await self._consumer.start()
            self._consumer.subscribe(self.pipeline.input_topics, listener=_Rebalance(self))
            self.ready = True
            log.info("consumer_started", topic=self.pipeline.input_topic, topics=self.pipeline.input_topics,
                     group=self.group_id, lanes=self._lanes.budgets, max_attempts=self.max_attempts)
            if self._on_started is not None:
                await self._on_started()
            await self._poll_loop()
            await self._drain()
        finally:
            self.ready = False
            try:
                await self._consumer.stop()
            finally:
                if self._owns_producer:
                    await self._producer.stop()
            log.info("consumer_stopped", topic=self.pipeline.input_topic, **self.stats)

    async def _poll_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        worker = self.settings.worker
        while not self._stopping.is_set():
            if self.max_records is not None and self._handled >= self.max_records:
                break
            self._launch_suspect()
            self._launch_parked()
            room = self._room()
            self._apply_pauses(room <= 0)
            self.observe_oldest()
            if room <= 0:
                # Every partition paused: wait for a free slot (not a whole poll timeout), then poll
                # anyway, which keeps the group membership alive and returns nothing.
                self._slot_freed.clear()
                try:
                    await asyncio.wait_for(self._slot_freed.wait(), timeout=worker.poll_timeout_ms / 1000)
                except TimeoutError:
                    pass
                await consumer.getmany(timeout_ms=0)
                continue
            batches = await consumer.getmany(timeout_ms=worker.poll_timeout_ms, max_records=room)
            for tp, records in batches.items():
                await self._take_batch(tp, records)

    def _room(self) -> int:
        """How many records may be read now: free slots in every lane, plus read-ahead room."""
        room = self._lanes.room()
        if self.max_records is not None:
            room = min(room, self.max_records - self._taken)
        return room

    async def _take_batch(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        """Take the records of one partition, in order, applying the crash-loop rule at its head."""
        consumer = self._consumer
        assert consumer is not None
        head = await self._head(tp)
        if head is None:  # revoked meanwhile
            return
        for record in records:
            if tp in self._held:  # its suspect record waits or runs alone: read the rest again after it
                consumer.seek(tp, record.offset)
                return
            if head.offset is None:  # no commit yet in this group: the first record read is the head
                head.offset = record.offset
            prior = head.attempts if record.offset == head.offset else 0
            if prior >= self.max_attempts:
                self._start(tp, record, start_count=prior, crash_loop=True)
                continue
            if prior >= 1:  # it was being handled when a worker died: alone, so the count is its own
                self._suspect(tp, record, start_count=prior + 1)
                continue
            if self._suspects.active or (self._room() <= 0 and (tp, record.offset) not in self._jobs):
                consumer.seek(tp, record.offset)  # a suspect goes first / read more than there is room for
                return
            self._start(tp, record, start_count=1, mark_first=record.offset == head.offset)

    def _suspect(self, tp: TopicPartition, record: ConsumerRecord, start_count: int) -> None:
        """Take a suspect record: it waits until nothing else is in flight, then runs alone (``_launch_suspect``)."""
        key = (tp, record.offset)
        if key in self._jobs:
            return
        self._offsets.setdefault(tp, PartitionOffsets()).take(record.offset)
        job = _Job(record=record, tp=tp, start_count=start_count, mark_first=True, held=True, parked=True)
        job.lane = self.pipeline.lane_of_topic(tp.topic)
        self._jobs[key] = job
        self._taken += 1
        metrics.RECORDS_CONSUMED.labels(tp.topic).inc()
        self._suspects.add(job)
        self._held.add(tp)
        log.warning("suspect_record_waits", partition=tp.partition, offset=record.offset, attempt=start_count,
                    in_flight=self._in_flight(), suspects=len(self._suspects.waiting))
        self._apply_pauses(False)
        self._launch_suspect()

    def _in_flight(self) -> int:
        return sum(self._lanes.running.values())

    def _launch_suspect(self) -> None:
        """Start the next suspect when nothing else is in flight (and no suspect is running)."""
        if self._stopping.is_set():
            return
        job = self._suspects.next(self._in_flight())
        if job is not None:
            log.warning("suspect_record_runs_alone", partition=job.tp.partition, offset=job.record.offset,
                        attempt=job.start_count, max_attempts=self.max_attempts)
            self._launch(job)

    async def _head(self, tp: TopicPartition) -> Head | None:
        """The partition's committed offset and the attempts recorded for its record (fetched once)."""
        head = self._heads.get(tp)
        if head is not None:
            return head
        consumer = self._consumer
        assert consumer is not None
        if tp not in consumer.assignment():
            return None
        committed = await consumer._coordinator.fetch_committed_offsets([tp])  # aiokafka has no public metadata read
        entry = committed.get(tp)
        if entry is None or entry.offset < 0:
            head = Head(offset=None)
        else:
            head = Head(offset=entry.offset, attempts=attempts_from_metadata(entry.metadata))
            offsets = self._offsets.setdefault(tp, PartitionOffsets())
            offsets.committed = entry.offset
        self._heads[tp] = head
        if head.attempts:
            log.warning("record_started_before", partition=tp.partition, offset=head.offset, attempts=head.attempts)
        return head

    def _apply_pauses(self, all_paused: bool) -> None:
        """Pause what cannot be taken now: everything when there is no room or while a suspect record waits
        or runs; else each topic whose lane is full and whose read-ahead is used up."""
        consumer = self._consumer
        assert consumer is not None
        assignment = consumer.assignment()
        want = self._lanes.paused(assignment, self._held, self.pipeline.lane_of_topic,
                                  all_paused or self._suspects.active)
        to_pause = want - self._paused_by_us
        to_resume = (self._paused_by_us - want) & assignment
        if to_pause:
            consumer.pause(*to_pause)
        if to_resume:
            consumer.resume(*to_resume)
        self._paused_by_us = want
        metrics.PAUSED_PARTITIONS.labels(self.pipeline.input_topic).set(len(self._paused_by_us))

    # ---------------------------------------------------------------- stuck-partition signal
    def oldest_unfinished_s(self) -> dict[int, float]:
        """Per partition of the input topic: age in seconds of its oldest unfinished record."""
        now = time.monotonic()
        ages: dict[int, float] = {}
        for job in self._jobs.values():
            age = now - job.started
            ages[job.tp.partition] = max(ages.get(job.tp.partition, 0.0), age)
        return ages

    def observe_oldest(self) -> dict[int, float]:
        ages = self.oldest_unfinished_s()
        topic = self.pipeline.input_topic
        for tp in self._offsets:
            metrics.OLDEST_UNFINISHED.labels(topic, str(tp.partition)).set(ages.get(tp.partition, 0.0))
        return ages

    def stuck_partitions(self) -> dict[int, float]:
        """Partitions whose oldest unfinished record is older than ``CLS_STUCK_RECORD_S`` (readiness)."""
        limit = self.settings.worker.stuck_record_s
        if limit is None and self.pipeline.handler_timeout_s:
            limit = self.pipeline.handler_timeout_s + 300
        if limit is None:
            return {}
        return {p: round(age, 1) for p, age in self.observe_oldest().items() if age > limit}

    # ---------------------------------------------------------------- per record
    def _start(self, tp: TopicPartition, record: ConsumerRecord, *, start_count: int = 1, mark_first: bool = False,
               crash_loop: bool = False) -> None:
        """Take a record (its offset becomes pending) and run it, or park it until its lane has a slot."""
        key = (tp, record.offset)
        if key in self._jobs:  # already in flight (a re-fetch after resume): never twice
            return
        if tp in self._rewind and record.offset <= self._rewind[tp]:
            del self._rewind[tp]  # the rewind reached its target
        self._offsets.setdefault(tp, PartitionOffsets()).take(record.offset)
        job = _Job(record=record, tp=tp, start_count=start_count, mark_first=mark_first, crash_loop=crash_loop)
        job.lane = self._lane_of(job)
        self._jobs[key] = job
        self._taken += 1
        metrics.RECORDS_CONSUMED.labels(tp.topic).inc()
        if crash_loop or (self._lanes.can_start(job.lane) and not self._suspects.active):
            self._launch(job)
        else:
            self._lanes.park(job)

    def _lane_of(self, job: _Job) -> str:
        lane = self.pipeline.lane_of_topic(job.tp.topic)
        if self.pipeline.lane_for is None or len(self._lanes.budgets) < 2:
            return lane
        try:
            job.body = parse_json_object(job.record.value)
        except NotAJsonObject:
            return lane
        chosen = self.pipeline.lane_for(job.body, lane)
        return chosen if chosen in self._lanes.budgets else lane

    def _launch(self, job: _Job) -> None:
        self._lanes.started(job)
        metrics.LANE_WAIT_SECONDS.labels(job.lane).observe(time.monotonic() - job.started)
        metrics.IN_FLIGHT.labels(job.tp.topic).set(len(self._jobs))
        tp, record = job.tp, job.record
        job.task = asyncio.create_task(self._run_job(job), name=f"record-{tp.topic}-{tp.partition}-{record.offset}")

    def _launch_parked(self) -> None:
        if self._suspects.active:  # nothing else starts while a suspect waits or runs
            return
        for job in self._lanes.ready():
            self._launch(job)

    def _unpark(self, jobs: list[_Job]) -> None:
        """Forget parked (never started) jobs: their offsets stay pending, they are read again later."""
        for job in jobs:
            if not job.parked:
                continue
            if job.held:
                self._suspects.remove(job)
                self._held.discard(job.tp)
            else:
                self._lanes.unpark(job)
            self._jobs.pop((job.tp, job.record.offset), None)
            self._taken -= 1
            offsets = self._offsets.get(job.tp)
            if offsets is not None:
                offsets.abandon(job.record.offset)

    async def _run_job(self, job: _Job) -> None:
        """Handle one record until it ends: the termination rule lives here."""
        record = job.record
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(topic=record.topic, partition=record.partition, offset=record.offset)
        outcome = "handled"
        produced = 0
        log.debug("record_received", key=record.key.decode("utf-8", "replace") if record.key else None)
        worker = self.settings.worker
        attempt = 0
        try:
            if job.mark_first:
                await self._mark_started(job)
            if job.crash_loop:
                message = (f"the worker died {job.start_count} times while handling this record "
                           f"(CLS_MAX_ATTEMPTS={self.max_attempts})")
                await self._to_dlq(record, "crash_loop", message)
                produced = await self._answer_dead_letter(job, "crash_loop", message)
                outcome = "dlq"
                return
            while True:
                attempt += 1
                try:
                    outcome, produced = await self._process(job)
                    return
                except (asyncio.CancelledError, Abandoned):
                    raise
                except Exception as exc:  # noqa: BLE001 - the termination rule decides
                    deterministic = isinstance(exc, (EventTooLarge, MessageSizeTooLargeError, RecordTooLargeError))
                    if attempt < self.max_attempts and not deterministic and not self._stopping.is_set():
                        delay = min(worker.retry_backoff_max_s, worker.retry_backoff_s * (2 ** (attempt - 1)))
                        log.warning("record_attempt_failed", attempt=attempt, max_attempts=self.max_attempts,
                                    error=repr(exc)[:500], retry_in_s=round(delay, 3))
                        await asyncio.sleep(delay)
                        continue
                    log.error("record_attempts_ended", attempt=attempt, error=repr(exc)[:500])
                    outcome, produced = await self._end(job, exc)
                    return
        except asyncio.CancelledError:
            outcome = "abandoned"
            raise
        except Abandoned as exc:
            outcome = "abandoned"
            log.warning("record_left_uncommitted", reason=exc.reason)
        except Exception as exc:  # noqa: BLE001 - even the dead letter failed: leave it, never commit past it
            outcome = "abandoned"
            log.exception("record_could_not_end", error=repr(exc)[:500])
            await asyncio.sleep(min(worker.retry_backoff_max_s, 1.0))
            self._retry_later(job)
        finally:
            await self._finish(job, outcome, produced)

    async def _end(self, job: _Job, exc: BaseException) -> tuple[str, int]:
        """End a record that cannot succeed: a failed event when it can be built and fits, else a dead letter."""
        code = error_code_of(exc)
        message = f"{type(exc).__name__}: {exc}"[:1000]
        if job.entity_id is not None:
            error = ErrorInfo(code=code, message=message, retryable=False)
            try:
                await self._publish(self.pipeline.failed_event(job.entity_id, error), job.entity_id)
                return "failed", 1
            except Abandoned:
                raise
            except Exception as publish_exc:  # noqa: BLE001 - fall back to the dead letter
                log.warning("failed_event_not_published", error=repr(publish_exc)[:300])
        await self._to_dlq(job.record, code, message)
        return "dlq", 0 if job.entity_id is not None else await self._answer_dead_letter(job, code, message)

    def _readable_id(self, record: ConsumerRecord) -> str | None:
        """The request/job id a record names (body, else key), when one can be read without handling it."""
        if record.value is None:  # a tombstone names no request
            return None
        try:
            body = parse_json_object(record.value)
        except NotAJsonObject:
            body = {}
        try:
            return entity_id_of(body, self.pipeline.id_field, record.key)
        except InvalidId:
            return None

    async def _answer_dead_letter(self, job: _Job, code: str, message: str) -> int:
        """A dead-lettered record whose id can be read is answered with a ``failed`` event with the dead
        letter's code, so the backend hears an end (best effort: the dead letter is already acknowledged)."""
        entity_id = job.entity_id or self._readable_id(job.record)
        if entity_id is None:
            return 0
        error = ErrorInfo(code=code, message=message[:1000], retryable=False)
        try:
            await self._publish(self.pipeline.failed_event(entity_id, error), entity_id)
        except (asyncio.CancelledError, Abandoned):
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. an id too long for an event: the dead letter stands alone
            log.warning("dead_letter_not_answered", code=code, error=repr(exc)[:300])
            return 0
        return 1

    async def _process(self, job: _Job) -> tuple[str, int]:
        record = job.record
        try:
            body = job.body if job.body is not None else parse_json_object(record.value)
        except NotAJsonObject as exc:
            await self._to_dlq(record, "not_json_object", str(exc))
            return "dlq", await self._answer_dead_letter(job, "not_json_object", str(exc))
        try:
            entity_id = entity_id_of(body, self.pipeline.id_field, record.key)
        except InvalidId as exc:
            await self._to_dlq(record, "invalid_id", str(exc))
            return "dlq", 0
        job.entity_id = entity_id
        if entity_id is not None:
            structlog.contextvars.bind_contextvars(**{self.pipeline.id_field: entity_id})
        bad_text_at = unpaired_surrogate_at(record.value, body)
        if bad_text_at is not None:
            request: Any = Invalid(entity_id=entity_id, details=[], body=body,
                                   message=f"invalid request: {bad_text_at}: not valid Unicode text (unpaired surrogate)")
        else:
            request = decode(self.pipeline.adapter, body, self.pipeline.id_field, record.key)
        if isinstance(request, Invalid):
            if request.entity_id is None:
                await self._to_dlq(record, "invalid_no_id", request.message)
                return "dlq", 0
            metrics.RECORDS_INVALID.labels(record.topic).inc()
            error = ErrorInfo(code="invalid_request", message=request.message[:2000], details=request.details or None,
                              details_omitted=request.details_omitted or None, retryable=False)
            await self._publish(self.pipeline.failed_event(request.entity_id, error), request.entity_id)
            return "invalid", 1
        if getattr(request, self.pipeline.id_field) is None:
            # No id in the body and no key: derived from the record's position, so a redelivery
            # of the same record gets the same id (and the same message ids).
            derived = derive_message_id("record", record.topic, record.partition, record.offset)
            request = request.model_copy(update={self.pipeline.id_field: derived})
        entity_id = getattr(request, self.pipeline.id_field)
        job.entity_id = entity_id
        structlog.contextvars.bind_contextvars(**{self.pipeline.id_field: entity_id})
        if self.pipeline.with_lane is not None:
            request = self.pipeline.with_lane(request, job.lane)
        exit_on = self.settings.worker.fault_exit_on_request
        if exit_on is not None and entity_id == exit_on:
            log.warning("fault_injection_exit", request=entity_id)
            os._exit(137)  # test-only: the process dies while handling this record
        return await self._handle_with_retries(request, entity_id)

    async def _handle_with_retries(self, request: Any, entity_id: str) -> tuple[str, int]:
        worker = self.settings.worker
        attempt = 0
        produced = 0
        while True:
            try:
                produced += await self._run_handler(request, entity_id)
                return "handled", produced
            except Abandoned as exc:
                log.info("record_abandoned", reason=exc.reason)
                return "abandoned", produced
            except RetryableError as exc:
                if attempt >= worker.retry_attempts or self._stopping.is_set():
                    error = ErrorInfo(code=exc.code, message=exc.message[:2000], retryable=True)
                    await self._publish(self.pipeline.failed_event(entity_id, error), entity_id)
                    return "failed", produced + 1
                delay = min(worker.retry_backoff_max_s, worker.retry_backoff_s * (2**attempt))
                delay *= 0.5 + random.random() / 2
                attempt += 1
                metrics.RETRIES.labels(self.pipeline.input_topic).inc()
                log.warning("handler_retry", code=exc.code, error=exc.message[:500], attempt=attempt,
                            delay_s=round(delay, 3))
                await asyncio.sleep(delay)
            except HandlerError as exc:
                error = ErrorInfo(code=exc.code, message=exc.message[:2000], retryable=False)
                await self._publish(self.pipeline.failed_event(entity_id, error), entity_id)
                return "failed", produced + 1
            except TimeoutError:
                error = ErrorInfo(code="timeout", message=f"request not handled within {self.pipeline.handler_timeout_s}s")
                await self._publish(self.pipeline.failed_event(entity_id, error), entity_id)
                return "failed", produced + 1
            except (KafkaError, EventTooLarge, asyncio.CancelledError):
                raise
            except Exception as exc:  # a bug in a handler: a typed failed event, never a crash loop
                log.exception("handler_crashed", error=repr(exc)[:500])
                error = ErrorInfo(code="internal_error", message=f"{type(exc).__name__}: {exc}"[:1000], retryable=False)
                await self._publish(self.pipeline.failed_event(entity_id, error), entity_id)
                return "failed", produced + 1

    async def _run_handler(self, request: Any, entity_id: str) -> int:
        produced = 0

        async def consume_events() -> None:
            nonlocal produced
            async for event in self.pipeline.handle(request):
                await self._publish(event, entity_id)
                produced += 1

        if self.pipeline.handler_timeout_s:
            async with asyncio.timeout(self.pipeline.handler_timeout_s):
                await consume_events()
        else:
            await consume_events()
        return produced

    async def _publish(self, event: OutputModel, entity_id: str) -> None:
        """Produce one event and wait for the broker's acknowledgement (acks=all).

        The event must fit ``CLS_MAX_RECORD_BYTES`` (else ``EventTooLarge``, before anything is sent).
        Transport errors are retried here, with backoff, for as long as the broker is away; when the
        worker stops meanwhile the record is left uncommitted (``Abandoned``).
        """
        topic = self.pipeline.output_topic
        value = event.to_json_bytes()
        key = entity_id.encode()
        headers = self.pipeline.headers_for(event, entity_id)
        size = len(value) + len(key) + sum(len(k) + len(v) for k, v in headers)
        limit = self.settings.worker.max_record_bytes
        if size > limit:
            raise EventTooLarge(size, limit, f"the {getattr(event, 'event_type', 'event')} event")
        await self._send_with_retry(topic, value, key, headers, entity_id)
        metrics.EVENTS_PRODUCED.labels(topic).inc()

    async def _send_with_retry(self, topic: str, value: bytes | None, key: bytes | None,
                               headers: list[tuple[str, bytes]], entity_id: str | None) -> None:
        worker = self.settings.worker
        delay = worker.retry_backoff_s or 0.05
        while True:
            try:
                if entity_id is not None and self._fail_publishes.get(entity_id, 0) > 0:
                    self._fail_publishes[entity_id] -= 1  # test-only fault injection
                    raise KafkaConnectionError(f"fault injection: publish for {entity_id} fails")
                await self.producer.send_and_wait(topic, value=value, key=key, headers=headers)
                return
            except Exception as exc:
                if not is_transport_error(exc):
                    raise
                if self._stopping.is_set():
                    raise Abandoned(f"broker unreachable while stopping: {exc!r}"[:300]) from exc
                log.warning("publish_retry", error=repr(exc)[:300], delay_s=round(delay, 3))
                await asyncio.sleep(delay)
                delay = min(max(worker.retry_backoff_max_s, 0.05), delay * 2)

    async def _to_dlq(self, record: ConsumerRecord, code: str, message: str) -> None:
        """Dead-letter ``record``, cut to fit (``consumers.dlq``: a key or header of any size never makes
        the send fail for good)."""
        letter = dead_letter_for(record, code, message, self.settings.worker.max_record_bytes + DLQ_HEADROOM_BYTES)
        await self._send_with_retry(letter.topic, letter.value, letter.key, letter.headers, None)
        metrics.RECORDS_DLQ.labels(record.topic, code).inc()
        log.warning("record_dead_lettered", code=code, error=message[:300])

    async def _mark_started(self, job: _Job) -> None:
        """Write "started N times" into the commit metadata of the record's offset, before handling it."""
        consumer = self._consumer
        offsets = self._offsets.get(job.tp)
        if consumer is None or offsets is None:
            return
        async with self._commit_lock:
            try:
                await consumer.commit({job.tp: (job.record.offset, attempts_metadata(job.start_count))})
                offsets.committed = job.record.offset
                head = self._heads.get(job.tp)
                if head is not None:
                    head.offset, head.attempts = job.record.offset, job.start_count
            except (CommitFailedError, KafkaError) as exc:
                log.warning("attempt_mark_failed", partition=job.tp.partition, error=repr(exc))

    async def _unmark(self, job: _Job, offsets: PartitionOffsets) -> None:
        """A record left for redelivery on purpose (shutdown, revocation) did not kill the worker: take
        this start back out of the count in the commit metadata, so deploys never add up to a crash loop."""
        consumer = self._consumer
        if consumer is None or offsets.committed != job.record.offset or job.tp not in consumer.assignment():
            return
        async with self._commit_lock:
            try:
                await consumer.commit({job.tp: (job.record.offset, attempts_metadata(job.start_count - 1))})
                head = self._heads.get(job.tp)
                if head is not None and head.offset == job.record.offset:
                    head.attempts = job.start_count - 1
            except (CommitFailedError, KafkaError) as exc:
                log.warning("attempt_unmark_failed", partition=job.tp.partition, error=repr(exc))

    def _retry_later(self, job: _Job) -> None:
        """Re-read an unfinished record (its partition is still ours and we are not stopping).

        Several records of one partition may fail in any order: the partition is rewound to the lowest
        of them, so none is skipped (records after it that already finished are handled again).
        """
        consumer = self._consumer
        if consumer is None or self._stopping.is_set() or job.tp not in consumer.assignment():
            return
        target = min(self._rewind.get(job.tp, job.record.offset), job.record.offset)
        self._rewind[job.tp] = target
        consumer.seek(job.tp, target)

    async def _finish(self, job: _Job, outcome: str, produced: int) -> None:
        record = job.record
        key = (job.tp, record.offset)
        offsets = self._offsets.get(job.tp)
        self._jobs.pop(key, None)
        self._lanes.finished(job)
        self._suspects.finished(job)
        if job.held:
            self._held.discard(job.tp)
        if not self._stopping.is_set():
            # The freed slot goes to the next suspect, else the lane's next parked record, now, not when the
            # poll loop next comes round (it may be waiting up to poll_timeout_ms for new records meanwhile).
            self._launch_suspect()
            self._launch_parked()
        self._slot_freed.set()
        metrics.IN_FLIGHT.labels(record.topic).set(len(self._jobs))
        elapsed = time.monotonic() - job.started
        self.stats[outcome] = self.stats.get(outcome, 0) + 1
        if outcome == "abandoned":
            self._taken -= 1  # not handled: --max-jobs / max_records still waits for it
            if offsets is not None:
                offsets.abandon(record.offset)
                await self._unmark(job, offsets)
            log.info("record_left_for_redelivery", elapsed_s=round(elapsed, 3))
            return
        crash_at = self.settings.worker.fault_crash_after_publish
        self._handled += 1
        if crash_at is not None and self._handled >= crash_at:
            log.warning("fault_injection_crash", handled=self._handled)
            os._exit(137)  # test-only: events acknowledged, offset not committed
        if offsets is not None:
            offsets.done(record.offset)
            await self._commit(job.tp)
        metrics.RECORDS_HANDLED.labels(record.topic, outcome).inc()
        metrics.HANDLER_SECONDS.labels(record.topic).observe(elapsed)
        metrics.LANE_LATENCY_SECONDS.labels(job.lane).observe(elapsed)
        log.info("record_done", outcome=outcome, events=produced, elapsed_s=round(elapsed, 3))

    async def _commit(self, tp: TopicPartition) -> None:
        """Commit the partition's committable offset; when the record there is in flight, its start
        count goes into the commit metadata (so a process death while handling it is counted).

        Records finishing while a commit is in flight wait for the lock; by then that commit (or the next
        one) covers them, so one commit request serves many short records (``cls_offset_commits_total``)."""
        consumer = self._consumer
        offsets = self._offsets.get(tp)
        if consumer is None or offsets is None:
            return
        async with self._commit_lock:
            offset = offsets.committable()
            if offset is None:
                return
            running = self._jobs.get((tp, offset))
            count = running.start_count if running is not None and not running.crash_loop else 0
            try:
                await consumer.commit({tp: (offset, attempts_metadata(count))})
                offsets.committed = offset
                metrics.COMMITS.labels(self.pipeline.input_topic).inc()
                head = self._heads.get(tp)
                if head is not None:
                    head.offset, head.attempts = offset, count
            except (CommitFailedError, KafkaError) as exc:
                # Partition lost in a rebalance: the new owner re-handles from its last commit
                # (at-least-once; ids are deterministic, so the duplicates fold away).
                log.warning("commit_failed", partition=tp.partition, offset=offset, error=repr(exc))

    # ---------------------------------------------------------------- rebalance & shutdown
    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._paused_by_us -= assigned
        for tp in assigned:
            self._heads.pop(tp, None)  # re-read the committed metadata before taking its records
        log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        if not revoked:  # aiokafka calls this with nothing before the first assignment
            return
        self._unpark([job for job in self._jobs.values() if job.tp in revoked and job.parked])
        jobs = [job for job in self._jobs.values() if job.tp in revoked]
        log.info("partitions_revoked", partitions=sorted(tp.partition for tp in revoked), in_flight=len(jobs))
        if jobs:
            ids = {job.entity_id for job in jobs if job.entity_id}
            if self.pipeline.on_preempt is not None and ids:
                self.pipeline.on_preempt(ids)
            await self._wait_for(jobs, self.settings.worker.drain_timeout_s)
        for tp in revoked:
            await self._commit(tp)
            self._offsets.pop(tp, None)
            self._rewind.pop(tp, None)
            self._heads.pop(tp, None)
            self._held.discard(tp)
            metrics.OLDEST_UNFINISHED.labels(self.pipeline.input_topic, str(tp.partition)).set(0)
        self._paused_by_us -= revoked

    async def _drain(self) -> None:
        self._unpark([job for job in self._jobs.values() if job.parked])
        jobs = list(self._jobs.values())
        if jobs:
            log.info("draining", in_flight=len(jobs), deadline_s=self.settings.worker.drain_timeout_s)
            ids = {job.entity_id for job in jobs if job.entity_id}
            if self.pipeline.on_preempt is not None and ids and self._stopping.is_set():
                self.pipeline.on_preempt(ids)
            await self._wait_for(jobs, self.settings.worker.drain_timeout_s, keep_polling=True)
        for tp in list(self._offsets):
            await self._commit(tp)

    async def _wait_for(self, jobs: list[_Job], timeout_s: float, keep_polling: bool = False) -> None:
        consumer = self._consumer
        tasks = [job.task for job in jobs if job.task is not None and not job.task.done()]
        if not tasks:
            return
        deadline = time.monotonic() + timeout_s
        pending = set(tasks)
        while pending and time.monotonic() < deadline:
            wait_s = min(0.5, max(0.01, deadline - time.monotonic()))
            if keep_polling and consumer is not None:
                # Every partition paused: polling keeps the group membership alive, returns nothing.
                self._apply_pauses(True)
                await consumer.getmany(timeout_ms=1)
            _, pending = await asyncio.wait(pending, timeout=wait_s)
        if pending:
            log.warning("drain_deadline_passed", unfinished=len(pending))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


def _parse_fault_counts(spec: str | None) -> dict[str, int]:
    """``"id-a:3,id-b:1"`` -> {"id-a": 3, "id-b": 1} (test-only fault injection)."""
    counts: dict[str, int] = {}
    for item in (spec or "").split(","):
        if item.strip():
            name, _, count = item.strip().rpartition(":")
            counts[name] = int(count)
    return counts
