"""The training handler: one job from request to model package, with status events all the way.

Flow: an earlier delivery of the job still training here (its consumer gave up waiting)? -> stop it and
join it first. Model already complete at ``output_path``? -> this job's: re-publish ``completed`` (same
ids, no training); another job's: ``failed`` with ``output_exists``. Cancelled already? -> ``cancelled``.
Else ``queued`` -> dataset prepared (labels checked, images cached by a bounded pool, bad ones counted) -> training on its own thread with a checkpoint after every epoch, uploaded
(but the last's) beside ``output_path`` (``<output_path>.checkpoints/``) -> ``running`` per epoch (and heartbeats) ->
package uploaded and verified -> ``completed``; or ``failed`` / ``cancelled``.

The ``completed`` event keeps the headline metrics; when the full metrics are over a size budget the
large ones (per-class table, confusion matrix, history) are left out and ``metrics.metrics_url`` points
to ``metrics.json`` in the package, which holds them all (``completed_event``).

A redelivered job (the worker died) downloads the last checkpoint and resumes from it. A revoked
partition or a shutdown makes the job checkpoint at the next step and stop with no final status
(``Abandoned``): the record stays uncommitted and its next owner resumes it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fnmatch
import hashlib
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from handlers.admission import Budget, admit
from handlers.cancels import CancelRegistry
from handlers.dataset import DatasetCache, prepare_dataset
from handlers.errors import HandlerError, InvalidRequest, PermanentError
from handlers.executor import Executors
from handlers.fetch import Fetcher
from handlers.images import DecodeLimits
from handlers.lifecycle import Abandoned, Stopped
from handlers.manifests import ManifestLimits
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

METRICS_FILE = "metrics.json"
PACKAGE_FILES = ("model.safetensors", "config.json", METRICS_FILE)  # metrics.json last: it marks completion
OPTIONAL_PACKAGE_FILES = ("model.onnx", "report.html")  # uploaded when the package has them, before metrics.json
CHECKPOINT_FILE = "state.pt"
PACKAGE_JOB_ID = "job_id"
"""Key the handler adds to a package's metrics.json: the job that wrote it (a package is one job's)."""
OUTPUT_EXISTS = "output_exists"


@dataclass
class TrainingSettings:
    """The training handler's settings (``consumers.training_worker.training_settings`` builds them from ``CLS_*``;
    the defaults live in ``consumers.settings`` only)."""

    work_dir: str  # CLS_TRAINING_WORK_DIR
    dataset_cache_dir: str  # CLS_DATASET_CACHE_DIR
    checkpoint_suffix: str  # CLS_CHECKPOINT_PREFIX_SUFFIX
    heartbeat_s: float  # CLS_HEARTBEAT_S
    device: str  # CLS_DEVICE
    download_concurrency: int  # CLS_FETCH_CONCURRENCY
    memory_budget_bytes: int | None  # CLS_TRAINING_MEMORY_BUDGET_MB; None: half the memory available when a job is checked
    max_workers: int | None  # CLS_TRAINING_MAX_WORKERS: cap on num_workers; None: the usable CPU cores
    allowed_models: tuple[str, ...]  # CLS_ALLOWED_TRAINING_MODELS: timm names or fnmatch patterns; (): any
    max_metrics_bytes: int  # encoded metrics kept in a completed event (the worker: CLS_MAX_RECORD_BYTES / 8)
    manifest_limits: ManifestLimits  # CLS_MANIFEST_*: a dataset's manifest_url bounds
    dataset_cache_bytes: int | None  # CLS_DATASET_CACHE_MB: the image cache on disk (None: unbounded)


class _Delivery:
    """One delivery of a job on this worker: its stop request and its training thread's future."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.stop_reason: str | None = None
        self.training: concurrent.futures.Future[Any] | None = None  # done only once the thread has returned

    def stop(self, reason: str = "preempt") -> None:
        self.stop_reason = self.stop_reason or reason

    def training_running(self) -> bool:
        return self.training is not None and not self.training.done()

    async def join(self) -> None:
        """Wait for the training thread to return (it checkpoints at its next step once stopped)."""
        if self.training_running():
            assert self.training is not None
            joined = asyncio.wrap_future(self.training)
            await asyncio.wait({joined})  # unlike awaiting it, never cancels the thread's future
            if not joined.cancelled():
                joined.exception()  # retrieved: the thread's own outcome went to its handler


