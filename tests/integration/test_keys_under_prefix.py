"""Object keys built from request data stay under their prefix, and local paths built from object keys stay
under their directory: a request id of ``..`` writes inside ``output_path``; a weights prefix holding a key
with ``../`` is refused with a typed error and nothing is written outside the model directory."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import pytest

from consumers.annotation_worker import annotation_context
from handlers.annotation import AnnotationHandler
from handlers.errors import PermanentError
from handlers.executor import Executors
from handlers.keys import KeyOutsidePrefix, key_segment, local_child
from handlers.models import ModelRegistry
from handlers.storage import ObjectStore
from schemas.annotation import EmbedRequest
from testkit.configs import model_config
from testkit.handler_calls import tiny_settings


@pytest.mark.parametrize("text", ["..", ".", "...", "", "a/../b", "../../etc", "%2e%2e", "..%2F"])
def test_a_key_segment_is_never_a_directory_step(text):
    segment = key_segment(text)
    assert "/" not in segment and segment.strip(".") != ""
    assert unquote(segment).strip(".") != "" and "/" not in unquote(segment)  # also once decoded (file://)


def test_local_child_refuses_keys_that_leave_the_directory(tmp_path):
    root = tmp_path / "models" / "abc"
    assert local_child(root, "sub/model.safetensors", "model_unavailable") == root / "sub" / "model.safetensors"
    for bad in ["../escape.bin", "a/../../escape.bin", "/etc/passwd", "a/./b", "", "a\\..\\b", "x\x00y"]:
        with pytest.raises(KeyOutsidePrefix) as info:
            local_child(root, bad, "model_unavailable")
        assert info.value.code == "model_unavailable"


async def test_request_id_dot_dot_writes_inside_output_path(tmp_path, http_server):
    out = tmp_path / "out" / "vectors"
    out.mkdir(parents=True)
    async with annotation_context(tiny_settings(allow_file_urls=True, file_root=str(tmp_path))) as ctx:
        request = EmbedRequest.model_validate({
            "task": "embed", "model": "clip", "request_id": "..", "output_path": out.as_uri(),
            "images": [{"id": "a", "url": http_server.urls["astronaut_jpg"]}]})
        parts = [part async for part in AnnotationHandler(ctx).handle(request)]
    assert parts[0].status == "completed" and parts[0].embeddings_url is not None
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written and all(p.is_relative_to(out) and p.parent != out for p in written), written
    assert parts[0].embeddings_url.startswith(out.as_uri() + "/%252E%252E/")


async def test_weights_prefix_with_a_dot_dot_key_is_refused(tmp_path, s3_server, s3_bucket):
    async with s3_server.client() as client:
        await client.put_object(Bucket=s3_bucket, Key="weights/good.bin", Body=b"ok")
        await client.put_object(Bucket=s3_bucket, Key="weights/../../escape.bin", Body=b"evil")
    model_dir = tmp_path / "cache" / "models"
    executors = Executors(cpu_workers=1)
    try:
        async with ObjectStore(endpoint_url=s3_server.endpoint_url) as store:
            registry = ModelRegistry(model_config(model_dir=str(model_dir)), executors, store)
            with pytest.raises(PermanentError) as info:
                await registry._local_weights(f"s3://{s3_bucket}/weights/")
    finally:
        executors.shutdown()
    assert isinstance(info.value, KeyOutsidePrefix) and info.value.code == "model_unavailable"
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(model_dir)]
    assert outside == [], outside
    assert not Path(tmp_path / "escape.bin").exists() and not (tmp_path / "cache" / "escape.bin").exists()
