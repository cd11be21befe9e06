"""ObjectStore (and Fetcher's s3:// path) against a real S3 API: moto's server on loopback."""

from __future__ import annotations

import os

import pytest

from handlers.errors import (
    FETCH_FAILED,
    STORAGE_NOT_FOUND,
    STORAGE_UNWRITABLE,
    TOO_LARGE,
    ImageError,
    PermanentError,
    RetryableError,
)
from handlers.fetch import Fetcher
from handlers.images import fetch_image
from handlers.storage import ObjectStore
from testkit.configs import decode_limits, fetch_limits

pytestmark = pytest.mark.s3

MIB = 1024 * 1024


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


async def test_environment_configures_the_default_store(s3_server, s3_bucket):
    # s3_server exported AWS_ENDPOINT_URL, credentials and region: no arguments needed.
    async with ObjectStore() as store:
        await store.put_bytes(f"s3://{s3_bucket}/env.txt", b"env")
        assert await store.get_bytes(f"s3://{s3_bucket}/env.txt") == b"env"


async def test_fetcher_reads_s3_urls_through_the_store(http_server, s3_store, s3_bucket):
    url = f"s3://{s3_bucket}/images/astronaut.jpg"
    await s3_store.put_bytes(url, http_server.body("astronaut_jpg"), content_type="image/jpeg")
    # Private networks off: the configured endpoint (on loopback) is trusted all the same.
    async with Fetcher(fetch_limits(max_bytes=1 * MIB), store=s3_store) as fetcher:
        image = await fetch_image(fetcher, url, decode_limits())
        assert image.size == (512, 512)
        for bad_url, code in (
            (f"s3://{s3_bucket}/images/missing.jpg", FETCH_FAILED),
            ("s3://no-such-bucket-for-tests/a.jpg", FETCH_FAILED),
        ):
            with pytest.raises(ImageError) as caught:
                await fetcher.fetch(bad_url)
            assert caught.value.code == code
    async with Fetcher(fetch_limits(max_bytes=1000), store=s3_store) as fetcher:
        with pytest.raises(ImageError) as caught:
            await fetcher.fetch(url)
        assert caught.value.code == TOO_LARGE
