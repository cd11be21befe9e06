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
finished and leaves the rest for redelivery.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError

from consumers import metrics
from consumers.dlq import dead_letter
from consumers.offsets import PartitionOffsets
from consumers.pipeline import Pipeline
from consumers.settings import Settings
from handlers.errors import HandlerError, RetryableError
from handlers.lifecycle import Abandoned
from schemas.codec import Invalid, NotAJsonObject, decode, entity_id_of, parse_json_object
from schemas.common import ErrorInfo, OutputModel

log = structlog.get_logger("cls.runtime")


@dataclass
class _Job:
    record: ConsumerRecord
    tp: TopicPartition
    entity_id: str | None = None
    task: asyncio.Task[None] | None = None
    started: float = field(default_factory=time.monotonic)


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


class ConsumerRuntime:
    """Runs one pipeline on one consumer group until stopped (or ``max_records`` handled)."""

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
        self._commit_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._taken = 0
        self._rewind: dict[TopicPartition, int] = {}
        self._handled = 0
        self._paused_by_us: set[TopicPartition] = set()
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
            max_partition_fetch_bytes=worker.max_record_bytes,
            isolation_level="read_committed",
        )
        if self._producer is None:
            self._producer = new_producer(self.settings)
        try:
            if self._owns_producer:
                await self._producer.start()
            await self._consumer.start()
            self._consumer.subscribe([self.pipeline.input_topic], listener=_Rebalance(self))
            self.ready = True
            log.info("consumer_started", topic=self.pipeline.input_topic, group=self.group_id,
                     max_in_flight=self.max_in_flight)
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
            capacity = self.max_in_flight - len(self._jobs)
            if self.max_records is not None:
                capacity = min(capacity, self.max_records - self._taken)
            self._set_paused(capacity <= 0)
            batches = await consumer.getmany(timeout_ms=worker.poll_timeout_ms, max_records=max(capacity, 1))
            for tp, records in batches.items():
                for record in records:
                    self._start(tp, record)

    def _set_paused(self, paused: bool) -> None:
        consumer = self._consumer
        assert consumer is not None
        assignment = consumer.assignment()
        if paused:
            to_pause = assignment - self._paused_by_us
            if to_pause:
                consumer.pause(*to_pause)
                self._paused_by_us |= to_pause
        elif self._paused_by_us:
            to_resume = self._paused_by_us & assignment
            if to_resume:
                consumer.resume(*to_resume)
            self._paused_by_us.clear()
        metrics.PAUSED_PARTITIONS.labels(self.pipeline.input_topic).set(len(self._paused_by_us))

    # ---------------------------------------------------------------- per record
    def _start(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        key = (tp, record.offset)
        if key in self._jobs:  # already in flight (a re-fetch after resume): never twice
            return
        if tp in self._rewind and record.offset <= self._rewind[tp]:
            del self._rewind[tp]  # the rewind reached its target
        self._offsets.setdefault(tp, PartitionOffsets()).take(record.offset)
        job = _Job(record=record, tp=tp)
        self._jobs[key] = job
        self._taken += 1
        metrics.RECORDS_CONSUMED.labels(tp.topic).inc()
        metrics.IN_FLIGHT.labels(tp.topic).set(len(self._jobs))
        job.task = asyncio.create_task(self._run_job(job), name=f"record-{tp.topic}-{tp.partition}-{record.offset}")

    async def _run_job(self, job: _Job) -> None:
        record = job.record
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(topic=record.topic, partition=record.partition, offset=record.offset)
        outcome = "handled"
        produced = 0
        log.debug("record_received", key=record.key.decode("utf-8", "replace") if record.key else None)
        try:
            outcome, produced = await self._process(job)
        except asyncio.CancelledError:
            outcome = "abandoned"
            raise
        except Exception as exc:  # publishing failed (broker unreachable past the producer's retries)
            outcome = "abandoned"
            log.exception("record_publish_failed", error=repr(exc))
            await asyncio.sleep(min(self.settings.worker.retry_backoff_max_s, 1.0))  # no hot loop while the broker is down
            self._retry_later(job)
        finally:
            await self._finish(job, outcome, produced)

    async def _process(self, job: _Job) -> tuple[str, int]:
        record = job.record
        try:
            body = parse_json_object(record.value)
        except NotAJsonObject as exc:
            await self._to_dlq(record, "not_json_object", str(exc))
            return "dlq", 0
        entity_id = entity_id_of(body, self.pipeline.id_field, record.key)
        job.entity_id = entity_id
        if entity_id is not None:
            structlog.contextvars.bind_contextvars(**{self.pipeline.id_field: entity_id})
        request = decode(self.pipeline.adapter, body, self.pipeline.id_field, record.key)
        if isinstance(request, Invalid):
            if request.entity_id is None:
                await self._to_dlq(record, "invalid_no_id", request.message)
                return "dlq", 0
            metrics.RECORDS_INVALID.labels(record.topic).inc()
            error = ErrorInfo(code="invalid_request", message=request.message, details=request.details, retryable=False)
            await self._publish(self.pipeline.failed_event(request.entity_id, error), request.entity_id)
            return "invalid", 1
        if getattr(request, self.pipeline.id_field) is None:
            request = request.model_copy(update={self.pipeline.id_field: str(uuid.uuid4())})
        entity_id = getattr(request, self.pipeline.id_field)
        job.entity_id = entity_id
        structlog.contextvars.bind_contextvars(**{self.pipeline.id_field: entity_id})
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
                    error = ErrorInfo(code=exc.code, message=exc.message, retryable=True)
                    await self._publish(self.pipeline.failed_event(entity_id, error), entity_id)
                    return "failed", produced + 1
                delay = min(worker.retry_backoff_max_s, worker.retry_backoff_s * (2**attempt))
                delay *= 0.5 + random.random() / 2
                attempt += 1
                metrics.RETRIES.labels(self.pipeline.input_topic).inc()
                log.warning("handler_retry", code=exc.code, error=exc.message, attempt=attempt, delay_s=round(delay, 3))
                await asyncio.sleep(delay)
            except HandlerError as exc:
                error = ErrorInfo(code=exc.code, message=exc.message, retryable=False)
                await self._publish(self.pipeline.failed_event(entity_id, error), entity_id)
                return "failed", produced + 1
            except TimeoutError:
                error = ErrorInfo(code="timeout", message=f"request not handled within {self.pipeline.handler_timeout_s}s")
                await self._publish(self.pipeline.failed_event(entity_id, error), entity_id)
                return "failed", produced + 1
            except (KafkaError, asyncio.CancelledError):
                raise
            except Exception as exc:  # a bug in a handler: a typed failed event, never a crash loop
                log.exception("handler_crashed", error=repr(exc))
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
        """Produce one event and wait for the broker's acknowledgement (acks=all)."""
        topic = self.pipeline.output_topic
        await self.producer.send_and_wait(
            topic,
            value=event.to_json_bytes(),
            key=entity_id.encode(),
            headers=self.pipeline.headers_for(event, entity_id),
        )
        metrics.EVENTS_PRODUCED.labels(topic).inc()

    async def _to_dlq(self, record: ConsumerRecord, code: str, message: str) -> None:
        await dead_letter(self.producer, record, code, message)
        log.warning("record_dead_lettered", code=code, error=message[:300])

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
        metrics.IN_FLIGHT.labels(record.topic).set(len(self._jobs))
        elapsed = time.monotonic() - job.started
        self.stats[outcome] = self.stats.get(outcome, 0) + 1
        if outcome == "abandoned":
            self._taken -= 1  # not handled: --max-jobs / max_records still waits for it
            if offsets is not None:
                offsets.abandon(record.offset)
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
        log.info("record_done", outcome=outcome, events=produced, elapsed_s=round(elapsed, 3))

    async def _commit(self, tp: TopicPartition) -> None:
        consumer = self._consumer
        offsets = self._offsets.get(tp)
        if consumer is None or offsets is None:
            return
        async with self._commit_lock:
            offset = offsets.committable()
            if offset is None:
                return
            try:
                await consumer.commit({tp: offset})
                offsets.committed = offset
            except (CommitFailedError, KafkaError) as exc:
                # Partition lost in a rebalance: the new owner re-handles from its last commit
                # (at-least-once; ids are deterministic, so the duplicates fold away).
                log.warning("commit_failed", partition=tp.partition, offset=offset, error=repr(exc))

    # ---------------------------------------------------------------- rebalance & shutdown
    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._paused_by_us -= assigned
        log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        if not revoked:  # aiokafka calls this with nothing before the first assignment
            return
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
        self._paused_by_us -= revoked

    async def _drain(self) -> None:
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
                self._set_paused(True)
                await consumer.getmany(timeout_ms=1)
            _, pending = await asyncio.wait(pending, timeout=wait_s)
        if pending:
            log.warning("drain_deadline_passed", unfinished=len(pending))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
