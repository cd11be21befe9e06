"""The training handler: one job from request to model package, with status events all the way.

Flow: cancelled already? -> ``cancelled``. Model already complete at ``output_path``? -> re-publish
``completed`` (same ids, no training). Else ``queued`` -> dataset prepared (labels checked, images
cached, bad ones counted) -> training on its own thread with a checkpoint after every epoch, uploaded
beside ``output_path`` (``<output_path>.checkpoints/``) -> ``running`` per epoch (and heartbeats) ->
package uploaded and verified -> ``completed``; or ``failed`` / ``cancelled``.

A redelivered job (the worker died) downloads the last checkpoint and resumes from it. A revoked
partition or a shutdown makes the job checkpoint at the next step and stop with no final status
(``Abandoned``): the record stays uncommitted and its next owner resumes it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from handlers.dataset import DatasetCache, prepare_dataset
from handlers.errors import HandlerError, PermanentError
from handlers.executor import Executors
from handlers.fetch import Fetcher
from handlers.images import DecodeLimits
from handlers.lifecycle import Abandoned
from handlers.storage import ObjectStore
from schemas.common import ErrorInfo
from schemas.training import (
    Progress,
    TrainingMetrics,
    TrainingRequest,
    TrainingStatus,
    status_seq,
)

log = structlog.get_logger("cls.training")

PACKAGE_FILES = ("model.safetensors", "config.json", "metrics.json")  # metrics.json last: it marks completion
OPTIONAL_PACKAGE_FILES = ("model.onnx", "report.html")  # uploaded when the package has them, before metrics.json
CHECKPOINT_FILE = "state.pt"


class CancelRegistry:
    """Job ids cancelled on the control topic (fed by the consumer layer, read by the training thread)."""

    def __init__(self) -> None:
        self._cancelled: dict[str, str | None] = {}
        self._lock = threading.Lock()
        self.caught_up = asyncio.Event()

    def cancel(self, job_id: str, reason: str | None = None) -> None:
        with self._lock:
            self._cancelled[job_id] = reason

    def uncancel(self, job_id: str) -> None:
        with self._lock:
            self._cancelled.pop(job_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._cancelled)

    def is_cancelled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled


@dataclass
class TrainingSettings:
    work_dir: str = "~/.cache/cls-workers/training"
    dataset_cache_dir: str = "~/.cache/cls-workers/images"
    checkpoint_suffix: str = ".checkpoints"
    heartbeat_s: float = 30.0
    device: str = "auto"
    download_concurrency: int = 16
    memory_budget_bytes: int | None = None  # None: half the memory available when a job is checked
    max_workers: int | None = None  # cap on num_workers; None: the usable CPU cores


@dataclass
class TrainingContext:
    settings: TrainingSettings
    store: ObjectStore
    fetcher: Fetcher
    decode_limits: DecodeLimits
    executors: Executors
    cancels: CancelRegistry
    preempted: set[str] = field(default_factory=set)
    on_epoch: Callable[[float], None] | None = None  # metrics hook (epoch seconds)

    def preempt(self, job_ids: set[str]) -> None:
        """Called by the runtime on revocation / shutdown: the job checkpoints and stops."""
        self.preempted |= job_ids


def status_event(job_id: str, status: str, *, epoch: int = 0, step: int | None = None, attempt: int = 1,
                 **fields: Any) -> TrainingStatus:
    return TrainingStatus(
        message_id=TrainingStatus.message_id_for(job_id, status, epoch, step),
        job_id=job_id, status=status, seq=status_seq(status, epoch, step), attempt=attempt,
        **fields,  # type: ignore[arg-type]
    )


def failed_status(job_id: str, error: ErrorInfo) -> TrainingStatus:
    return status_event(job_id, "failed", error=error)


class _Callbacks:
    """Bridge from the training thread to the event loop: events queued, stop requests read."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, ctx: TrainingContext, job_id: str,
                 checkpoint_url: str, workdir: Path, attempt: int) -> None:
        self.loop, self.queue, self.ctx, self.job_id = loop, queue, ctx, job_id
        self.checkpoint_url, self.workdir, self.attempt = checkpoint_url, workdir, attempt
        self.epochs = 1

    def _emit(self, event: TrainingStatus) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def on_epoch_end(self, epoch: int, epochs: int, metrics: dict[str, Any]) -> None:
        # The epoch's checkpoint is on local disk; copy it beside output_path before reporting the epoch,
        # so a crash after this event resumes at least from here.
        self._upload_checkpoint()
        if self.ctx.on_epoch is not None:
            self.ctx.on_epoch(float(metrics.get("epoch_time_s") or 0.0))
        self.epochs = epochs
        self._emit(status_event(self.job_id, "running", epoch=epoch, attempt=self.attempt,
                                progress=Progress(epoch=epoch, epochs=epochs, metrics=_clean(metrics))))

    def on_heartbeat(self, epoch: int, step: int, steps: int, metrics: dict[str, Any]) -> None:
        self._emit(status_event(self.job_id, "running", epoch=epoch, step=step, attempt=self.attempt, heartbeat=True,
                                progress=Progress(epoch=epoch, epochs=self.epochs, step=step, steps=steps,
                                                  metrics=_clean(metrics))))

    def should_stop(self) -> str | None:
        if self.ctx.cancels.is_cancelled(self.job_id):
            return "cancel"
        if self.job_id in self.ctx.preempted:
            return "preempt"
        return None

    def _upload_checkpoint(self) -> None:
        local = self.workdir / "checkpoint" / CHECKPOINT_FILE
        if local.exists():
            future = asyncio.run_coroutine_threadsafe(
                self.ctx.store.upload_file(local, f"{self.checkpoint_url}/{CHECKPOINT_FILE}"), self.loop)
            future.result(timeout=600)


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON-friendly progress metrics (floats rounded, nested/huge values dropped)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, float):
            out[key] = round(value, 6)
        elif isinstance(value, (int, str, bool)) or value is None:
            out[key] = value
    return out


