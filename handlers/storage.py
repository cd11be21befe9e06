"""Object storage for handlers: ``s3://bucket/key`` through aioboto3, ``file://`` local paths when allowed.

The configured S3 endpoint is a trusted setting (no private-network check on it). Errors come out as
handler errors with stable codes:

- ``PermanentError(storage_not_found)``: object or bucket missing on read;
- ``PermanentError(storage_forbidden)``: access denied / no credentials on read;
- ``PermanentError(storage_unwritable)``: bucket missing, invalid or access denied on write;
- ``RetryableError(storage_unavailable)``: connection errors, timeouts, 5xx, throttling, failed verification;
- ``PermanentError(too_large)``: ``get_bytes`` over ``max_bytes``;
- ``PermanentError(blocked_url)`` / ``PermanentError(unsupported_url)``: a URL outside its fence
  (``handlers.fences``: ``file://`` off or outside ``file_root``, a bucket off ``allowed_buckets``) /
  other schemes. Every operation checks its URL against the fences first, before any I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import aioboto3
import aiohttp
from aiobotocore.config import AioConfig
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
)

from handlers.errors import (
    STORAGE_FORBIDDEN,
    STORAGE_NOT_FOUND,
    STORAGE_UNAVAILABLE,
    STORAGE_UNWRITABLE,
    TOO_LARGE,
    UNSUPPORTED_URL,
    HandlerError,
    PermanentError,
    RetryableError,
)
from handlers.fences import BucketFence, FileFence, file_url_path, split_s3_url

__all__ = ["ObjectStore", "file_url_path", "s3_url", "split_s3_url"]

S3_MIN_PART_SIZE = 5 * 1024 * 1024
S3_MAX_PARTS = 10_000
_READ_CHUNK = 256 * 1024
_FILE_CHUNK = 1024 * 1024
_DELETE_BATCH = 1000

_Op = Literal["read", "write"]

_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "PriorRequestNotComplete",
        "503",
        "500",
    }
)
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404", "NoSuchUpload"})
_FORBIDDEN_CODES = frozenset(
    {
        "AccessDenied",
        "403",
        "Forbidden",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
    }
)


def s3_url(bucket: str, key: str) -> str:
    """Build ``s3://bucket/key``."""
    return f"s3://{bucket}/{key}"


