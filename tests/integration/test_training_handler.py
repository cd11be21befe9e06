"""The training handler in-process: stale stop requests and cancels never undo a job's real outcome."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from handlers.executor import Executors
from handlers.fetch import Fetcher
from handlers.images import DecodeLimits
from handlers.storage import ObjectStore
from handlers.training import CancelRegistry, TrainingContext, TrainingHandler, TrainingSettings
from schemas.training import TrainingRequest

pytestmark = pytest.mark.s3


def png(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (value, 255 - value, 128)).save(out, "PNG")
    return out.getvalue()


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
            ctx = TrainingContext(settings=TrainingSettings(work_dir=str(tmp_path / "work"),
                                                            dataset_cache_dir=str(tmp_path / "images"), device="cpu"),
                                  store=store, fetcher=fetcher, decode_limits=DecodeLimits(), executors=executors,
                                  cancels=CancelRegistry())
            handler = TrainingHandler(ctx)
            ctx.preempt({"job-h"})  # left over from an earlier delivery that finished anyway
            events = [e async for e in handler.handle(request)]
            assert [e.status for e in events] == ["queued", "running", "completed"]
            assert "job-h" not in ctx.deliveries  # the delivery is forgotten once its handler and thread ended
            # a cancel that arrives after the model is complete does not turn it into "cancelled"
            ctx.cancels.cancel("job-h")
            again = [e async for e in handler.handle(request)]
            assert [e.status for e in again] == ["completed"]
            assert again[0].message_id == events[-1].message_id
    finally:
        executors.shutdown()
