"""Calling a handler in-process and the object store around it, for tests that build a handler without a worker:
collect a request's result parts, put and read objects and trained-model packages on the S3 API server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from consumers.settings import KafkaSettings, Settings, WorkerSettings

TINY_MODELS = {"clip_variant": "cls-tiny-clip", "clip_weights": "random", "default_prompt_templates": "a photo of a {}.",
               "timm_weights": "random"}
"""Models a handler test can load without the hub: the tiny open_clip model and timm, random weights, one
template."""


def tiny_settings(**overrides: Any) -> Settings:
    """Worker settings for an in-process handler: the tiny models, image URLs on loopback allowed, short fetch
    timeouts, a 5 ms batch wait; ``overrides`` are ``WorkerSettings`` fields."""
    values = {**TINY_MODELS, "allow_private_networks": True, "fetch_read_timeout_s": 1.0, "fetch_total_timeout_s": 8.0,
              "fetch_connect_timeout_s": 2.0, "batch_wait_ms": 5.0, **overrides}
    return Settings(kafka=KafkaSettings(), worker=WorkerSettings(**values))


async def collect(handler: Any, request: Any) -> list[Any]:
    """Every result part ``handler.handle(request)`` yields, in order."""
    return [part async for part in handler.handle(request)]


async def put_object(s3_server: Any, bucket: str, key: str, body: bytes) -> str:
    async with s3_server.client() as client:
        await client.put_object(Bucket=bucket, Key=key, Body=body)
    return f"s3://{bucket}/{key}"


async def read_object(s3_server: Any, url: str) -> bytes:
    bucket, key = url[len("s3://"):].split("/", 1)
    async with s3_server.client() as client:
        return await (await client.get_object(Bucket=bucket, Key=key))["Body"].read()


async def upload_package(s3_server: Any, bucket: str, package_dir: Path, prefix: str) -> str:
    """A trained-model package's files under ``s3://bucket/prefix``; returns that URL (a ``model_url``)."""
    async with s3_server.client() as client:
        for name in ("model.safetensors", "config.json", "metrics.json"):
            await client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=(package_dir / name).read_bytes())
    return f"s3://{bucket}/{prefix}"
