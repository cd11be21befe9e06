"""ObjectStore against a real S3 API (moto's server on loopback) and local file:// paths."""

from __future__ import annotations

import os
import socket

import pytest
from botocore.exceptions import ClientError

from handlers.errors import (
    BLOCKED_URL,
    FETCH_FAILED,
    STORAGE_FORBIDDEN,
    STORAGE_NOT_FOUND,
    STORAGE_UNAVAILABLE,
    STORAGE_UNWRITABLE,
    TOO_LARGE,
    UNSUPPORTED_URL,
    ImageError,
    PermanentError,
    RetryableError,
)
from handlers.fetch import Fetcher, FetchLimits
from handlers.images import DecodeLimits, fetch_image
from handlers.storage import ObjectStore, _storage_error, split_s3_url

pytestmark = pytest.mark.s3

MIB = 1024 * 1024


def test_split_s3_url():
    assert split_s3_url("s3://bucket/a/b/c.jpg") == ("bucket", "a/b/c.jpg")
    assert split_s3_url("s3://bucket") == ("bucket", "")
    assert split_s3_url("s3://bucket/") == ("bucket", "")
    for bad in ("s3:///key", "http://bucket/key", "bucket/key"):
        with pytest.raises(PermanentError):
            split_s3_url(bad)


async def test_round_trip_exists_list_delete(s3_store, s3_bucket):
    base = f"s3://{s3_bucket}"
    await s3_store.put_bytes(f"{base}/run/a.bin", b"alpha", content_type="application/octet-stream")
    await s3_store.put_bytes(f"{base}/run/sub/b.bin", b"beta")
    await s3_store.put_bytes(f"{base}/other/c.bin", b"gamma")

    assert await s3_store.get_bytes(f"{base}/run/a.bin") == b"alpha"
    assert await s3_store.exists(f"{base}/run/a.bin")
    assert not await s3_store.exists(f"{base}/run/missing.bin")
    assert await s3_store.list(f"{base}/run/") == [f"{base}/run/a.bin", f"{base}/run/sub/b.bin"]
    assert await s3_store.list(f"{base}/") == [
        f"{base}/other/c.bin",
        f"{base}/run/a.bin",
        f"{base}/run/sub/b.bin",
    ]

    assert await s3_store.delete_prefix(f"{base}/run/") == 2
    assert await s3_store.list(f"{base}/run/") == []
    assert await s3_store.list(f"{base}/") == [f"{base}/other/c.bin"]
    assert await s3_store.delete_prefix(f"{base}/run/") == 0


async def test_list_and_delete_follow_pagination(s3_store, s3_bucket):
    urls = [f"s3://{s3_bucket}/many/{index:03d}.txt" for index in range(7)]
    for url in urls:
        await s3_store.put_bytes(url, url.encode())
    s3_store.list_page_size = 2  # 4 pages
    assert await s3_store.list(f"s3://{s3_bucket}/many/") == urls
    assert await s3_store.delete_prefix(f"s3://{s3_bucket}/many/") == 7
    assert await s3_store.list(f"s3://{s3_bucket}/") == []


async def test_get_bytes_limit(s3_store, s3_bucket):
    url = f"s3://{s3_bucket}/blob.bin"
    await s3_store.put_bytes(url, b"x" * 1000)
    assert len(await s3_store.get_bytes(url, max_bytes=1000)) == 1000
    with pytest.raises(PermanentError) as caught:
        await s3_store.get_bytes(url, max_bytes=999)
    assert caught.value.code == TOO_LARGE


async def test_multipart_upload_verified_and_downloaded(s3_server, s3_bucket, tmp_path):
    local = tmp_path / "checkpoint.bin"
    payload = os.urandom(11 * MIB)  # 3 parts of 5 MiB, 5 MiB, 1 MiB
    local.write_bytes(payload)
    url = f"s3://{s3_bucket}/models/checkpoint.bin"
    async with ObjectStore(endpoint_url=s3_server.endpoint_url, multipart_threshold=5 * MIB) as store:
        await store.upload_file(local, url)
        head = await store.client.head_object(Bucket=s3_bucket, Key="models/checkpoint.bin")
        assert head["ContentLength"] == len(payload)
        assert head["ETag"].strip('"').endswith("-3")  # S3's multipart ETag: md5-of-md5s "-" part count

        target = tmp_path / "down" / "checkpoint.bin"
        await store.download_file(url, target)
        assert target.read_bytes() == payload
        assert [p.name for p in target.parent.iterdir()] == ["checkpoint.bin"]  # no temp file left


