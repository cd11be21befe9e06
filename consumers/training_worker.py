"""``cls-worker training``: the training context and the request consumer, with the control-topic reader.

Every training worker reads all partitions of the compacted control topic outside the consumer group,
from the beginning, before it takes its first job (``consumers.control_reader``): a cancel that arrived
before its job, or before a restart, still applies. Jobs run one at a time; while one runs every
partition is paused and polling goes on (the runtime), so a multi-hour job never triggers a rebalance.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from consumers import metrics
from consumers.control_reader import ControlReader
from consumers.health import HealthServer
from consumers.pipeline import Pipeline
from consumers.runtime import ConsumerRuntime
from consumers.settings import Settings, WorkerSettings
from consumers.worker import configure_torch_threads, decode_limits, manifest_limits, serve, storage_and_fetcher
from handlers.executor import Executors
from handlers.cancels import CancelRegistry
from handlers.training import TrainingContext, TrainingHandler, TrainingSettings, failed_status
from schemas.codec import TRAINING_ADAPTER

log = structlog.get_logger("cls.training_worker")


def training_settings(w: WorkerSettings) -> TrainingSettings:
    """The training handler's settings; a ``completed`` event's metrics get an eighth of the record size."""
    return TrainingSettings(work_dir=w.training_work_dir, dataset_cache_dir=w.dataset_cache_dir,
                            checkpoint_suffix=w.checkpoint_prefix_suffix, heartbeat_s=w.heartbeat_s,
                            device=w.device, download_concurrency=w.fetch_concurrency,
                            max_metrics_bytes=w.max_record_bytes // 8,
                            memory_budget_bytes=training_memory_budget(w), max_workers=w.training_max_workers,
                            allowed_models=tuple(p.strip() for p in w.allowed_training_models.split(",") if p.strip()),
                            manifest_limits=manifest_limits(w), dataset_cache_bytes=w.dataset_cache_mb * 1024 * 1024)


def training_memory_budget(w: WorkerSettings) -> int:
    """CLS_TRAINING_MEMORY_BUDGET_MB, or half the memory available at start-up."""
    from ml.training.memory import default_memory_budget_bytes

    mb = w.training_memory_budget_mb
    return mb * 1024 * 1024 if mb is not None else default_memory_budget_bytes()


@contextlib.asynccontextmanager
async def training_context(settings: Settings):
    w = settings.worker
    executors = Executors()
    async with storage_and_fetcher(settings) as (store, fetcher):
        ctx = TrainingContext(
            settings=training_settings(w),
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
