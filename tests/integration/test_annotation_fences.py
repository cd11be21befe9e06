"""Annotation requests against the fences and limits, through the handler with a real S3 API: file:// images
inside/outside CLS_FILE_ROOT (symlinks resolved), buckets off CLS_S3_ALLOWED_BUCKETS, custom model_url outside the
fences, and custom packages whose config.json would make timm read a file (refused before the cache)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from consumers.annotation_worker import annotation_context
from consumers.settings import KafkaSettings, Settings, WorkerSettings
from handlers.annotation import AnnotationHandler
from handlers.errors import PermanentError
from schemas.annotation import AnnotationRequest
from tests.fixtures.trained_model import digits_dataset, trained_digits  # noqa: F401  (fixtures)

pytestmark = pytest.mark.s3


def png_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 200, 30)).save(out, "PNG")
    return out.getvalue()


def settings(s3_server, tmp_path, **overrides) -> Settings:
    values = {"clip_variant": "cls-tiny-clip", "clip_weights": "random", "default_prompt_templates": "a photo of a {}.",
              "s3_endpoint_url": s3_server.endpoint_url, "model_dir": str(tmp_path / "models"),
              "preload_models": "", **overrides}
    return Settings(kafka=KafkaSettings(), worker=WorkerSettings(**values))


def clip_request(images: list[tuple[str, str]], **extra) -> AnnotationRequest:
    return AnnotationRequest.model_validate({
        "task": "classify", "model": "clip", "request_id": "fence", "classes": ["cat", "dog"], "top_k": 1,
        "images": [{"id": i, "url": u} for i, u in images], **extra})


async def test_file_and_bucket_fences_for_images(s3_server, s3_bucket, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "in").mkdir(parents=True)
    outside.mkdir()
    (root / "in" / "ok.png").write_bytes(png_bytes())
    (outside / "secret.png").write_bytes(png_bytes())
    (root / "in" / "link.png").symlink_to(outside / "secret.png")
    async with s3_server.client() as client:
        await client.put_object(Bucket=s3_bucket, Key="a.png", Body=png_bytes())
        await client.create_bucket(Bucket=f"{s3_bucket}-other")
        await client.put_object(Bucket=f"{s3_bucket}-other", Key="a.png", Body=png_bytes())
    fenced = settings(s3_server, tmp_path, allow_file_urls=True, file_root=str(root), s3_allowed_buckets=s3_bucket)
    async with annotation_context(fenced) as ctx:
        parts = [p async for p in AnnotationHandler(ctx).handle(clip_request([
            ("inside", (root / "in" / "ok.png").as_uri()),
            ("outside", (outside / "secret.png").as_uri()),
            ("symlink", (root / "in" / "link.png").as_uri()),
            ("dotdot", f"file://{root}/in/../../outside/secret.png"),
            ("bucket-ok", f"s3://{s3_bucket}/a.png"),
            ("bucket-other", f"s3://{s3_bucket}-other/a.png"),
        ]))]
    results = {r.id: r for r in parts[0].results}
    assert results["inside"].error is None and len(results["inside"].predictions) == 1
    assert results["bucket-ok"].error is None
    for name in ("outside", "symlink", "dotdot", "bucket-other"):
        assert (name, results[name].error and results[name].error.code) == (name, "blocked_url")
    assert "CLS_S3_ALLOWED_BUCKETS" in results["bucket-other"].error.message
    async with s3_server.client() as client:
        await client.delete_object(Bucket=f"{s3_bucket}-other", Key="a.png")
        await client.delete_bucket(Bucket=f"{s3_bucket}-other")


async def _upload(s3_server, bucket: str, prefix: str, files: dict[str, bytes]) -> str:
    async with s3_server.client() as client:
        for name, body in files.items():
            await client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=body)
    return f"s3://{bucket}/{prefix}"


def custom_request(model_url: str, image_url: str) -> AnnotationRequest:
    return AnnotationRequest.model_validate({"task": "classify", "model": "custom", "model_url": model_url,
                                             "request_id": "pkg", "images": [{"id": "x", "url": image_url}]})


async def test_custom_model_url_outside_the_fences_is_blocked(trained_digits, s3_server, s3_bucket, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "x.png").write_bytes(png_bytes())
    fenced = settings(s3_server, tmp_path, allow_file_urls=True, file_root=str(root), s3_allowed_buckets=s3_bucket)
    package = Path(trained_digits.package_dir)
    async with annotation_context(fenced) as ctx:
        for model_url in (package.as_uri(), "s3://some-other-bucket/models/digits"):
            with pytest.raises(PermanentError) as err:
                [p async for p in AnnotationHandler(ctx).handle(custom_request(model_url, (root / "x.png").as_uri()))]
            assert (model_url, err.value.code) == (model_url, "blocked_url")
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


@pytest.mark.parametrize("kwargs", [
    {"checkpoint_path": "/etc/passwd"},
    {"pretrained_cfg_overlay": {"file": "/tmp/evil.pth"}},
    {"img_size": "/tmp/evil.pth"},
])
async def test_package_config_with_paths_is_refused_before_the_cache(trained_digits, s3_server, s3_bucket, tmp_path,
                                                                     http_server, kwargs):
    package = Path(trained_digits.package_dir)
    config = json.loads((package / "config.json").read_text())
    config["model_kwargs"] = kwargs
    model_url = await _upload(s3_server, s3_bucket, "evil", {
        "config.json": json.dumps(config).encode(), "model.safetensors": (package / "model.safetensors").read_bytes()})
    image = http_server.add("fence/x.png", png_bytes(), content_type="image/png")
    async with annotation_context(settings(s3_server, tmp_path, allow_private_networks=True)) as ctx:
        with pytest.raises(PermanentError) as err:
            [p async for p in AnnotationHandler(ctx).handle(custom_request(model_url, image))]
    assert err.value.code == "model_unavailable" and "model_kwargs" in err.value.message
    assert "/etc/passwd" not in err.value.message and "evil.pth" not in err.value.message
    leftovers = list((tmp_path / "models").iterdir())
    assert leftovers == []  # neither the cache entry nor the temporary folder stays


async def test_valid_package_is_moved_into_the_cache_once(trained_digits, s3_server, s3_bucket, tmp_path, http_server):
    package = Path(trained_digits.package_dir)
    model_url = await _upload(s3_server, s3_bucket, "good", {
        name: (package / name).read_bytes() for name in ("config.json", "model.safetensors")})
    image = http_server.add("fence/y.png", png_bytes(), content_type="image/png")
    async with annotation_context(settings(s3_server, tmp_path, allow_private_networks=True)) as ctx:
        parts = [p async for p in AnnotationHandler(ctx).handle(custom_request(model_url, image))]
    assert parts[0].results[0].error is None
    entries = list((tmp_path / "models").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")
    assert sorted(p.name for p in entries[0].iterdir()) == [".complete", "config.json", "model.safetensors"]
