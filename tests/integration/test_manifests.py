"""Manifests are streamed and parsed off the event loop, bounded in bytes, lines and line length (settings),
without holding the document (or its decoded copies) in memory; JSON nested too deeply in a manifest line or a
package's config.json is the request's error (``invalid_dataset`` / ``invalid_request`` /
``model_unavailable``), never an internal one."""

from __future__ import annotations

import json
import threading
import tracemalloc

import pytest

from handlers.dataset import read_manifest as read_training_manifest
from handlers.errors import PermanentError
from handlers.executor import Executors
from handlers.fetch import Fetcher
from handlers.manifests import ManifestLimits, read_manifest
from handlers.storage import ObjectStore
from pydantic import field_validator

from schemas.annotation import AuditImage
from schemas.training import LabeledUrl
from testkit.configs import fetch_limits, manifest_limits

pytestmark = pytest.mark.s3

DEEP = b"[" * 20_000 + b"]" * 20_000  # 40 KB: within the line limit, far past the parser's depth


async def _put(s3_server, bucket: str, key: str, body: bytes) -> str:
    async with s3_server.client() as client:
        await client.put_object(Bucket=bucket, Key=key, Body=body)
    return f"s3://{bucket}/{key}"


@pytest.fixture
async def io(s3_server):
    executors = Executors(cpu_workers=2)
    try:
        async with ObjectStore(endpoint_url=s3_server.endpoint_url) as store, Fetcher(fetch_limits(), store=store) as fetcher:
            yield fetcher, executors
    finally:
        executors.shutdown()


def _lines(n: int, url_chars: int = 300) -> bytes:
    pad = "p" * url_chars
    return b"".join(json.dumps({"url": f"https://img.example.com/{pad}/{i}.jpg", "label": "ab"[i % 2],
                                "split": "val" if i % 10 == 0 else "train"}).encode() + b"\n" for i in range(n))


async def test_training_manifest_bounded_in_lines_and_line_length(io, s3_server, s3_bucket):
    fetcher, executors = io
    limits = ManifestLimits(max_bytes=10 * 1024 * 1024, max_line_bytes=1024, max_lines=100)
    url = await _put(s3_server, s3_bucket, "m/ok.jsonl", _lines(100))
    train, val = await read_training_manifest(fetcher, url, executors, limits)
    assert (len(train), len(val)) == (90, 10) and train[0][1] == "b" and val[0] == (json.loads(_lines(1))["url"], "a")

    url = await _put(s3_server, s3_bucket, "m/many.jsonl", _lines(101))
    with pytest.raises(PermanentError) as err:
        await read_training_manifest(fetcher, url, executors, limits)
    assert err.value.code == "invalid_dataset" and "CLS_MANIFEST_MAX_LINES" in err.value.message

    long_line = json.dumps({"url": "https://x.example.com/" + "q" * 2000 + ".jpg", "label": "a"}).encode()
    url = await _put(s3_server, s3_bucket, "m/long.jsonl", _lines(3) + long_line + b"\n" + _lines(3))
    with pytest.raises(PermanentError) as err:
        await read_training_manifest(fetcher, url, executors, limits)
    assert err.value.code == "invalid_dataset" and "line 4" in err.value.message
    assert "CLS_MANIFEST_MAX_LINE_BYTES" in err.value.message and "qqqq" not in err.value.message

    url = await _put(s3_server, s3_bucket, "m/no-newline.jsonl", b"x" * 5000)  # one endless line, no newline
    with pytest.raises(PermanentError) as err:
        await read_training_manifest(fetcher, url, executors, limits)
    assert "CLS_MANIFEST_MAX_LINE_BYTES" in err.value.message

    url = await _put(s3_server, s3_bucket, "m/big.jsonl", _lines(40_000))  # ~13 MB > 10 MB
    with pytest.raises(PermanentError) as err:
        await read_training_manifest(fetcher, url, executors, limits)
    assert err.value.code == "invalid_dataset" and "CLS_MANIFEST_MAX_BYTES" in err.value.message


async def test_deeply_nested_lines_are_the_requests_error(io, s3_server, s3_bucket):
    fetcher, executors = io
    nested_value = b'{"url": "https://x.example.com/a.jpg", "label": "a", "split": ' + DEEP + b"}"
    for key, body in (("deep-line", DEEP), ("deep-value", nested_value), ("deep-split", _lines(2) + nested_value)):
        url = await _put(s3_server, s3_bucket, f"m/{key}.jsonl", body + b"\n")
        with pytest.raises(PermanentError) as err:
            await read_training_manifest(fetcher, url, executors, manifest_limits())
        assert err.value.code == "invalid_dataset" and "nested too deeply" in err.value.message, (key, err.value)
        if key == "deep-split":
            continue  # (its first lines are training lines, not audit ones)
        with pytest.raises(PermanentError) as err:  # the audit's manifest: the same rule, its own code
            await read_manifest(fetcher, url, AuditImage, executors=executors, error_code="invalid_request",
                                limits=manifest_limits())
        assert err.value.code == "invalid_request" and "nested too deeply" in err.value.message


def test_deeply_nested_package_config_is_a_package_error():
    from ml.training.errors import PackageError
    from ml.training.package import parse_package_config

    for raw in (DEEP, b'{"format": "x", "model_kwargs": ' + DEEP + b"}"):
        with pytest.raises(PackageError, match="nested too deeply"):
            parse_package_config(raw)


async def test_deeply_nested_package_config_makes_the_model_unavailable(tmp_path, s3_server, s3_bucket):
    from handlers.models import ModelRegistry
    from testkit.configs import model_config

    await _put(s3_server, s3_bucket, "pkg/config.json", b'{"format": ' + DEEP + b"}")
    executors = Executors(cpu_workers=1)
    try:
        async with ObjectStore(endpoint_url=s3_server.endpoint_url) as store:
            registry = ModelRegistry(model_config(model_dir=str(tmp_path / "models")), executors, store)
            with pytest.raises(PermanentError) as err:
                await registry._fetch_package(f"s3://{s3_bucket}/pkg")
    finally:
        executors.shutdown()
    assert err.value.code == "model_unavailable" and "nested too deeply" in err.value.message


async def test_a_large_manifest_streams_off_the_event_loop_in_little_memory(io, s3_server, s3_bucket):
    """~13 MB, 40,000 lines: every line is parsed off the event loop's thread, and the peak of Python memory
    is well under the ~11x of reading, decoding and splitting it whole (the entries kept are ~1.5x)."""
    fetcher, executors = io
    body = _lines(40_000)
    url = await _put(s3_server, s3_bucket, "m/large.jsonl", body)
    tracemalloc.start()
    try:
        train, val = await read_training_manifest(fetcher, url, executors, manifest_limits())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(train) + len(val) == 40_000
    assert peak < 3 * len(body), (peak, len(body))

    threads: set[int] = set()

    class Probe(LabeledUrl):
        @field_validator("url")
        @classmethod
        def _where(cls, value: str) -> str:
            threads.add(threading.get_ident())
            return value

    entries = await read_manifest(fetcher, url, Probe, executors=executors, error_code="invalid_request",
                                limits=manifest_limits())
    assert len(entries) == 40_000 and threads and threading.get_ident() not in threads  # never on the loop