def _error_code_of(exc: ClientError) -> tuple[str, int]:
    error = exc.response.get("Error", {}) or {}
    status = (exc.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode", 0) or 0
    return str(error.get("Code", "")), int(status)


def _storage_error(exc: BaseException, op: _Op, url: str) -> HandlerError:
    """Translate a botocore / transport exception into a handler error with a stable code."""
    # aioboto3's transfer helpers sometimes wrap the real error: look down the chain.
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, (ClientError, BotoCoreError)):
        cause = cause.__cause__
    if cause is not None:
        exc = cause

    if isinstance(exc, ClientError):
        code, status = _error_code_of(exc)
        detail = f"{op} {url}: {code or status} {exc}"
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return RetryableError(STORAGE_UNAVAILABLE, detail)
        if op == "write":
            return PermanentError(STORAGE_UNWRITABLE, detail)
        if code in _MISSING_CODES or code == "InvalidBucketName" or status == 404:
            return PermanentError(STORAGE_NOT_FOUND, detail)
        return PermanentError(STORAGE_FORBIDDEN, detail)
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError, NoRegionError)):
        code = STORAGE_UNWRITABLE if op == "write" else STORAGE_FORBIDDEN
        return PermanentError(code, f"{op} {url}: {exc}")
    if isinstance(exc, ParamValidationError):  # e.g. a bucket name botocore refuses client-side
        code = STORAGE_UNWRITABLE if op == "write" else STORAGE_NOT_FOUND
        return PermanentError(code, f"{op} {url}: {exc}")
    # Connection refused/reset, timeouts, truncated bodies: transient.
    return RetryableError(STORAGE_UNAVAILABLE, f"{op} {url}: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def _s3_errors(op: _Op, url: str) -> Iterator[None]:
    try:
        yield
    except HandlerError:
        raise
    except (ClientError, BotoCoreError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise _storage_error(exc, op, url) from exc
    except Exception as exc:  # aioboto3 wraps some ClientErrors in a bare Exception
        if isinstance(exc.__cause__, (ClientError, BotoCoreError)):
            raise _storage_error(exc, op, url) from exc
        raise


@contextlib.contextmanager
def _file_errors(op: _Op, url: str) -> Iterator[None]:
    try:
        yield
    except HandlerError:
        raise
    except (FileNotFoundError, NotADirectoryError) as exc:
        code = STORAGE_UNWRITABLE if op == "write" else STORAGE_NOT_FOUND
        raise PermanentError(code, f"{op} {url}: {exc}") from exc
    except PermissionError as exc:
        code = STORAGE_UNWRITABLE if op == "write" else STORAGE_FORBIDDEN
        raise PermanentError(code, f"{op} {url}: {exc}") from exc
    except OSError as exc:
        raise RetryableError(STORAGE_UNAVAILABLE, f"{op} {url}: {exc}") from exc


def _is_missing(exc: ClientError) -> bool:
    code, status = _error_code_of(exc)
    return code in _MISSING_CODES or status == 404


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")


def _read_file_limited(path: Path, max_bytes: int | None, url: str) -> bytes:
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise PermanentError(TOO_LARGE, f"{url}: {size} bytes > limit {max_bytes}")
        data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise PermanentError(TOO_LARGE, f"{url}: more than {max_bytes} bytes")
    return data


def _write_file_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_file_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _list_files(prefix: Path) -> list[Path]:
    if prefix.is_file():
        return [prefix]
    root = prefix if prefix.is_dir() else prefix.parent
    if not root.is_dir():
        return []
    text = str(prefix)
    found = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if prefix.is_dir() or str(path).startswith(text):
                found.append(path)
    return sorted(found)


def _delete_files(paths: list[Path]) -> int:
    count = 0
    for path in paths:
        try:
            path.unlink()
            count += 1
        except FileNotFoundError:
            pass
    return count


class ObjectStore:
    """Async object store: ``s3://`` through one aioboto3 client, ``file://`` when ``allow_file_urls``
    (under ``file_root`` when set); ``allowed_buckets`` (when given) limits the buckets.

    Use as an async context manager (one per worker). Region and credentials default to the standard
    ``AWS_*`` environment variables (``AWS_ENDPOINT_URL`` is honoured by botocore itself).
    """

    list_page_size = 1000  # keys per ListObjectsV2 page

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        allow_file_urls: bool = False,
        file_root: str | None = None,
        allowed_buckets: Iterable[str] | str | None = None,
        multipart_threshold: int = 8 * 1024 * 1024,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        max_attempts: int = 3,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        max_pool_connections: int = 32,
    ) -> None:
        self.endpoint_url = endpoint_url
        self.region = region
        self.allow_file_urls = allow_file_urls
        self.files = FileFence(allow_file_urls, file_root)
        self.buckets = BucketFence.from_names(allowed_buckets)
        self.multipart_threshold = multipart_threshold
        self._credentials = {
            "aws_access_key_id": aws_access_key_id,
            "aws_secret_access_key": aws_secret_access_key,
            "aws_session_token": aws_session_token,
        }
        self._config = AioConfig(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            max_pool_connections=max_pool_connections,
        )
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    async def __aenter__(self) -> ObjectStore:
        stack = contextlib.AsyncExitStack()
        session = aioboto3.Session(region_name=self.region, **self._credentials)
        try:
            self._client = await stack.enter_async_context(
                session.client("s3", endpoint_url=self.endpoint_url, config=self._config)
            )
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the S3 client (idempotent)."""
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    @property
    def client(self) -> Any:
        """The underlying aiobotocore S3 client (only while the store is open)."""
        if self._client is None:
            raise RuntimeError("ObjectStore is not open: use 'async with ObjectStore(...)'")
        return self._client

    # -- URL dispatch ---------------------------------------------------------------------------

    def _scheme(self, url: str) -> str:
        scheme = urlsplit(url).scheme.lower()
        if scheme == "s3":
            self.buckets.bucket_key(url)
            return "s3"
        if scheme == "file":
            self.files.path(url)
            return "file"
        raise PermanentError(UNSUPPORTED_URL, f"unsupported storage URL: {url!r}")

    def check(self, url: str) -> None:
        """Raise ``PermanentError(blocked_url | unsupported_url)`` unless ``url`` is inside its fence."""
        self._scheme(url)

    def _path(self, url: str) -> Path:
        return self.files.path(url)

    def _bucket_key(self, url: str) -> tuple[str, str]:
        return self.buckets.bucket_key(url)

    # -- operations -----------------------------------------------------------------------------

    async def get_bytes(self, url: str, max_bytes: int | None = None) -> bytes:
        """Read a whole object; ``PermanentError(too_large)`` when it is over ``max_bytes``."""
        if self._scheme(url) == "file":
            with _file_errors("read", url):
                return await asyncio.to_thread(_read_file_limited, self._path(url), max_bytes, url)
        chunks: list[bytes] = []

        async def keep(chunk: bytes) -> None:
            chunks.append(chunk)

        await self.read_into(url, keep, max_bytes)
        return b"".join(chunks)

    async def read_into(self, url: str, sink: Callable[[bytes], Awaitable[None]], max_bytes: int | None = None) -> None:
        """Stream an object into ``sink``, chunk by chunk (never whole in memory); ``PermanentError(too_large)``
        as soon as it is over ``max_bytes``."""
        if self._scheme(url) == "file":
            with _file_errors("read", url):
                path = self._path(url)
                size = await asyncio.to_thread(lambda: path.stat().st_size)
                if max_bytes is not None and size > max_bytes:
                    raise PermanentError(TOO_LARGE, f"{url}: {size} bytes > limit {max_bytes}")
                handle = await asyncio.to_thread(open, path, "rb")
                try:
                    total = 0
                    while chunk := await asyncio.to_thread(handle.read, _FILE_CHUNK):
                        total += len(chunk)
                        if max_bytes is not None and total > max_bytes:
                            raise PermanentError(TOO_LARGE, f"{url}: more than {max_bytes} bytes")
                        await sink(chunk)
                finally:
                    handle.close()
            return
        bucket, key = self._bucket_key(url)
        with _s3_errors("read", url):
            response = await self.client.get_object(Bucket=bucket, Key=key)
            length = response.get("ContentLength")
            body = response["Body"]
            async with body:  # releases the connection even when we stop early
                if max_bytes is not None and length is not None and length > max_bytes:
                    raise PermanentError(TOO_LARGE, f"{url}: {length} bytes > limit {max_bytes}")
                total = 0
                while chunk := await body.read(_READ_CHUNK):
                    total += len(chunk)
                    if max_bytes is not None and total > max_bytes:
                        raise PermanentError(TOO_LARGE, f"{url}: more than {max_bytes} bytes")
                    await sink(chunk)

    async def put_bytes(self, url: str, data: bytes, content_type: str | None = None) -> None:
        """Write a whole object."""
        if self._scheme(url) == "file":
            with _file_errors("write", url):
                await asyncio.to_thread(_write_file_atomic, self._path(url), data)
            return
        bucket, key = self._bucket_key(url)
        extra = {"ContentType": content_type} if content_type else {}
        with _s3_errors("write", url):
            await self.client.put_object(Bucket=bucket, Key=key, Body=data, **extra)

    def _transfer_config(self, size: int) -> TransferConfig:
        chunk = max(self.multipart_threshold, S3_MIN_PART_SIZE, math.ceil(size / S3_MAX_PARTS))
        return TransferConfig(multipart_threshold=self.multipart_threshold, multipart_chunksize=chunk)

    async def upload_file(
        self, local_path: str | os.PathLike[str], url: str, content_type: str | None = None
    ) -> None:
        """Upload a local file (multipart above ``multipart_threshold``), then verify its size.

        Returns only once the stored object has the local file's size; raises
        ``RetryableError(storage_unavailable)`` when the verification fails.
        """
        local = Path(local_path)
        size = local.stat().st_size
        if self._scheme(url) == "file":
            target = self._path(url)
            with _file_errors("write", url):
                await asyncio.to_thread(_copy_file_atomic, local, target)
                stored = target.stat().st_size
        else:
            bucket, key = self._bucket_key(url)
            extra = {"ContentType": content_type} if content_type else None
            with _s3_errors("write", url):
                await self.client.upload_file(
                    str(local), bucket, key, ExtraArgs=extra, Config=self._transfer_config(size)
                )
                head = await self.client.head_object(Bucket=bucket, Key=key)
                stored = int(head["ContentLength"])
        if stored != size:
            raise RetryableError(
                STORAGE_UNAVAILABLE, f"upload of {local} to {url} not verified: {stored} != {size} bytes"
            )

    async def download_file(self, url: str, local_path: str | os.PathLike[str]) -> None:
        """Download an object to a local path (written to a temporary sibling, then renamed)."""
        scheme = self._scheme(url)
        target = Path(local_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if scheme == "file":
            with _file_errors("read", url):
                await asyncio.to_thread(_copy_file_atomic, self._path(url), target)
            return
        bucket, key = self._bucket_key(url)
        tmp = _temp_sibling(target)
        try:
            with _s3_errors("read", url):
                await self.client.download_file(bucket, key, str(tmp))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    async def exists(self, url: str) -> bool:
        """Whether an object exists (a missing bucket counts as missing)."""
        if self._scheme(url) == "file":
            return await asyncio.to_thread(self._path(url).is_file)
        bucket, key = self._bucket_key(url)
        with _s3_errors("read", url):
            try:
                await self.client.head_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if _is_missing(exc):
                    return False
                raise
        return True

    async def list(self, prefix_url: str) -> list[str]:
        """Full URLs of every object under a prefix, in key order (all pages)."""
        if self._scheme(prefix_url) == "file":
            with _file_errors("read", prefix_url):
                paths = await asyncio.to_thread(_list_files, self._path(prefix_url))
            return [path.as_uri() for path in paths]
        bucket, prefix = self._bucket_key(prefix_url)
        urls: list[str] = []
        with _s3_errors("read", prefix_url):
            paginator = self.client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(
                Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": self.list_page_size}
            ):
                urls.extend(s3_url(bucket, item["Key"]) for item in page.get("Contents", []))
        return urls

    async def delete_prefix(self, prefix_url: str) -> int:
        """Delete every object under a prefix; returns how many were deleted."""
        if self._scheme(prefix_url) == "file":
            with _file_errors("write", prefix_url):
                paths = await asyncio.to_thread(_list_files, self._path(prefix_url))
                return await asyncio.to_thread(_delete_files, paths)
        bucket, _ = self._bucket_key(prefix_url)
        keys = [self._bucket_key(url)[1] for url in await self.list(prefix_url)]
        deleted = 0
        with _s3_errors("write", prefix_url):
            for start in range(0, len(keys), _DELETE_BATCH):
                batch = keys[start : start + _DELETE_BATCH]
                response = await self.client.delete_objects(
                    Bucket=bucket,
                    Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
                )
                errors = response.get("Errors") or []
                if errors:
                    first = errors[0]
                    detail = (
                        f"delete under {prefix_url}: {len(errors)} failed, e.g. "
                        f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                    )
                    if first.get("Code") in _FORBIDDEN_CODES:
                        raise PermanentError(STORAGE_UNWRITABLE, detail)
                    raise RetryableError(STORAGE_UNAVAILABLE, detail)
                deleted += len(batch)
        return deleted