@dataclass
class TrainingContext:
    settings: TrainingSettings
    store: ObjectStore
    fetcher: Fetcher
    decode_limits: DecodeLimits
    executors: Executors
    cancels: CancelRegistry
    deliveries: dict[str, _Delivery] = field(default_factory=dict)  # job id -> its handler running here
    training: dict[str, _Delivery] = field(default_factory=dict)  # job id -> the delivery whose thread trains it
    on_epoch: Callable[[float], None] | None = None  # metrics hook (epoch seconds)

    def preempt(self, job_ids: set[str]) -> None:
        """Called by the runtime on revocation / shutdown: the job checkpoints and stops.

        Only the deliveries running now are stopped: a request left over from a delivery that finished
        anyway must not stop the next one.
        """
        for job_id in job_ids:
            delivery = self.deliveries.get(job_id)
            if delivery is not None:
                delivery.stop("preempt")


def status_event(job_id: str, status: str, *, epoch: int = 0, step: int | None = None, attempt: int = 1,
                 **fields: Any) -> TrainingStatus:
    return TrainingStatus(
        message_id=TrainingStatus.message_id_for(job_id, status, epoch, step),
        job_id=job_id, status=status, seq=status_seq(status, epoch, step), attempt=attempt,
        **fields,  # type: ignore[arg-type]
    )


def failed_status(job_id: str, error: ErrorInfo) -> TrainingStatus:
    return status_event(job_id, "failed", error=error)


def event_metrics(metrics: dict[str, Any], metrics_url: str, max_bytes: int) -> TrainingMetrics:
    """The metrics a ``completed`` event carries: all of them when they fit ``max_bytes`` (encoded JSON),
    else every scalar (``train_loss``, ``val_accuracy``, ``best_epoch``, ...) and the largest other values
    left out, biggest first, until the rest fits; then ``metrics_url`` names the file that has them all
    and ``omitted`` lists what was left out."""
    kept = {k: v for k, v in metrics.items() if k != PACKAGE_JOB_ID}
    if _json_size(kept) <= max_bytes:
        return TrainingMetrics(**kept)
    large = sorted((k for k, v in kept.items() if isinstance(v, (dict, list))), key=lambda k: -_json_size(kept[k]))
    omitted: list[str] = []
    for key in large:
        omitted.append(key)
        del kept[key]
        if _json_size(kept) <= max_bytes:
            break
    return TrainingMetrics(**kept, metrics_url=metrics_url, omitted=sorted(omitted))


def completed_event(job_id: str, metrics: dict[str, Any], output: str, max_metrics_bytes: int,
                    attempt: int = 1) -> TrainingStatus:
    """``completed`` for the package at ``output`` (first completion and re-publish alike)."""
    return status_event(job_id, "completed", attempt=attempt, model_url=output,
                        metrics=event_metrics(metrics, f"{output}/{METRICS_FILE}", max_metrics_bytes))


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), default=str).encode())