_ML_ERROR_CODES = {
    "UnknownModelError": "unknown_model",
    "DatasetError": "invalid_dataset",
    "ConfigError": "invalid_request",
    "PretrainedWeightsError": "pretrained_unavailable",
    "PackageError": "package_failed",
}


class TrainingHandler:
    """``handle(request) -> async iterator of TrainingStatus``."""

    def __init__(self, ctx: TrainingContext) -> None:
        self.ctx = ctx

    async def handle(self, request: TrainingRequest) -> AsyncIterator[TrainingStatus]:
        ctx = self.ctx
        job_id = request.job_id or ""
        output = request.output_path.rstrip("/")
        checkpoint_url = output + ctx.settings.checkpoint_suffix
        ctx.preempted.discard(job_id)  # a stop request for an earlier delivery of this job is spent
        self._check_fences(request)
        done = await self._already_completed(output)
        if done is not None:  # a finished model is a fact, whatever came later on the control topic
            log.info("training_already_complete", output=output)
            yield status_event(job_id, "completed", metrics=TrainingMetrics(**done), model_url=output)
            return
        if ctx.cancels.is_cancelled(job_id):
            yield status_event(job_id, "cancelled", error=ErrorInfo(code="cancelled", message="cancelled before start"))
            return
        from ml.training import check_model_name

        try:
            check_model_name(request.config.model_name)
        except ValueError as exc:
            raise PermanentError("unknown_model", str(exc)) from exc
        num_workers = self._check_sizes(request)  # before any download or write
        attempt = await self._next_attempt(checkpoint_url)  # also proves output_path is writable
        yield status_event(job_id, "queued", attempt=attempt)

        workdir = Path(ctx.settings.work_dir).expanduser() / hashlib.sha256(f"{job_id}|{output}".encode()).hexdigest()[:24]
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        data = await prepare_dataset(
            request.dataset, fetcher=ctx.fetcher, executors=ctx.executors,
            cache=DatasetCache(ctx.settings.dataset_cache_dir), limits=ctx.decode_limits,
            max_bad_fraction=request.config.max_bad_fraction, concurrency=ctx.settings.download_concurrency,
        )
        train_samples, val_samples = data.train, data.val
        if not val_samples:
            from ml.training import stratified_split

            train_samples, val_samples = stratified_split(train_samples, request.config.val_fraction, request.config.seed)
        pretrained_path = await self._pretrained(request, workdir)
        await self._restore_checkpoint(checkpoint_url, workdir)
        log.info("training_dataset_ready", train=len(train_samples), val=len(val_samples), bad=len(data.bad),
                 seconds=round(time.monotonic() - started, 2))

        from ml.training import TrainSpec

        spec = TrainSpec.from_config(request.config, request.dataset.class_names, pretrained_path=pretrained_path,
                                     device=ctx.settings.device, heartbeat_s=ctx.settings.heartbeat_s,
                                     num_workers=num_workers)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TrainingStatus] = asyncio.Queue()
        callbacks = _Callbacks(loop, queue, ctx, job_id, checkpoint_url, workdir, attempt)
        train_task = asyncio.ensure_future(ctx.executors.on_gpu(self._train, spec, train_samples, val_samples, workdir, callbacks))
        try:
            while not train_task.done() or not queue.empty():
                getter = asyncio.ensure_future(queue.get())
                finished, _ = await asyncio.wait({getter, train_task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in finished:
                    yield getter.result()
                else:
                    getter.cancel()
            result = train_task.result()
        except _Stopped as stopped:
            if stopped.reason == "cancel":
                await self._remove_checkpoints(checkpoint_url, workdir)
                yield status_event(job_id, "cancelled", attempt=attempt,
                                   error=ErrorInfo(code="cancelled", message=f"cancelled at epoch {stopped.epoch}"))
                return
            ctx.preempted.discard(job_id)
            raise Abandoned(f"training stopped for {stopped.reason} at epoch {stopped.epoch}, step {stopped.step}") from None
        finally:
            if not train_task.done():
                # the consumer gave up on us (drain deadline): ask the thread to stop, don't wait here
                ctx.preempt({job_id})
                train_task.add_done_callback(lambda task: task.cancelled() or task.exception())
        metrics = await self._upload_package(result.package_dir, output)
        await self._remove_checkpoints(checkpoint_url, workdir)
        log.info("training_completed", best_epoch=result.best_epoch, val_accuracy=metrics.get("val_accuracy"),
                 epochs_run=result.epochs_run, resumed_from_epoch=result.resumed_from_epoch,
                 seconds=round(time.monotonic() - started, 2))
        yield status_event(job_id, "completed", attempt=attempt, metrics=TrainingMetrics(**metrics), model_url=output)

    # ------------------------------------------------------------------ checks
    def _check_fences(self, request: TrainingRequest) -> None:
        """output_path and a file:// / s3:// pretrained_url inside the store's fences, or blocked_url now."""
        self.ctx.store.check(request.output_path)
        pretrained = request.config.pretrained_url
        if pretrained and pretrained.split(":", 1)[0].lower() in ("file", "s3"):
            self.ctx.store.check(pretrained)

    def _check_sizes(self, request: TrainingRequest) -> int:
        """Refuse a batch whose estimated memory is over the budget; return num_workers capped by the cores."""
        from ml.training.memory import (
            default_image_size,
            default_memory_budget_bytes,
            estimate_batch_bytes,
            usable_cores,
        )

        config, settings = request.config, self.ctx.settings
        cap = settings.max_workers if settings.max_workers is not None else usable_cores()
        num_workers = min(config.num_workers, cap)
        if num_workers < config.num_workers:
            log.info("num_workers_capped", requested=config.num_workers, used=num_workers)
        image_size = config.image_size or default_image_size(config.model_name)
        estimate = estimate_batch_bytes(config.batch_size, image_size, num_workers)
        budget = settings.memory_budget_bytes or default_memory_budget_bytes()
        if estimate > budget:
            mib = 1024 * 1024
            raise PermanentError(
                "invalid_request",
                f"batch_size {config.batch_size} at image_size {image_size} with {num_workers} loader workers needs an "
                f"estimated {estimate / mib:.0f} MiB of memory per batch; this worker's training budget is "
                f"{budget / mib:.0f} MiB (CLS_TRAINING_MEMORY_BUDGET_MB); lower batch_size or image_size",
            )
        return num_workers

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _train(spec: Any, train_samples: list, val_samples: list, workdir: Path, callbacks: _Callbacks) -> Any:
        """On the training thread: ml errors become typed handler errors."""
        from ml.training import TrainingStopped, train

        try:
            return train(spec, train_samples, val_samples, workdir, callbacks)
        except TrainingStopped as stopped:
            callbacks._upload_checkpoint()
            raise _Stopped(stopped.reason, stopped.epoch, stopped.step) from None
        except ValueError as exc:
            code = getattr(exc, "code", None) or _ML_ERROR_CODES.get(type(exc).__name__, "invalid_request")
            raise PermanentError(code, str(exc)[:2000]) from exc

    async def _already_completed(self, output: str) -> dict[str, Any] | None:
        """The metrics of a package already complete at ``output`` (metrics.json is uploaded last)."""
        try:
            if not await self.ctx.store.exists(f"{output}/metrics.json"):
                return None
            if not await self.ctx.store.exists(f"{output}/model.safetensors"):
                return None
            return _absolute_report_url(json.loads(await self.ctx.store.get_bytes(f"{output}/metrics.json")), output)
        except HandlerError as exc:
            if exc.retryable:
                raise
            return None

    async def _next_attempt(self, checkpoint_url: str) -> int:
        url = f"{checkpoint_url}/attempt"
        previous = 0
        try:
            if await self.ctx.store.exists(url):
                previous = int((await self.ctx.store.get_bytes(url)).decode() or 0)
        except (HandlerError, ValueError):
            previous = 0
        await self.ctx.store.put_bytes(url, str(previous + 1).encode(), content_type="text/plain")
        return previous + 1

    async def _restore_checkpoint(self, checkpoint_url: str, workdir: Path) -> None:
        # The remote checkpoint wins: every local checkpoint is uploaded right after it is written, so a
        # local one that differs is older (another worker trained the job further meanwhile).
        local = workdir / "checkpoint" / CHECKPOINT_FILE
        remote = f"{checkpoint_url}/{CHECKPOINT_FILE}"
        if await self.ctx.store.exists(remote):
            await self.ctx.store.download_file(remote, local)
            log.info("checkpoint_restored", url=remote)

    async def _pretrained(self, request: TrainingRequest, workdir: Path) -> str | None:
        url = request.config.pretrained_url
        if not url:
            return None
        # file:// goes through the store too, which refuses it unless CLS_ALLOW_FILE_URLS is set
        target = workdir / "pretrained" / url.rsplit("/", 1)[-1]
        if not target.exists():
            try:
                await self.ctx.store.download_file(url, target)
            except HandlerError as exc:
                if exc.retryable:
                    raise
                raise PermanentError("pretrained_unavailable", f"{url}: {exc.message}") from exc
        return str(target)

    async def _upload_package(self, package_dir: Path, output: str) -> dict[str, Any]:
        optional = [name for name in OPTIONAL_PACKAGE_FILES if (package_dir / name).is_file()]
        for name in [*PACKAGE_FILES[:-1], *optional, PACKAGE_FILES[-1]]:  # verified; metrics.json last marks completion
            await self.ctx.store.upload_file(package_dir / name, f"{output}/{name}")
        return _absolute_report_url(json.loads((package_dir / "metrics.json").read_text()), output)

    async def _remove_checkpoints(self, checkpoint_url: str, workdir: Path) -> None:
        try:
            await self.ctx.store.delete_prefix(checkpoint_url + "/")
        except HandlerError as exc:
            log.warning("checkpoint_cleanup_failed", error=exc.message)
        await asyncio.to_thread(shutil.rmtree, workdir, True)


def _absolute_report_url(metrics: dict[str, Any], output: str) -> dict[str, Any]:
    """metrics.json names the report relative to the package; the completed event gives its full URL."""
    name = metrics.get("report_url")
    if isinstance(name, str) and "://" not in name:
        metrics["report_url"] = f"{output}/{name}"
    return metrics


class _Stopped(Exception):
    def __init__(self, reason: str, epoch: int, step: int) -> None:
        super().__init__(reason)
        self.reason, self.epoch, self.step = reason, epoch, step
