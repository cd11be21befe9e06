"""``cls-worker training``: the control-topic reader, the training context, and the request consumer.

Every training worker reads all partitions of the compacted control topic outside the consumer group,
from the beginning, before it takes its first job: a cancel that arrived before its job, or before a
restart, still applies. Jobs run one at a time; while one runs every partition is paused and polling
goes on (the runtime), so a multi-hour job never triggers a rebalance.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from consumers import metrics
from consumers.annotation_worker import decode_limits, storage_and_fetcher
from consumers.dlq import dead_letter
from consumers.health import HealthServer
from consumers.pipeline import Pipeline
from consumers.runtime import ConsumerRuntime
from consumers.settings import Settings
from consumers.topics_admin import topic_partitions
from consumers.worker import configure_torch_threads, serve
from handlers.executor import Executors
from handlers.training import CancelRegistry, TrainingContext, TrainingHandler, TrainingSettings, failed_status
from schemas.codec import CANCEL_ADAPTER, TRAINING_ADAPTER, NotAJsonObject, decode, parse_json_object

log = structlog.get_logger("cls.training_worker")


class ControlReader:
    """Follows the control topic (all partitions, no group) and feeds the cancel registry."""

    def __init__(self, settings: Settings, cancels: CancelRegistry, producer: Callable[[], Any]) -> None:
        self.settings = settings
        self.cancels = cancels
        self._producer = producer  # the runtime's producer, once it has started
        self.topic = settings.worker.training_control_topic
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self, catch_up_timeout_s: float = 60.0) -> None:
        self._consumer = AIOKafkaConsumer(**self.settings.kafka.client_kwargs(), group_id=None,
                                          enable_auto_commit=False, auto_offset_reset="earliest")
        await self._consumer.start()
        deadline = time.monotonic() + catch_up_timeout_s
        tps = await topic_partitions(self._consumer, self.topic, catch_up_timeout_s)
        if not tps:
            raise ValueError(f"control topic {self.topic} does not exist (run `cls-worker topics create`)")
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        ends = await self._consumer.end_offsets(tps)
        # catch up before the first job is taken
        while await self._behind(ends):
            if time.monotonic() > deadline:
                log.warning("control_catch_up_timeout")
                break
            await self._poll_once()
        self.cancels.caught_up.set()
        log.info("control_topic_caught_up", cancelled=len(self.cancels))
        self._task = asyncio.create_task(self._follow())

    async def _behind(self, ends: dict[TopicPartition, int]) -> bool:
        assert self._consumer is not None
        for tp, end in ends.items():
            if await self._consumer.position(tp) < end:
                return True
        return False

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

    async def _apply(self, record) -> None:
        if record.value is None:  # tombstone: the cancel was retracted (compaction removes it)
            if record.key:
                self.cancels.uncancel(record.key.decode("utf-8", "replace"))
            return
        try:
            body = parse_json_object(record.value)
        except NotAJsonObject as exc:
            await self._dlq(record, "not_json_object", str(exc))
            return
        cancel = decode(CANCEL_ADAPTER, body, "job_id", record.key)
        job_id = getattr(cancel, "job_id", None)
        if not job_id:
            await self._dlq(record, "invalid_cancel", getattr(cancel, "message", "no job id"))
            return
        self.cancels.cancel(job_id, getattr(cancel, "reason", None))
        log.info("cancel_received", job_id=job_id)

    async def _dlq(self, record, code: str, message: str) -> None:
        if not self.cancels.caught_up.is_set():
            # replaying the topic at start-up: this record was dead-lettered when it first arrived
            log.warning("control_record_invalid", code=code, offset=record.offset)
            return
        await dead_letter(self._producer(), record, code, message)
        log.warning("control_record_dead_lettered", code=code, error=message[:300])

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


def training_memory_budget(settings: Settings) -> int:
    """CLS_TRAINING_MEMORY_BUDGET_MB, or half the memory available at start-up."""
    from ml.training.memory import default_memory_budget_bytes

    mb = settings.worker.training_memory_budget_mb
    return mb * 1024 * 1024 if mb is not None else default_memory_budget_bytes()


@contextlib.asynccontextmanager
async def training_context(settings: Settings):
    w = settings.worker
    executors = Executors()
    async with storage_and_fetcher(settings) as (store, fetcher):
        ctx = TrainingContext(
            settings=TrainingSettings(work_dir=w.training_work_dir, dataset_cache_dir=w.dataset_cache_dir,
                                      checkpoint_suffix=w.checkpoint_prefix_suffix, heartbeat_s=w.heartbeat_s,
                                      device=w.device, download_concurrency=w.fetch_concurrency,
                                      memory_budget_bytes=training_memory_budget(settings), max_workers=w.training_max_workers),
            store=store, fetcher=fetcher, decode_limits=decode_limits(settings),
            executors=executors, cancels=CancelRegistry(),
            on_epoch=metrics.TRAINING_EPOCH_SECONDS.observe,
        )
        try:
            yield ctx
        finally:
            # off the loop: a checkpoint upload on the training thread may still need the loop to finish
            await asyncio.to_thread(executors.shutdown)


def training_pipeline(settings: Settings, ctx: TrainingContext) -> Pipeline:
    return Pipeline(
        name="training.status",
        input_topic=settings.worker.training_requests_topic,
        output_topic=settings.worker.training_status_topic,
        adapter=TRAINING_ADAPTER,
        id_field="job_id",
        handle=TrainingHandler(ctx).handle,
        failed_event=failed_status,
        handler_timeout_s=None,
        on_preempt=ctx.preempt,
    )


async def run_training_worker(settings: Settings, max_jobs: int | None = None) -> int:
    configure_torch_threads(settings.worker.torch_threads)
    async with training_context(settings) as ctx:
        runtime: ConsumerRuntime | None = None
        control = ControlReader(settings, ctx.cancels, lambda: runtime.producer)
        # The control topic is caught up after the consumer joined and before its first poll, so no job
        # is taken before the cancels that precede it are known.
        runtime = ConsumerRuntime(settings, training_pipeline(settings, ctx), group_id=settings.worker.training_group_id,
                                  max_in_flight=1, max_records=max_jobs, on_started=control.start)
        health = HealthServer(settings, runtime, models_ready=ctx.cancels.caught_up.is_set)
        await health.start()

        async def stop_all() -> None:
            await control.stop()
            await health.stop()

        return await serve(runtime, on_stop=stop_all)
