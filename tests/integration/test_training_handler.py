"""The training handler in-process: stale stop requests and cancels never undo a job's real outcome; one
delivery of a job trains at a time; a package at output_path is re-published only for the job that wrote it."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from PIL import Image

from handlers.errors import PermanentError
from handlers.executor import Executors
from handlers.fetch import Fetcher

from handlers.storage import ObjectStore
from handlers.cancels import CancelRegistry
from handlers.training import TrainingContext, TrainingHandler, completed_event
from schemas.training import TrainingRequest, TrainingStatus
from testkit.configs import training_settings
from testkit.configs import decode_limits

pytestmark = pytest.mark.s3


def png(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (value, 255 - value, 128)).save(out, "PNG")
    return out.getvalue()


def training_context(tmp_path, store, fetcher, executors, on_epoch=None, **settings) -> TrainingContext:
    """The handler's context on the real store and fetcher, with work and image caches under ``tmp_path``."""
    return TrainingContext(settings=training_settings(work_dir=str(tmp_path / "work"), dataset_cache_dir=str(tmp_path / "images"),
                                                     device="cpu", **settings),
                           store=store, fetcher=fetcher, decode_limits=decode_limits(), executors=executors,
                           cancels=CancelRegistry(), on_epoch=on_epoch)


async def test_stale_preempt_and_late_cancel(http_server, s3_server, s3_bucket, tmp_path):
    urls = [http_server.add(f"th/{'dark' if i % 2 else 'light'}/{i}.png", png(20 if i % 2 else 230), content_type="image/png")
            for i in range(12)]
    request = TrainingRequest.model_validate({
        "task": "train", "job_id": "job-h",
        "config": {"model_name": "test_resnet", "num_classes": 2, "epochs": 1, "batch_size": 4, "learning_rate": 1e-3,
                   "augmentation": "none", "pretrained": False, "image_size": 16},
        "dataset": {"train_urls": urls, "class_names": ["dark", "light"]},
        "output_path": f"s3://{s3_bucket}/out/job-h"})
    executors = Executors(cpu_workers=2)
    try:
        async with ObjectStore(endpoint_url=s3_server.endpoint_url) as store, \
                Fetcher(http_server.fetch_limits(), store=store) as fetcher:
            ctx = training_context(tmp_path, store, fetcher, executors)
            handler = TrainingHandler(ctx)
            ctx.preempt({"job-h"})  # left over from an earlier delivery that finished anyway
            events = [e async for e in handler.handle(request)]
            assert [e.status for e in events] == ["queued", "running", "completed"]
            assert "job-h" not in ctx.deliveries and "job-h" not in ctx.training  # forgotten once both ended
            # a cancel that arrives after the model is complete does not turn it into "cancelled"
            ctx.cancels.cancel("job-h")
            again = [e async for e in handler.handle(request)]
            assert [e.status for e in again] == ["completed"]
            assert again[0].message_id == events[-1].message_id
    finally:
        executors.shutdown()


def small_request(http_server, job_id: str, output: str, epochs: int = 1) -> TrainingRequest:
    urls = [http_server.add(f"th/{'dark' if i % 2 else 'light'}/{i}.png", png(20 if i % 2 else 230), content_type="image/png")
            for i in range(12)]
    return TrainingRequest.model_validate({
        "task": "train", "job_id": job_id,
        "config": {"model_name": "test_resnet", "num_classes": 2, "epochs": epochs, "batch_size": 4, "learning_rate": 1e-3,
                   "augmentation": "none", "pretrained": False, "image_size": 16},
        "dataset": {"train_urls": urls, "class_names": ["dark", "light"]},
        "output_path": output})