async def test_small_upload_is_single_part(s3_store, s3_bucket, tmp_path):
    local = tmp_path / "small.json"
    local.write_bytes(b'{"ok": true}')
    url = f"s3://{s3_bucket}/small.json"
    await s3_store.upload_file(local, url, content_type="application/json")
    head = await s3_store.client.head_object(Bucket=s3_bucket, Key="small.json")
    assert "-" not in head["ETag"] and head["ContentType"] == "application/json"
    assert await s3_store.get_bytes(url) == b'{"ok": true}'


async def test_missing_object_and_bucket_on_read(s3_store, s3_bucket, tmp_path):
    for url in (f"s3://{s3_bucket}/nope.bin", "s3://no-such-bucket-for-tests/nope.bin"):
        with pytest.raises(PermanentError) as caught:
            await s3_store.get_bytes(url)
        assert caught.value.code == STORAGE_NOT_FOUND
        assert not await s3_store.exists(url)
    with pytest.raises(PermanentError) as caught:
        await s3_store.download_file(f"s3://{s3_bucket}/nope.bin", tmp_path / "nope.bin")
    assert caught.value.code == STORAGE_NOT_FOUND
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PermanentError) as caught:
        await s3_store.list("s3://no-such-bucket-for-tests/")
    assert caught.value.code == STORAGE_NOT_FOUND


async def test_missing_or_invalid_bucket_on_write_is_unwritable(s3_store, tmp_path):
    local = tmp_path / "model.bin"
    local.write_bytes(b"weights")
    for bucket in ("no-such-bucket-for-tests", "Invalid_Bucket!"):
        with pytest.raises(PermanentError) as caught:
            await s3_store.put_bytes(f"s3://{bucket}/x.bin", b"x")
        assert (bucket, caught.value.code) == (bucket, STORAGE_UNWRITABLE)
        with pytest.raises(PermanentError) as caught:
            await s3_store.upload_file(local, f"s3://{bucket}/model.bin")
        assert (bucket, caught.value.code) == (bucket, STORAGE_UNWRITABLE)
        assert not isinstance(caught.value, RetryableError)


async def test_unreachable_endpoint_is_retryable():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        async with ObjectStore(endpoint_url=endpoint, max_attempts=1, connect_timeout_s=1) as store:
            with pytest.raises(RetryableError) as caught:
                await store.get_bytes("s3://bucket/key")
            assert caught.value.code == STORAGE_UNAVAILABLE
            with pytest.raises(RetryableError):
                await store.put_bytes("s3://bucket/key", b"x")


@pytest.mark.parametrize(
    ("code", "status", "op", "expected", "retryable"),
    [
        ("SlowDown", 503, "write", STORAGE_UNAVAILABLE, True),
        ("InternalError", 500, "read", STORAGE_UNAVAILABLE, True),
        ("Throttling", 400, "read", STORAGE_UNAVAILABLE, True),
        ("AccessDenied", 403, "write", STORAGE_UNWRITABLE, False),
        ("AccessDenied", 403, "read", STORAGE_FORBIDDEN, False),
        ("NoSuchBucket", 404, "write", STORAGE_UNWRITABLE, False),
        ("NoSuchKey", 404, "read", STORAGE_NOT_FOUND, False),
        ("InvalidBucketName", 400, "write", STORAGE_UNWRITABLE, False),
    ],
)
def test_client_error_mapping(code, status, op, expected, retryable):
    error = ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
    )
    mapped = _storage_error(error, op, "s3://b/k")
    assert (mapped.code, mapped.retryable) == (expected, retryable)
    wrapped = Exception("Couldn't download file")  # aioboto3's transfer helpers wrap the real error
    wrapped.__cause__ = error
    assert _storage_error(wrapped, op, "s3://b/k").code == expected


