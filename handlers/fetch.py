"""Fetch image bytes from the URLs that arrive in messages: http(s), s3:// and (when allowed) file://.

Every failure about a URL raises ``ImageError`` with a stable code (see ``handlers.errors``). Messages come
from outside, so by default a URL may not reach private networks: the check is made on the resolved
address, inside the resolver the connection uses (no DNS-rebinding gap), on IP literals before any
connection, and again on every redirect hop. The configured object store is a trusted setting.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from handlers.errors import (
    BLOCKED_URL,
    FETCH_FAILED,
    HTTP_STATUS,
    TIMEOUT,
    TOO_LARGE,
    UNSUPPORTED_URL,
    ImageError,
    PermanentError,
)
from handlers.fences import FileFence
from handlers.storage import ObjectStore

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_USER_AGENT = "cls-workers/0.1 (+image fetcher)"
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")  # deprecated site-local: Python counts it as global
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$", re.IGNORECASE)
_CANONICAL_LABEL = re.compile(r"^(?:0|[1-9][0-9]{0,2})$")


@dataclass(frozen=True)
class FetchLimits:
    """Limits and policy for fetching one URL (``consumers.worker.fetch_limits`` builds them from ``CLS_*``; the
    defaults live in ``consumers.settings`` only)."""

    max_bytes: int  # CLS_FETCH_MAX_BYTES
    connect_timeout_s: float  # CLS_FETCH_CONNECT_TIMEOUT_S
    read_timeout_s: float  # CLS_FETCH_READ_TIMEOUT_S
    total_timeout_s: float  # CLS_FETCH_TOTAL_TIMEOUT_S
    max_redirects: int  # CLS_FETCH_MAX_REDIRECTS
    concurrency: int  # CLS_FETCH_CONCURRENCY
    allow_private_networks: bool  # CLS_ALLOW_PRIVATE_NETWORKS
    allow_file_urls: bool  # CLS_ALLOW_FILE_URLS
    file_root: str | None  # CLS_FILE_ROOT: file:// only under this directory when set


def is_noncanonical_numeric_host(host: str) -> bool:
    """Whether ``host`` is an IPv4 address in a form other than dotted-quad decimal.

    ``inet_aton`` (and so the resolver, and some aiohttp versions) read ``2130706433``, ``0x7f.1``,
    ``017700000001``, ``127.1`` and ``0`` as addresses; a URL from a message has no reason to use them.
    """
    labels = host.strip("[]").removesuffix(".").split(".")
    if not 1 <= len(labels) <= 4 or not all(_NUMERIC_LABEL.match(label) for label in labels):
        return False
    canonical = len(labels) == 4 and all(_CANONICAL_LABEL.match(x) and int(x) <= 255 for x in labels)
    return not canonical or host.endswith(".")


def is_blocked_address(address: str) -> bool:
    """Whether an IP address is off limits for URLs from messages (anything not globally routable).

    Covers private, loopback, link-local, site-local (``fec0::/10``), reserved, multicast, unspecified
    and shared (CGNAT) ranges, for IPv4 and IPv6, looking through IPv4-mapped, 6to4 and NAT64 IPv6
    forms. Non-canonical numeric IPv4 forms (``2130706433``, ``0x7f.1``, ``127.1``) and anything
    unparseable are blocked too.
    """
    if is_noncanonical_numeric_host(address):
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            candidates = [ip.ipv4_mapped]
        else:
            if ip.sixtofour is not None:
                candidates.append(ip.sixtofour)
            if ip in _NAT64:
                candidates.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return any(
        not c.is_global
        or c.is_private
        or c.is_loopback
        or c.is_link_local
        or c.is_reserved
        or c.is_multicast
        or c.is_unspecified
        or (isinstance(c, ipaddress.IPv6Address) and c in _SITE_LOCAL)
        for c in candidates
    )


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _is_local_name(host: str) -> bool:
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


class BlockedAddressError(OSError):
    """Raised by the guarded resolver when a host name resolves only to blocked addresses."""

    def __init__(self, host: str, addresses: list[str]) -> None:
        super().__init__(f"{host} resolves only to non-public addresses {addresses}")
        self.host = host
        self.addresses = addresses


class GuardedResolver(AbstractResolver):
    """A resolver that drops non-public addresses, so the connection goes only to a checked address."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner or ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if _is_local_name(host) or is_noncanonical_numeric_host(host):
            raise BlockedAddressError(host, [])
        results = await self._inner.resolve(host, port, family)
        allowed = [result for result in results if not is_blocked_address(result["host"])]
        if not allowed:
            raise BlockedAddressError(host, [result["host"] for result in results])
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def _blocked_cause(exc: BaseException) -> BlockedAddressError | None:
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, BlockedAddressError):
            return current
        stack.extend([current.__cause__, current.__context__, getattr(current, "os_error", None)])
    return None