class _Callbacks:
    """Bridge from the training thread to the event loop: events queued, stop requests read."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, ctx: TrainingContext,
                 delivery: _Delivery, checkpoint_url: str, workdir: Path, attempt: int) -> None:
        self.loop, self.queue, self.ctx, self.delivery = loop, queue, ctx, delivery
        self.job_id = delivery.job_id
        self.checkpoint_url, self.workdir, self.attempt = checkpoint_url, workdir, attempt
        self.epochs = 1

    def _emit(self, event: TrainingStatus) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def on_epoch_end(self, epoch: int, epochs: int, metrics: dict[str, Any]) -> None:
        # The epoch's checkpoint is on local disk; copy it beside output_path before reporting the epoch,
        # so a crash after this event resumes at least from here. Not after the last epoch: the package
        # is written next, and a crash before it is complete costs that one epoch, as a crash inside it
        # would (a stop after it still uploads it, in _train). Model and optimizer state are ~3x the
        # model's size: for ViT-B, a gigabyte less to upload per job.
        if epoch < epochs:
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
        return self.delivery.stop_reason

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




class TrainingHandler:
    """``handle(request) -> async iterator of TrainingStatus``."""

    def __init__(self, ctx: TrainingContext) -> None:
        self.ctx = ctx

    async def handle(self, request: TrainingRequest) -> AsyncIterator[TrainingStatus]:
        ctx = self.ctx
        delivery = _Delivery(request.job_id or "")
        ctx.deliveries[delivery.job_id] = delivery  # from now on a preempt of this job stops this delivery
        try:
            await self._join_earlier_training(delivery)
            async with contextlib.aclosing(self._handle(request, delivery)) as events:
                async for event in events:
                    yield event
        finally:
            if ctx.deliveries.get(delivery.job_id) is delivery:
                del ctx.deliveries[delivery.job_id]
            if delivery.training_running():
                # the consumer gave up on us (drain deadline): ask the thread to stop, don't wait here; the
                # next delivery of this job joins it
                delivery.stop("preempt")

    async def _join_earlier_training(self, delivery: _Delivery) -> None:
        """Stop and join the training thread of an earlier delivery of this job, if one still runs here.

        It does when the consumer gave up waiting for it (a drain deadline passed during a long checkpoint
        upload). Joined before anything else, so one job never has two threads training, uploading
        checkpoints or sharing a work dir.
        """
        while ((earlier := self.ctx.training.get(delivery.job_id)) is not None and earlier is not delivery
               and earlier.training_running()):
            log.warning("training_earlier_delivery_running", job_id=delivery.job_id)
            earlier.stop("preempt")
            await earlier.join()
            log.info("training_earlier_delivery_joined", job_id=delivery.job_id)
        if delivery.stop_reason is not None:
            raise Abandoned(f"stopped ({delivery.stop_reason}) while joining an earlier delivery")

    def _start_training(self, delivery: _Delivery, *args: Any) -> asyncio.Future[Any]:
        """Queue the training on the GPU thread; ``ctx.training`` names it until the thread returns."""
        ctx = self.ctx
        loop = asyncio.get_running_loop()
        delivery.training = ctx.executors.submit_gpu(self._train, *args)
        ctx.training[delivery.job_id] = delivery

        def forget() -> None:
            if ctx.training.get(delivery.job_id) is delivery:
                del ctx.training[delivery.job_id]

        def on_thread_done(_: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to forget
                loop.call_soon_threadsafe(forget)

        delivery.training.add_done_callback(on_thread_done)
        task = asyncio.wrap_future(delivery.training)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, never "unretrieved"
        return task

    async def _handle(self, request: TrainingRequest, delivery: _Delivery) -> AsyncIterator[TrainingStatus]:
        ctx = self.ctx
        job_id = delivery.job_id
        output = request.output_path.rstrip("/")
        checkpoint_url = output + ctx.settings.checkpoint_suffix
        self._check_fences(request)
        done = await self._already_completed(output)
        if done is not None:  # a finished model is a fact, whatever came later on the control topic
            owner = done.get(PACKAGE_JOB_ID)
            if owner != job_id:
                written_by = f"job {owner!r}" if isinstance(owner, str) else "an unknown job (no job id recorded)"
                raise PermanentError(OUTPUT_EXISTS, f"output_path {output} already holds a model package written by "
                                                    f"{written_by}; choose another output_path or delete it")
            log.info("training_already_complete", output=output)
            yield completed_event(job_id, done, output, ctx.settings.max_metrics_bytes)
            return
        if ctx.cancels.is_cancelled(job_id):
            yield status_event(job_id, "cancelled", error=ErrorInfo(code="cancelled", message="cancelled before start"))
            return
        from ml.training import check_model_name

        try:
            check_model_name(request.config.model_name)
        except ValueError as exc:
            raise PermanentError("unknown_model", str(exc)) from exc
        self._check_allowed(request.config.model_name)
        num_workers = await self._admit(request)  # before any download or write
        attempt = await self._next_attempt(checkpoint_url)  # also proves output_path is writable
        yield status_event(job_id, "queued", attempt=attempt)

        workdir = Path(ctx.settings.work_dir).expanduser() / hashlib.sha256(f"{job_id}|{output}".encode()).hexdigest()[:24]
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()

        def should_stop() -> str | None:
            return "cancel" if ctx.cancels.is_cancelled(job_id) else delivery.stop_reason

        try:
            data = await prepare_dataset(
                request.dataset, fetcher=ctx.fetcher, executors=ctx.executors,
                cache=DatasetCache(ctx.settings.dataset_cache_dir, ctx.settings.dataset_cache_bytes), limits=ctx.decode_limits,
                max_bad_fraction=request.config.max_bad_fraction, concurrency=ctx.settings.download_concurrency,
                should_stop=should_stop, manifest_limits=ctx.settings.manifest_limits,
                multi_label=request.config.multi_label,
            )
        except Stopped as stopped:
            if stopped.reason == "cancel":
                await self._remove_checkpoints(checkpoint_url, workdir)
                yield status_event(job_id, "cancelled", attempt=attempt,
                                   error=ErrorInfo(code="cancelled", message="cancelled while downloading the dataset"))
                return
            raise Abandoned(f"dataset download stopped for {stopped.reason}") from None
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
        callbacks = _Callbacks(loop, queue, ctx, delivery, checkpoint_url, workdir, attempt)
        await self._join_earlier_training(delivery)  # again, right before starting: one may have started meanwhile
        train_task = self._start_training(delivery, spec, train_samples, val_samples, workdir, callbacks)
        try:
            while not train_task.done() or not queue.empty():
                getter = asyncio.ensure_future(queue.get())
                finished, _ = await asyncio.wait({getter, train_task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in finished:
                    yield getter.result()
                else:
                    getter.cancel()
            result = train_task.result()
        except Stopped as stopped:
            if stopped.reason == "cancel":
                await self._remove_checkpoints(checkpoint_url, workdir)
                yield status_event(job_id, "cancelled", attempt=attempt,
                                   error=ErrorInfo(code="cancelled", message=f"cancelled at epoch {stopped.epoch}"))
                return
            raise Abandoned(f"training stopped for {stopped.reason} at epoch {stopped.epoch}, step {stopped.step}") from None
        metrics = await self._upload_package(result.package_dir, output, job_id)
        await self._remove_checkpoints(checkpoint_url, workdir)
        log.info("training_completed", best_epoch=result.best_epoch, val_accuracy=metrics.get("val_accuracy"),
                 epochs_run=result.epochs_run, resumed_from_epoch=result.resumed_from_epoch,
                 seconds=round(time.monotonic() - started, 2))
        yield completed_event(job_id, metrics, output, ctx.settings.max_metrics_bytes, attempt=attempt)

    # ------------------------------------------------------------------ checks
    def _check_fences(self, request: TrainingRequest) -> None:
        """output_path and a file:// / s3:// pretrained_url inside the store's fences, or blocked_url now."""
        self.ctx.store.check(request.output_path)
        pretrained = request.config.pretrained_url
        if pretrained and pretrained.split(":", 1)[0].lower() in ("file", "s3"):
            self.ctx.store.check(pretrained)

    def _check_allowed(self, model_name: str) -> None:
        """CLS_ALLOWED_TRAINING_MODELS, when set: the architecture (the name before any ``.tag``) must match one."""
        patterns = self.ctx.settings.allowed_models
        architecture = model_name.split(".", 1)[0]
        if patterns and not any(fnmatch.fnmatchcase(architecture, p) or fnmatch.fnmatchcase(model_name, p)
                                for p in patterns):
            raise InvalidRequest(f"model_name {model_name!r} is not allowed for training on this worker (allowed: "
                                 f"{', '.join(patterns)[:300]}); an operator can allow it with "
                                 "CLS_ALLOWED_TRAINING_MODELS")

    async def _admit(self, request: TrainingRequest) -> int:
        """Admit the job against the training memory budget: the model (weights, gradients, optimizer state, counted
        from its parameters on the meta device, before anything is built) plus one batch's activations and loader
        buffers. Returns num_workers capped by the cores."""
        from ml.training.memory import (
            count_parameters,
            default_image_size,
            default_memory_budget_bytes,
            estimate_batch_bytes,
            estimate_model_bytes,
            usable_cores,
        )
        from ml.training.models import model_kwargs_for

        config, settings = request.config, self.ctx.settings
        cap = settings.max_workers if settings.max_workers is not None else usable_cores()
        num_workers = min(config.num_workers, cap)
        if num_workers < config.num_workers:
            log.info("num_workers_capped", requested=config.num_workers, used=num_workers)
        image_size = config.image_size or default_image_size(config.model_name)
        batch = estimate_batch_bytes(config.batch_size, image_size, num_workers)
        try:
            kwargs = model_kwargs_for(config.model_name, config.image_size)
            parameters = await self.ctx.executors.on_cpu(count_parameters, config.model_name, config.num_classes, kwargs)
        except Exception as exc:  # noqa: BLE001 - an architecture timm cannot build: the real build would fail too
            raise InvalidRequest(f"model_name {config.model_name!r} cannot be built with {config.num_classes} classes "
                                 f"at image_size {image_size}: {type(exc).__name__}: {str(exc)[:300]}") from exc
        model = estimate_model_bytes(parameters)
        budget = settings.memory_budget_bytes or default_memory_budget_bytes()
        admit(Budget("training_memory", budget, "CLS_TRAINING_MEMORY_BUDGET_MB"), model + batch,
              f"{config.model_name} ({parameters / 1e6:,.1f} M parameters: {model / 2**20:,.0f} MiB for weights, "
              f"gradients and optimizer state) with batch_size {config.batch_size} at image_size {image_size} and "
              f"{num_workers} loader workers ({batch / 2**20:,.0f} MiB per batch)",
              hint="use a smaller model, batch_size or image_size")
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
            raise Stopped(stopped.reason, stopped.epoch, stopped.step) from None
        except ValueError as exc:
            code = getattr(exc, "code", "invalid_request")  # ml.training's errors carry their wire code
            raise PermanentError(code, str(exc)[:2000]) from exc

    async def _already_completed(self, output: str) -> dict[str, Any] | None:
        """The metrics of a package already complete at ``output`` (metrics.json is uploaded last)."""
        try:
            if not await self.ctx.store.exists(f"{output}/{METRICS_FILE}"):
                return None
            if not await self.ctx.store.exists(f"{output}/{PACKAGE_FILES[0]}"):
                return None
            metrics = json.loads(await self.ctx.store.get_bytes(f"{output}/{METRICS_FILE}"))
        except HandlerError as exc:
            if exc.retryable:
                raise
            return None
        except (ValueError, RecursionError):  # not JSON, or nested too deeply to parse
            metrics = None
        if not isinstance(metrics, dict):  # a metrics.json that is not ours: someone else's package
            return {PACKAGE_JOB_ID: None}
        return _absolute_report_url(metrics, output)

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

    async def _upload_package(self, package_dir: Path, output: str, job_id: str) -> dict[str, Any]:
        # metrics.json names the job that wrote the package: a later job with the same output_path is told
        # the output exists instead of being handed another job's model as its own
        metrics_file = package_dir / METRICS_FILE
        metrics = json.loads(metrics_file.read_text())
        metrics[PACKAGE_JOB_ID] = job_id
        metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")
        optional = [name for name in OPTIONAL_PACKAGE_FILES if (package_dir / name).is_file()]
        for name in [*PACKAGE_FILES[:-1], *optional, PACKAGE_FILES[-1]]:  # verified; metrics.json last marks completion
            await self.ctx.store.upload_file(package_dir / name, f"{output}/{name}")
        return _absolute_report_url(metrics, output)

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