class GatedStore(ObjectStore):
    """The real store, with the first checkpoint upload held until the test releases it (a slow upload)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.entered, self.release = asyncio.Event(), asyncio.Event()
        self.gated = False

    async def upload_file(self, local_path, url, content_type=None) -> None:
        if url.endswith("/state.pt") and not self.gated:
            self.gated = True
            self.entered.set()
            await self.release.wait()
        await super().upload_file(local_path, url, content_type)


async def consume(events, into: list) -> None:
    async for event in events:
        into.append(event)


async def test_a_new_delivery_stops_and_joins_the_previous_training_thread(http_server, s3_server, s3_bucket, tmp_path):
    epochs = 3
    request = small_request(http_server, "job-twice", f"s3://{s3_bucket}/out/job-twice", epochs=epochs)
    epoch_ends: list[float] = []
    executors = Executors(cpu_workers=2)
    try:
        async with GatedStore(endpoint_url=s3_server.endpoint_url) as store, \
                Fetcher(http_server.fetch_limits(), store=store) as fetcher:
            ctx = training_context(tmp_path, store, fetcher, executors, on_epoch=epoch_ends.append)
            handler = TrainingHandler(ctx)
            first: list[TrainingStatus] = []
            second: list[TrainingStatus] = []
            first_task = asyncio.ensure_future(consume(handler.handle(request), first))
            second_task: asyncio.Future | None = None
            try:
                await asyncio.wait_for(store.entered.wait(), 120)  # epoch 1 done, its checkpoint upload is slow
                # the runtime gives up on the first delivery (drain deadline): its handler is cancelled while
                # the training thread is still inside the upload
                first_task.cancel()
                await asyncio.gather(first_task, return_exceptions=True)
                assert ctx.training["job-twice"].training_running()
                second_task = asyncio.ensure_future(consume(handler.handle(request), second))
                await asyncio.sleep(0.5)
                assert second == [] and not second_task.done()  # waits for the old thread before anything else
                assert ctx.training["job-twice"].training_running()
                store.release.set()
                await asyncio.wait_for(second_task, 180)
            finally:
                store.release.set()  # never leave the training thread blocked (executors.shutdown joins it)
                for task in (first_task, second_task):
                    if task is not None and not task.done():
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
    finally:
        await asyncio.to_thread(executors.shutdown)  # off the loop: a training thread may still need it
    assert [e.status for e in first] == ["queued"]
    statuses = [e.status for e in second]
    assert statuses[0] == "queued" and statuses[-1] == "completed", statuses
    assert second[0].attempt == 2
    # the old thread stopped after epoch 1 (its stop request was not cleared by the new delivery), and the
    # new one resumed from its checkpoint: every epoch trained exactly once
    assert [e.progress.epoch for e in second if e.status == "running"] == list(range(2, epochs + 1))
    assert len(epoch_ends) == epochs
    assert "job-twice" not in ctx.deliveries and "job-twice" not in ctx.training


async def test_a_package_at_output_path_is_republished_only_for_its_own_job(http_server, s3_server, s3_bucket, tmp_path):
    output = f"s3://{s3_bucket}/out/shared"
    classes = [f"class_{i:03d}" for i in range(600)]
    metrics = {
        "train_loss": 0.5, "val_loss": 0.6, "val_accuracy": 0.75, "best_epoch": 3, "epochs_run": 4, "stopped_early": False,
        "per_class": {name: {"precision": 0.8571428571428571, "recall": 0.75, "f1": 0.7999999999999999, "support": 12}
                      for name in classes},
        "confusion_matrix": [[(i * 7 + j * 13) % 17 for j in range(600)] for i in range(600)],
        "epochs": [{"epoch": e, "train_loss": 1.0 / e, "val_accuracy": 0.2 * e} for e in range(1, 5)],
    }
    async with s3_server.client() as client:
        await client.put_object(Bucket=s3_bucket, Key="out/shared/model.safetensors", Body=b"weights")
        await client.put_object(Bucket=s3_bucket, Key="out/shared/metrics.json",
                                Body=json.dumps({**metrics, "job_id": "job-owner"}).encode())
        await client.put_object(Bucket=s3_bucket, Key="out/legacy/model.safetensors", Body=b"weights")
        await client.put_object(Bucket=s3_bucket, Key="out/legacy/metrics.json", Body=json.dumps(metrics).encode())
    executors = Executors(cpu_workers=2)
    max_metrics_bytes = 64 * 1024
    try:
        async with ObjectStore(endpoint_url=s3_server.endpoint_url) as store, \
                Fetcher(http_server.fetch_limits(), store=store) as fetcher:
            ctx = training_context(tmp_path, store, fetcher, executors, max_metrics_bytes=max_metrics_bytes)
            handler = TrainingHandler(ctx)
            own = [e async for e in handler.handle(small_request(http_server, "job-owner", output))]
            for job_id, path, written_by in (("job-other", output, "job 'job-owner'"),
                                             ("job-other", f"s3://{s3_bucket}/out/legacy", "an unknown job")):
                with pytest.raises(PermanentError) as err:
                    [e async for e in handler.handle(small_request(http_server, job_id, path))]
                assert err.value.code == "output_exists" and written_by in err.value.message, err.value.message
    finally:
        executors.shutdown()
    # the owner's redelivery re-publishes the same small event the first completion would have built
    assert [e.status for e in own] == ["completed"]
    expected = completed_event("job-owner", {**metrics, "job_id": "job-owner"}, output, max_metrics_bytes)
    assert own[0].model_dump(exclude={"created_at"}) == expected.model_dump(exclude={"created_at"})
    assert own[0].metrics.metrics_url == f"{output}/metrics.json"
    assert "confusion_matrix" in own[0].metrics.omitted and len(own[0].to_json_bytes()) < max_metrics_bytes + 2048


class RecordingStore(ObjectStore):
    """The real store, recording the checkpoint uploads."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoints: list[str] = []

    async def upload_file(self, local_path, url, content_type=None) -> None:
        if url.endswith("/state.pt"):
            self.checkpoints.append(url)
        await super().upload_file(local_path, url, content_type)


async def test_every_epoch_but_the_last_uploads_its_checkpoint(http_server, s3_server, s3_bucket, tmp_path):
    """The last epoch's checkpoint stays local: the package is uploaded next (for ViT-B, model and optimizer
    state are a gigabyte per upload)."""
    output = f"s3://{s3_bucket}/out/job-last"
    executors = Executors(cpu_workers=2)
    try:
        async with RecordingStore(endpoint_url=s3_server.endpoint_url) as store, \
                Fetcher(http_server.fetch_limits(), store=store) as fetcher:
            ctx = training_context(tmp_path, store, fetcher, executors)
            events = [e async for e in TrainingHandler(ctx).handle(small_request(http_server, "job-last", output, 3))]
    finally:
        executors.shutdown()
    assert [e.status for e in events] == ["queued", "running", "running", "running", "completed"]
    assert store.checkpoints == [f"{output}.checkpoints/state.pt"] * 2  # after epochs 1 and 2, not 3
