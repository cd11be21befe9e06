"""ObjectStore without an S3 server: URL parsing, error mapping, file:// rules, unreachable endpoint."""

from __future__ import annotations

import socket

import pytest
from botocore.exceptions import ClientError

from handlers.errors import (
    BLOCKED_URL,
    STORAGE_FORBIDDEN,
    STORAGE_NOT_FOUND,
    STORAGE_UNAVAILABLE,
    STORAGE_UNWRITABLE,
    TOO_LARGE,
    UNSUPPORTED_URL,
    PermanentError,
    RetryableError,
)
from handlers.storage import ObjectStore, _storage_error, split_s3_url


def test_split_s3_url():
    assert split_s3_url("s3://bucket/a/b/c.jpg") == ("bucket", "a/b/c.jpg")
    assert split_s3_url("s3://bucket") == ("bucket", "")
    assert split_s3_url("s3://bucket/") == ("bucket", "")
    for bad in ("s3:///key", "http://bucket/key", "bucket/key"):
        with pytest.raises(PermanentError):
            split_s3_url(bad)


async def test_unreachable_endpoint_is_retryable():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        store = ObjectStore(
            endpoint_url=endpoint,
            region="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            max_attempts=1,
            connect_timeout_s=1,
        )
        async with store:
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


async def test_file_urls_refused_unless_allowed(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"x")
    async with ObjectStore() as store:  # no S3 traffic: every call is refused before any request
        calls = {
            "get_bytes": lambda: store.get_bytes(path.as_uri()),
            "put_bytes": lambda: store.put_bytes(path.as_uri(), b"y"),
            "upload_file": lambda: store.upload_file(path, (tmp_path / "y.bin").as_uri()),
            "download_file": lambda: store.download_file(path.as_uri(), tmp_path / "sub" / "z.bin"),
            "exists": lambda: store.exists(path.as_uri()),
            "list": lambda: store.list(tmp_path.as_uri()),
            "delete_prefix": lambda: store.delete_prefix(tmp_path.as_uri()),
        }
        for name, call in calls.items():
            with pytest.raises(PermanentError) as caught:
                await call()
            assert (name, caught.value.code) == (name, BLOCKED_URL)
        with pytest.raises(PermanentError) as caught:
            await store.get_bytes("gs://bucket/key")
        assert caught.value.code == UNSUPPORTED_URL
    assert path.read_bytes() == b"x" and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


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


async def test_file_root_fences_every_operation_and_resolves_symlinks(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "run").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.bin").write_bytes(b"secret")
    (root / "run" / "a.bin").write_bytes(b"alpha")
    (root / "out").symlink_to(outside)  # a link inside the root pointing out of it
    (root / "run" / "link.bin").symlink_to(outside / "secret.bin")
    local = tmp_path / "local.bin"
    local.write_bytes(b"beta")
    refused = [(outside / "secret.bin").as_uri(), f"file://{root}/out/secret.bin", (root / "run" / "link.bin").as_uri(),
               f"file://{root}/run/../../outside/secret.bin", f"file://{root}/out/new.bin"]
    async with ObjectStore(allow_file_urls=True, file_root=str(root)) as store:
        assert await store.get_bytes((root / "run" / "a.bin").as_uri()) == b"alpha"
        await store.put_bytes((root / "run" / "b.bin").as_uri(), b"ok")
        for url in refused:
            calls = {
                "get_bytes": lambda: store.get_bytes(url),
                "put_bytes": lambda: store.put_bytes(url, b"overwritten"),
                "upload_file": lambda: store.upload_file(local, url),
                "download_file": lambda: store.download_file(url, tmp_path / "copy.bin"),
                "exists": lambda: store.exists(url),
                "list": lambda: store.list(url),
                "delete_prefix": lambda: store.delete_prefix(url),
            }
            for name, call in calls.items():
                with pytest.raises(PermanentError) as caught:
                    await call()
                assert (url, name, caught.value.code) == (url, name, BLOCKED_URL)
                assert "CLS_FILE_ROOT" in caught.value.message
    assert sorted(p.name for p in outside.iterdir()) == ["secret.bin"]
    assert (outside / "secret.bin").read_bytes() == b"secret" and not (tmp_path / "copy.bin").exists()


async def test_bucket_allow_list_is_checked_before_any_request():
    # no S3 server at this endpoint: a refused bucket must fail as blocked_url, never as unavailable
    async with ObjectStore(endpoint_url="http://127.0.0.1:9", allowed_buckets="models, data",
                           max_attempts=1, connect_timeout_s=0.2) as store:
        for call in (lambda: store.get_bytes("s3://other/k"), lambda: store.put_bytes("s3://other/k", b"x"),
                     lambda: store.exists("s3://other/k"), lambda: store.list("s3://other/"),
                     lambda: store.delete_prefix("s3://other/p/"), lambda: store.download_file("s3://other/k", "/tmp/x"),
                     lambda: store.upload_file(__file__, "s3://models-evil/k")):
            with pytest.raises(PermanentError) as caught:
                await call()
            assert caught.value.code == BLOCKED_URL and "CLS_S3_ALLOWED_BUCKETS" in caught.value.message


async def test_symlink_loops_are_refused_not_crashing(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    async with ObjectStore(allow_file_urls=True, file_root=str(tmp_path)) as store:
        with pytest.raises(PermanentError) as caught:
            await store.get_bytes(f"file://{tmp_path}/a/x.bin")
    assert caught.value.code == BLOCKED_URL
