"""Training requests against the fences and limits, through the training handler with a real S3 API:
forbidden file:// paths and buckets, batch memory over the budget, num_workers capped, out of memory in training
reported as a smaller micro-batch (and out_of_memory below one image)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

import ml.training.loop as loop_module
from handlers.errors import PermanentError
from handlers.executor import Executors
from handlers.fetch import Fetcher

from handlers.storage import ObjectStore
from handlers.cancels import CancelRegistry
from handlers.training import TrainingContext, TrainingHandler
from schemas.training import TrainingRequest
from testkit.configs import training_settings
from testkit.configs import decode_limits

pytestmark = pytest.mark.s3


def png(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (value, 255 - value, 128)).save(out, "PNG")
    return out.getvalue()


def request(urls: list[str], output: str, **config) -> TrainingRequest:
    values = {"model_name": "test_resnet", "num_classes": 2, "epochs": 1, "batch_size": 4, "learning_rate": 1e-3,
              "augmentation": "none", "pretrained": False, "image_size": 16, **config}
    return TrainingRequest.model_validate({"task": "train", "job_id": "job-limits", "config": values,
                                           "dataset": {"train_urls": urls, "class_names": ["dark", "light"]},
                                           "output_path": output})


@pytest.fixture
def images(http_server) -> list[str]:
    return [http_server.add(f"lim/{'dark' if i % 2 else 'light'}/{i}.png", png(20 if i % 2 else 230),
                            content_type="image/png") for i in range(12)]


@pytest.fixture
async def make_handler(http_server, s3_server, tmp_path):
    executors = Executors(cpu_workers=2)
    opened = []

    async def make(**options) -> TrainingHandler:
        store_options = {k: options.pop(k) for k in ("allow_file_urls", "file_root", "allowed_buckets") if k in options}
        store = ObjectStore(endpoint_url=s3_server.endpoint_url, **store_options)
        await store.__aenter__()
        fetcher = Fetcher(http_server.fetch_limits(), store=store)
        await fetcher.__aenter__()
        opened.extend([fetcher, store])
        settings = training_settings(work_dir=str(tmp_path / "work"), dataset_cache_dir=str(tmp_path / "images"),
                                    device="cpu", **options)
        return TrainingHandler(TrainingContext(settings=settings, store=store, fetcher=fetcher,
                                               decode_limits=decode_limits(), executors=executors,
                                               cancels=CancelRegistry()))

    yield make
    for item in opened:
        await item.close()
    executors.shutdown()


async def outcome(handler: TrainingHandler, req: TrainingRequest) -> tuple[list, PermanentError | None]:
    events = []
    try:
        async for event in handler.handle(req):
            events.append(event)
    except PermanentError as exc:
        return events, exc
    return events, None


async def test_output_and_pretrained_outside_the_fences_are_refused_before_any_write(
        make_handler, images, s3_bucket, s3_server, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    handler = await make_handler(allow_file_urls=True, file_root=str(root), allowed_buckets=[s3_bucket])
    cases = {
        "file outside root": f"file://{outside}/model",
        "symlink out of root": f"file://{root}/escape/model",
        "dot-dot": f"file://{root}/../outside/model",
        "bucket off the list": "s3://other-bucket/model",
    }
    for name, output in cases.items():
        events, error = await outcome(handler, request(images, output))
        assert (name, events, error and error.code) == (name, [], "blocked_url")
    assert list(outside.iterdir()) == []  # nothing written through the link or the dot-dot
    for pretrained in (f"file://{outside}/w.safetensors", "s3://other-bucket/w.safetensors"):
        events, error = await outcome(handler, request(images, f"s3://{s3_bucket}/ok", pretrained=True,
                                                       pretrained_url=pretrained))
        assert (events, error and error.code) == ([], "blocked_url")
    async with s3_server.client() as client:  # not even the attempt counter was written
        assert (await client.list_objects_v2(Bucket=s3_bucket)).get("KeyCount", 0) == 0


async def test_file_urls_off_refuse_every_file_use(make_handler, images, s3_bucket, tmp_path):
    handler = await make_handler()
    events, error = await outcome(handler, request(images, f"file://{tmp_path}/model"))
    assert (events, error.code) == ([], "blocked_url") and "CLS_ALLOW_FILE_URLS" in error.message
    # a dataset image by file:// is one bad image among the others (counted against max_bad_fraction)
    secret = tmp_path / "dark" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(png(1))
    events, error = await outcome(handler, request(images + [secret.as_uri()], f"s3://{s3_bucket}/m",
                                                   max_bad_fraction=0.0))
    assert error.code == "too_many_bad_images" and "blocked_url" in error.message


async def test_batch_memory_over_the_budget_is_invalid_request(make_handler, images, s3_bucket, s3_server):
    handler = await make_handler(memory_budget_bytes=256 * 1024 * 1024)
    events, error = await outcome(handler, request(images, f"s3://{s3_bucket}/big", batch_size=4096, image_size=1024))
    assert events == [] and error.code == "invalid_request"
    # the estimate: 4096 x 3 x 1024^2 x 4 bytes x (32 activation + 2 loader batches) = 1,671,168 MiB, plus the model
    assert "MiB per batch" in error.message and "1,671,168 MiB per batch" in error.message
    assert "> budget 256 MiB (CLS_TRAINING_MEMORY_BUDGET_MB)" in error.message
    # the model's own input size counts when image_size is not given (test_resnet: 160 px)
    events, error = await outcome(handler, request(images, f"s3://{s3_bucket}/big", batch_size=128, image_size=None))
    assert error.code == "invalid_request" and "image_size 160" in error.message
    async with s3_server.client() as client:
        assert (await client.list_objects_v2(Bucket=s3_bucket)).get("KeyCount", 0) == 0


async def test_a_giant_architecture_is_refused_from_its_parameter_count_before_it_is_built(
        make_handler, images, s3_bucket, s3_server):
    """1.8 B parameters with batch_size 1: the batch is tiny, the model's weights, gradients and AdamW state are
    not; counted on the meta device (nothing allocated), refused before any download or write."""
    from handlers.admission import REFUSED

    refused_before = REFUSED.labels("training_memory")._value.get()
    handler = await make_handler(memory_budget_bytes=8 * 1024**3)
    events, error = await outcome(handler, request(images, f"s3://{s3_bucket}/giant", batch_size=1, image_size=None,
                                                   model_name="vit_gigantic_patch14_clip_224"))
    assert events == [] and error.code == "invalid_request", error
    assert "1,842.8 M parameters" in error.message and "> budget 8,192 MiB (CLS_TRAINING_MEMORY_BUDGET_MB)" in error.message
    assert REFUSED.labels("training_memory")._value.get() == refused_before + 1
    async with s3_server.client() as client:
        assert (await client.list_objects_v2(Bucket=s3_bucket)).get("KeyCount", 0) == 0


async def test_the_training_allow_list_refuses_other_architectures(make_handler, images, s3_bucket):
    handler = await make_handler(allowed_models=("convnext_*", "test_res*"))
    events, error = await outcome(handler, request(images, f"s3://{s3_bucket}/r18", model_name="resnet18"))
    assert events == [] and error.code == "invalid_request" and "CLS_ALLOWED_TRAINING_MODELS" in error.message
    handler._check_allowed("test_resnet")  # matches test_res*
    handler._check_allowed("convnext_tiny.fb_in1k")  # the architecture before the tag matches convnext_*


async def test_num_workers_capped_by_the_cores(make_handler, images, s3_bucket, monkeypatch):
    used = []
    real_train = loop_module._TrainingRun.__init__

    def spy(self, spec, *args, **kwargs):
        used.append(spec.num_workers)
        real_train(self, spec, *args, **kwargs)

    monkeypatch.setattr(loop_module._TrainingRun, "__init__", spy)
    handler = await make_handler(max_workers=1)
    events, error = await outcome(handler, request(images, f"s3://{s3_bucket}/w", num_workers=64))
    assert error is None and events[-1].status == "completed" and used == [1]


def _oom_over(monkeypatch, limit: int) -> None:
    real_build = loop_module.build_model

    def build_with_fault(*args, **kwargs):
        model, model_kwargs = real_build(*args, **kwargs)

        def hook(_module, inputs):
            if inputs[0].shape[0] > limit:
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99999999999 bytes")

        model.register_forward_pre_hook(hook)
        return model, model_kwargs

    monkeypatch.setattr(loop_module, "build_model", build_with_fault)


async def test_oom_in_training_reports_the_micro_batch_in_status_events(make_handler, images, s3_bucket, monkeypatch):
    _oom_over(monkeypatch, limit=2)
    handler = await make_handler()
    events, error = await outcome(handler, request(images, f"s3://{s3_bucket}/oom", epochs=2, batch_size=8))
    assert error is None and [e.status for e in events] == ["queued", "running", "running", "completed"]
    for event in events[1:3]:
        metrics = event.progress.metrics
        assert (metrics["effective_batch"], metrics["micro_batch"], metrics["accumulation_steps"]) == (8, 2, 4)


async def test_oom_below_one_image_fails_with_out_of_memory(make_handler, images, s3_bucket, monkeypatch):
    _oom_over(monkeypatch, limit=0)
    handler = await make_handler()
    events, error = await outcome(handler, request(images, f"s3://{s3_bucket}/oom0"))
    assert [e.status for e in events] == ["queued"] and error.code == "out_of_memory"
    assert "micro-batch of 1" in error.message