def _read_local_file(path: Path, max_bytes: int) -> bytes:
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:
            raise ImageError(TOO_LARGE, f"{path}: {size} bytes > limit {max_bytes}")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageError(TOO_LARGE, f"{path}: more than {max_bytes} bytes")
    return data


class Fetcher:
    """Fetches URL bytes under ``FetchLimits``; one per worker, used as an async context manager.

    Owns one aiohttp session (with the guarded resolver unless private networks are allowed) and a
    semaphore bounding concurrent fetches. ``s3://`` URLs go through ``store`` when one is given.
    """

    def __init__(self, limits: FetchLimits, store: ObjectStore | None = None) -> None:
        self.limits = limits
        self.store = store
        self._session: aiohttp.ClientSession | None = None
        self._semaphore = asyncio.Semaphore(max(1, limits.concurrency))

    async def __aenter__(self) -> Fetcher:
        limits = self.limits
        resolver: AbstractResolver = (
            ThreadedResolver() if limits.allow_private_networks else GuardedResolver()
        )
        connector = aiohttp.TCPConnector(resolver=resolver, limit=max(1, limits.concurrency))
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=limits.total_timeout_s,
                sock_connect=limits.connect_timeout_s,
                sock_read=limits.read_timeout_s,
            ),
            headers={"User-Agent": _USER_AGENT, "Accept": "image/*,*/*;q=0.5"},
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session (idempotent)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def fetch(self, url: str) -> bytes:
        """Return the bytes at ``url`` (at most ``max_bytes``).

        Raises ``ImageError`` with a stable code for anything about this URL; a ``RetryableError``
        from the object store (storage unavailable) propagates so the request is retried.
        """
        try:
            scheme = urlsplit(url).scheme.lower()
        except ValueError as exc:
            raise ImageError(UNSUPPORTED_URL, f"invalid URL {url!r}: {exc}") from exc
        if scheme in ("http", "https"):
            fetch_one = self._fetch_http
        elif scheme == "s3":
            fetch_one = self._fetch_s3
        elif scheme == "file":
            fetch_one = self._fetch_file
        else:
            raise ImageError(UNSUPPORTED_URL, f"unsupported URL scheme {scheme!r}: {url!r}")
        async with self._semaphore:
            return await fetch_one(url)

    async def check(self, url: str) -> None:
        """Raise ``ImageError`` (``blocked_url`` / ``unsupported_url``) when fetching ``url`` now would be refused
        by a fence (scheme, file root, bucket list, private networks: a host name is resolved), without
        fetching it: for bytes kept from an earlier fetch (a cache), served only if the URL is still allowed."""
        try:
            scheme = urlsplit(url).scheme.lower()
        except ValueError as exc:
            raise ImageError(UNSUPPORTED_URL, f"invalid URL {url!r}: {exc}") from exc
        try:
            if scheme in ("http", "https"):
                current = URL(url)
                self._check_hop(current, url)
                host = (current.raw_host or "").strip("[]")
                if not self.limits.allow_private_networks and not _is_ip_literal(host):
                    try:
                        await GuardedResolver().resolve(host, current.port or 0)
                    except BlockedAddressError as exc:
                        raise ImageError(BLOCKED_URL, f"{url}: {exc}") from exc
                    except OSError:
                        pass  # unresolvable now: nothing it could reach, the fetch itself would fail the same way
            elif scheme == "s3":
                if self.store is None:
                    raise ImageError(UNSUPPORTED_URL, f"no object store configured for {url!r}")
                self.store.check(url)
            elif scheme == "file":
                (self.store.files if self.store is not None
                 else FileFence(self.limits.allow_file_urls, self.limits.file_root)).path(url)
            else:
                raise ImageError(UNSUPPORTED_URL, f"unsupported URL scheme {scheme!r}: {url!r}")
        except ImageError:
            raise
        except PermanentError as exc:
            raise ImageError(exc.code, exc.message) from exc
        except (ValueError, aiohttp.InvalidURL) as exc:
            raise ImageError(UNSUPPORTED_URL, f"invalid URL {url!r}: {exc}") from exc

    async def fetch_into(self, url: str, sink: Callable[[bytes], Awaitable[None]], max_bytes: int) -> None:
        """Stream the bytes at ``url`` into ``sink``, chunk by chunk, under the same fences and timeouts as
        :meth:`fetch` but with its own size limit (``max_bytes``; over it: ``ImageError(too_large)``). For
        large documents (manifests) that must never be whole in memory."""
        try:
            scheme = urlsplit(url).scheme.lower()
        except ValueError as exc:
            raise ImageError(UNSUPPORTED_URL, f"invalid URL {url!r}: {exc}") from exc
        async with self._semaphore:
            if scheme in ("http", "https"):
                await self._fetch_http(url, lambda response: self._stream_body(response, url, sink, max_bytes))
            elif scheme == "s3":
                if self.store is None:
                    raise ImageError(UNSUPPORTED_URL, f"no object store configured for {url!r}")
                await self.store.read_into(url, sink, max_bytes)
            elif scheme == "file":
                fence = self.store.files if self.store is not None else FileFence(self.limits.allow_file_urls,
                                                                                  self.limits.file_root)
                try:
                    fence.path(url)
                except PermanentError as exc:
                    raise ImageError(exc.code, exc.message) from exc
                store = self.store or ObjectStore(allow_file_urls=True, file_root=self.limits.file_root)
                await store.read_into(url, sink, max_bytes)
            else:
                raise ImageError(UNSUPPORTED_URL, f"unsupported URL scheme {scheme!r}: {url!r}")

    # -- http(s) --------------------------------------------------------------------------------

    def _check_hop(self, url: URL, original: str) -> None:
        if url.scheme not in ("http", "https"):
            raise ImageError(BLOCKED_URL, f"redirect of {original!r} to a {url.scheme!r} URL refused")
        host = url.raw_host
        if not host:
            raise ImageError(UNSUPPORTED_URL, f"URL without a host: {str(url)!r}")
        if is_noncanonical_numeric_host(host):  # whatever aiohttp makes of it: refused before any lookup
            raise ImageError(BLOCKED_URL, f"non-canonical numeric host {host!r} refused")
        if self.limits.allow_private_networks:
            return
        if _is_local_name(host):
            raise ImageError(BLOCKED_URL, f"local host name {host!r} refused")
        literal = host.strip("[]")
        try:
            ipaddress.ip_address(literal.split("%", 1)[0])
        except ValueError:
            return  # a name: checked on its resolved addresses by the resolver
        if is_blocked_address(literal):
            raise ImageError(BLOCKED_URL, f"non-public address {literal!r} refused")

    async def _fetch_http(self, url: str,
                          read: Callable[[aiohttp.ClientResponse], Awaitable[bytes]] | None = None) -> bytes:
        if self._session is None:
            raise RuntimeError("Fetcher is not open: use 'async with Fetcher(...)'")
        limits = self.limits
        try:
            async with asyncio.timeout(limits.total_timeout_s):
                current = URL(url)
                for _hop in range(limits.max_redirects + 1):
                    self._check_hop(current, url)
                    async with self._session.get(current, allow_redirects=False) as response:
                        if response.status in _REDIRECT_STATUSES:
                            location = response.headers.get("Location")
                            if not location:
                                raise ImageError(
                                    HTTP_STATUS, f"HTTP {response.status} without Location for {url}"
                                )
                            current = response.url.join(URL(location))
                            continue
                        if not 200 <= response.status < 300:
                            raise ImageError(
                                HTTP_STATUS, f"HTTP {response.status} {response.reason or ''} for {url}"
                            )
                        return await (read(response) if read is not None else self._read_body(response, url))
                raise ImageError(FETCH_FAILED, f"more than {limits.max_redirects} redirects for {url}")
        except ImageError:
            raise
        except TimeoutError as exc:  # asyncio.timeout and aiohttp's connect/read timeouts
            raise ImageError(TIMEOUT, f"timed out fetching {url}") from exc
        except aiohttp.InvalidURL as exc:
            raise ImageError(UNSUPPORTED_URL, f"invalid URL {url!r}: {exc}") from exc
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            blocked = _blocked_cause(exc)
            if blocked is not None:
                raise ImageError(BLOCKED_URL, f"{url}: {blocked}") from exc
            raise ImageError(FETCH_FAILED, f"{url}: {type(exc).__name__}: {exc}") from exc

    async def _read_body(self, response: aiohttp.ClientResponse, url: str) -> bytes:
        max_bytes = self.limits.max_bytes
        declared = response.content_length
        if declared is not None and declared > max_bytes:
            response.close()
            raise ImageError(TOO_LARGE, f"{url}: Content-Length {declared} > limit {max_bytes}")
        chunks: list[bytes] = []
        total = 0
        async for chunk in response.content.iter_chunked(_CHUNK):
            total += len(chunk)
            if total > max_bytes:
                response.close()
                raise ImageError(TOO_LARGE, f"{url}: body over limit {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _stream_body(self, response: aiohttp.ClientResponse, url: str,
                           sink: Callable[[bytes], Awaitable[None]], max_bytes: int) -> bytes:
        declared = response.content_length
        if declared is not None and declared > max_bytes:
            response.close()
            raise ImageError(TOO_LARGE, f"{url}: Content-Length {declared} > limit {max_bytes}")
        total = 0
        async for chunk in response.content.iter_chunked(_CHUNK):
            total += len(chunk)
            if total > max_bytes:
                response.close()
                raise ImageError(TOO_LARGE, f"{url}: body over limit {max_bytes} bytes")
            await sink(chunk)
        return b""

    # -- s3:// ----------------------------------------------------------------------------------

    async def _fetch_s3(self, url: str) -> bytes:
        if self.store is None:
            raise ImageError(UNSUPPORTED_URL, f"no object store configured for {url!r}")
        try:
            async with asyncio.timeout(self.limits.total_timeout_s):
                return await self.store.get_bytes(url, max_bytes=self.limits.max_bytes)
        except TimeoutError as exc:
            raise ImageError(TIMEOUT, f"timed out fetching {url}") from exc
        except ImageError:
            raise
        except PermanentError as exc:
            if exc.code in (TOO_LARGE, UNSUPPORTED_URL, BLOCKED_URL):
                raise ImageError(exc.code, exc.message) from exc
            raise ImageError(FETCH_FAILED, f"{exc.code}: {exc.message}") from exc

    # -- file:// --------------------------------------------------------------------------------

    async def _fetch_file(self, url: str) -> bytes:
        # the one file:// fence (handlers.fences), the same the object store applies to writes and models
        fence = self.store.files if self.store is not None else FileFence(self.limits.allow_file_urls, self.limits.file_root)
        try:
            path = fence.path(url)
        except PermanentError as exc:
            raise ImageError(exc.code, exc.message) from exc
        try:
            return await asyncio.to_thread(_read_local_file, path, self.limits.max_bytes)
        except OSError as exc:
            raise ImageError(FETCH_FAILED, f"{url}: {exc.strerror or exc}") from exc


__all__ = [
    "BlockedAddressError",
    "FetchLimits",
    "Fetcher",
    "GuardedResolver",
    "is_blocked_address",
    "is_noncanonical_numeric_host",
]