async def test_environment_configures_the_default_store(s3_server, s3_bucket):
    # s3_server exported AWS_ENDPOINT_URL, credentials and region: no arguments needed.
    async with ObjectStore() as store:
        await store.put_bytes(f"s3://{s3_bucket}/env.txt", b"env")
        assert await store.get_bytes(f"s3://{s3_bucket}/env.txt") == b"env"


async def test_file_urls_refused_unless_allowed(s3_store, tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"x")
    for call in (
        s3_store.get_bytes(path.as_uri()),
        s3_store.put_bytes(path.as_uri(), b"y"),
        s3_store.upload_file(path, (tmp_path / "y.bin").as_uri()),
        s3_store.download_file(path.as_uri(), tmp_path / "z.bin"),
        s3_store.list(tmp_path.as_uri()),
        s3_store.delete_prefix(tmp_path.as_uri()),
    ):
        with pytest.raises(PermanentError) as caught:
            await call
        assert caught.value.code == BLOCKED_URL
    assert path.read_bytes() == b"x" and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]
    with pytest.raises(PermanentError) as caught:
        await s3_store.get_bytes("gs://bucket/key")
    assert caught.value.code == UNSUPPORTED_URL


async def test_file_urls_when_allowed(tmp_path):
    root = tmp_path / "store"
    async with ObjectStore(allow_file_urls=True) as store:
        await store.put_bytes((root / "run" / "a.bin").as_uri(), b"alpha")
        source = tmp_path / "local.bin"
        source.write_bytes(b"beta" * 1000)
        await store.upload_file(source, (root / "run" / "sub" / "b.bin").as_uri())
        assert await store.get_bytes((root / "run" / "a.bin").as_uri()) == b"alpha"
        assert await store.exists((root / "run" / "a.bin").as_uri())
        assert not await store.exists((root / "run" / "nope").as_uri())
        assert await store.list((root / "run").as_uri()) == [
            (root / "run" / "a.bin").as_uri(),
            (root / "run" / "sub" / "b.bin").as_uri(),
        ]
        await store.download_file((root / "run" / "sub" / "b.bin").as_uri(), tmp_path / "copy.bin")
        assert (tmp_path / "copy.bin").read_bytes() == b"beta" * 1000
        with pytest.raises(PermanentError) as caught:
            await store.get_bytes((root / "run" / "sub" / "b.bin").as_uri(), max_bytes=10)
        assert caught.value.code == TOO_LARGE
        with pytest.raises(PermanentError) as caught:
            await store.get_bytes((root / "missing").as_uri())
        assert caught.value.code == STORAGE_NOT_FOUND
        assert await store.delete_prefix((root / "run").as_uri()) == 2
        assert await store.list((root / "run").as_uri()) == []


async def test_fetcher_reads_s3_urls_through_the_store(http_server, s3_store, s3_bucket):
    url = f"s3://{s3_bucket}/images/astronaut.jpg"
    await s3_store.put_bytes(url, http_server.body("astronaut_jpg"), content_type="image/jpeg")
    # Private networks off: the configured endpoint (on loopback) is trusted all the same.
    async with Fetcher(FetchLimits(max_bytes=1 * MIB), store=s3_store) as fetcher:
        image = await fetch_image(fetcher, url, DecodeLimits())
        assert image.size == (512, 512)
        for bad_url, code in (
            (f"s3://{s3_bucket}/images/missing.jpg", FETCH_FAILED),
            ("s3://no-such-bucket-for-tests/a.jpg", FETCH_FAILED),
        ):
            with pytest.raises(ImageError) as caught:
                await fetcher.fetch(bad_url)
            assert caught.value.code == code
    async with Fetcher(FetchLimits(max_bytes=1000), store=s3_store) as fetcher:
        with pytest.raises(ImageError) as caught:
            await fetcher.fetch(url)
        assert caught.value.code == TOO_LARGE
