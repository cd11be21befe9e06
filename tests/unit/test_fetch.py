"""Fetcher against the local image server: every error code from a real request, the private-network
rule (resolved addresses, IP literals, redirects), size limits while streaming, timeouts, file:// rules."""

from __future__ import annotations

import socket
import time

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

import handlers.fetch as fetch_module
from handlers.errors import (
    BLOCKED_URL,
    FETCH_FAILED,
    HTTP_STATUS,
    TIMEOUT,
    TOO_LARGE,
    UNSUPPORTED_URL,
    ImageError,
)
from handlers.fetch import (
    BlockedAddressError,
    Fetcher,
    GuardedResolver,
    is_blocked_address,
    is_noncanonical_numeric_host,
)
from handlers.images import fetch_image
from testkit.images import SLOW_SECONDS
from testkit.configs import decode_limits, fetch_limits

FETCH_ERROR_ROUTES = [
    "not_found",
    "server_error",
    "slow_headers",
    "slow_body",
    "oversized_chunked",
    "oversized_declared",
    "oversized_eof",
    "gzip_bomb",
    "too_many_redirects",
    "redirect_to_file",
    "connection_refused",
]


async def _error_code(fetcher: Fetcher, url: str) -> str:
    with pytest.raises(ImageError) as caught:
        await fetcher.fetch(url)
    return caught.value.code


@pytest.fixture
async def fetcher(http_server):
    async with Fetcher(http_server.fetch_limits()) as opened:
        yield opened


@pytest.fixture
async def public_only_fetcher():
    async with Fetcher(fetch_limits(connect_timeout_s=1, total_timeout_s=3)) as opened:
        yield opened


# -- successes ----------------------------------------------------------------------------------


async def test_fetches_exact_bytes(http_server, fetcher):
    for name in ("astronaut_jpg", "chelsea_png", "china_jpg"):
        assert await fetcher.fetch(http_server.urls[name]) == http_server.body(name)


async def test_follows_redirect_chain_up_to_the_limit(http_server, fetcher):
    assert await fetcher.fetch(http_server.urls["redirect_chain"]) == http_server.body("astronaut_jpg")


async def test_gzip_content_encoding_is_decoded(http_server, fetcher):
    assert await fetcher.fetch(http_server.urls["gzip_encoded_png"]) == http_server.body("chelsea_png")


async def test_every_good_route_decodes_to_expected_size(http_server, fetcher):
    for name in http_server.good:
        image = await fetch_image(fetcher, http_server.urls[name], decode_limits())
        assert (name, image.mode, image.size) == (name, "RGB", http_server.expected_sizes[name])


# -- every expected error, from a real request ----------------------------------------------------


@pytest.mark.parametrize("name", FETCH_ERROR_ROUTES)
async def test_fetch_error_routes(http_server, fetcher, name):
    assert await _error_code(fetcher, http_server.urls[name]) == http_server.expected_errors[name]


async def test_every_expected_error_through_fetch_image(http_server, fetcher):
    codes = {}
    for name in http_server.expected_errors:
        with pytest.raises(ImageError) as caught:
            await fetch_image(fetcher, http_server.urls[name], decode_limits())
        codes[name] = caught.value.code
    assert codes == http_server.expected_errors


async def test_http_status_message_names_the_status(http_server, fetcher):
    with pytest.raises(ImageError) as caught:
        await fetcher.fetch(http_server.urls["not_found"])
    assert "404" in caught.value.message and caught.value.retryable is False


@pytest.mark.parametrize(
    "url", ["ftp://example.com/a.jpg", "data:image/png;base64,AAAA", "gopher://x/", "no-scheme", ""]
)
async def test_unsupported_schemes(fetcher, url):
    assert await _error_code(fetcher, url) == UNSUPPORTED_URL


async def test_s3_without_a_store_is_unsupported(fetcher):
    assert await _error_code(fetcher, "s3://bucket/key.jpg") == UNSUPPORTED_URL


# -- size limits ----------------------------------------------------------------------------------


async def test_declared_length_over_limit_is_refused_before_the_body(http_server, fetcher):
    started = time.monotonic()
    assert await _error_code(fetcher, http_server.urls["oversized_declared"]) == TOO_LARGE
    assert time.monotonic() - started < SLOW_SECONDS / 2


async def test_limit_is_exact(http_server):
    limit = 10_000
    exact = http_server.add("exact.bin", b"x" * limit)
    over = http_server.add("over.bin", b"x" * (limit + 1))
    async with Fetcher(http_server.fetch_limits(max_bytes=limit)) as fetcher:
        assert len(await fetcher.fetch(exact)) == limit
        assert await _error_code(fetcher, over) == TOO_LARGE


@pytest.mark.parametrize("name", ["oversized_chunked", "oversized_eof", "gzip_bomb"])
async def test_limit_enforced_while_streaming_without_a_usable_length(http_server, name):
    # A small limit: the body is refused after ~1 KiB whatever the server would go on sending.
    async with Fetcher(http_server.fetch_limits(max_bytes=1024)) as fetcher:
        assert await _error_code(fetcher, http_server.urls[name]) == TOO_LARGE


# -- timeouts -------------------------------------------------------------------------------------


async def test_total_timeout_bounds_a_slow_fetch(http_server):
    limits = http_server.fetch_limits(read_timeout_s=30, total_timeout_s=0.5)
    async with Fetcher(limits) as fetcher:
        started = time.monotonic()
        assert await _error_code(fetcher, http_server.urls["slow_headers"]) == TIMEOUT
        assert time.monotonic() - started < SLOW_SECONDS / 2


# -- redirects ------------------------------------------------------------------------------------


async def test_redirect_limit_is_configurable(http_server):
    async with Fetcher(http_server.fetch_limits(max_redirects=2)) as fetcher:
        assert await _error_code(fetcher, http_server.urls["redirect_chain"]) == FETCH_FAILED
    async with Fetcher(http_server.fetch_limits(max_redirects=0)) as fetcher:
        assert await fetcher.fetch(http_server.urls["astronaut_jpg"])
        assert await _error_code(fetcher, http_server.url("redirect/0")) == FETCH_FAILED


@pytest.mark.parametrize("location", ["file:///etc/passwd", "s3://bucket/key", "ftp://example.com/x"])
async def test_redirect_to_other_schemes_is_blocked(http_server, location):
    limits = http_server.fetch_limits(allow_file_urls=True)
    async with Fetcher(limits) as fetcher:
        assert await _error_code(fetcher, http_server.redirect_to(location)) == BLOCKED_URL


async def test_redirect_without_location_is_http_status(http_server, fetcher):
    url = http_server.add("no-location", b"", status=302)
    assert await _error_code(fetcher, url) == HTTP_STATUS


# -- private networks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.0.9",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "240.0.0.1",
        "::1",
        "::",
        "fe80::1",
        "fe80::1%eth0",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "2002:a00:1::",  # 6to4 of 10.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "fec0::1",  # site-local (deprecated; Python calls it global)
        "feff:ffff::1",
        "not-an-address",
        # non-canonical numeric IPv4 forms: blocked by the check itself, whatever the HTTP client makes of them
        "2130706433",
        "0x7f.1",
        "017700000001",
        "127.1",
        "0",
        "8.8.8.8.",
        "0x08.0x08.0x08.0x08",
        "010.8.8.8",
    ],
)
def test_non_public_addresses_are_blocked(address):
    assert is_blocked_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address):
    assert not is_blocked_address(address)


async def test_private_targets_blocked_by_default(http_server, public_only_fetcher):
    port = http_server.base_url.rsplit(":", 1)[1]
    hostname = socket.gethostname()
    urls = [
        http_server.urls["astronaut_jpg"],  # the live test server on 127.0.0.1
        f"http://localhost:{port}/img/astronaut_jpg",
        f"http://LOCALHOST.:{port}/img/astronaut_jpg",
        f"http://app.localhost:{port}/img/astronaut_jpg",
        "http://10.0.0.1/a.jpg",
        "http://169.254.169.254/latest/meta-data/",
        f"http://[::1]:{port}/img/astronaut_jpg",
        f"http://[::ffff:127.0.0.1]:{port}/img/astronaut_jpg",
        "http://[::ffff:a00:1]/a.jpg",
        "http://0.0.0.0/a.jpg",
        "https://192.168.0.1/a.jpg",
        f"http://{hostname}:{port}/img/astronaut_jpg",  # a name resolving to loopback via /etc/hosts
    ]
    for url in urls:  # blocked_url, not timeout/fetch_failed: refused before any connection attempt
        assert (url, await _error_code(public_only_fetcher, url)) == (url, BLOCKED_URL)


async def test_legacy_numeric_ipv4_forms_never_reach_loopback(http_server, public_only_fetcher):
    port = http_server.base_url.rsplit(":", 1)[1]
    for host in ("2130706433", "127.1", "0x7f.0.0.1", "0x7f.1", "017700000001", "0"):
        code = await _error_code(public_only_fetcher, f"http://{host}:{port}/img/astronaut_jpg")
        assert (host, code) == (host, BLOCKED_URL)  # refused before any lookup or connection


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "017700000001", "127.1", "0", "1.2.3.4.", "08.8.8.8"])
def test_noncanonical_numeric_hosts_are_recognised(host):
    assert is_noncanonical_numeric_host(host)


@pytest.mark.parametrize("host", ["8.8.8.8", "127.0.0.1", "example.com", "1.2.3.com", "0x7f.example", "::1", "a1"])
def test_canonical_addresses_and_names_are_not_numeric_forms(host):
    assert not is_noncanonical_numeric_host(host)


async def test_numeric_forms_refused_even_where_private_networks_are_allowed(http_server, fetcher):
    """The test server's own fetcher allows private networks; a non-canonical form is still refused."""
    port = http_server.base_url.rsplit(":", 1)[1]
    assert await _error_code(fetcher, f"http://2130706433:{port}/img/astronaut_jpg") == BLOCKED_URL
    assert await fetcher.fetch(f"http://127.0.0.1:{port}/img/astronaut_jpg") == http_server.body("astronaut_jpg")


async def test_guarded_resolver_refuses_numeric_forms_before_resolving():
    inner = _StaticResolver(["93.184.216.34"])  # would answer "public": the form alone must be refused
    with pytest.raises(BlockedAddressError):
        await GuardedResolver(inner).resolve("2130706433", 80)
    with pytest.raises(BlockedAddressError):
        await GuardedResolver(_StaticResolver(["fec0::5"])).resolve("site-local.example", 80)


class _StaticResolver(AbstractResolver):
    """DNS answers fixed by the test (the resolver's filter is the subject, not DNS)."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def resolve(self, host, port=0, family=socket.AF_INET) -> list[ResolveResult]:
        return [
            {"hostname": host, "host": a, "port": port, "family": family, "proto": 0, "flags": 0}
            for a in self.addresses
        ]

    async def close(self) -> None:
        pass


async def test_guarded_resolver_keeps_only_public_addresses():
    resolver = GuardedResolver(_StaticResolver(["10.0.0.7", "93.184.216.34", "::1", "2606:2800::1"]))
    results = await resolver.resolve("mixed.example", 80)
    assert [r["host"] for r in results] == ["93.184.216.34", "2606:2800::1"]


async def test_guarded_resolver_refuses_names_resolving_only_to_private_addresses():
    resolver = GuardedResolver(_StaticResolver(["127.0.0.1", "169.254.169.254", "::ffff:10.0.0.1"]))
    with pytest.raises(BlockedAddressError):
        await resolver.resolve("rebind.example", 80)
    with pytest.raises(BlockedAddressError):
        await GuardedResolver(_StaticResolver(["93.184.216.34"])).resolve("localhost", 80)


@pytest.fixture
def loopback_counts_as_public(monkeypatch):
    """Treat the test server's 127.0.0.1 as a public address; every other rule stays in force."""
    original = fetch_module.is_blocked_address
    monkeypatch.setattr(
        fetch_module, "is_blocked_address", lambda address: address != "127.0.0.1" and original(address)
    )


async def test_redirect_to_private_address_is_blocked(http_server, loopback_counts_as_public):
    port = http_server.base_url.rsplit(":", 1)[1]
    async with Fetcher(fetch_limits(connect_timeout_s=1, total_timeout_s=3)) as fetcher:
        # The "public" origin works, redirects included ...
        assert await fetcher.fetch(http_server.urls["redirect_chain"]) == http_server.body("astronaut_jpg")
        # ... but no hop may lead to a private address, a local name or a loopback literal.
        for target in (
            "http://10.0.0.1/a.jpg",
            "http://169.254.169.254/latest/meta-data/",
            f"http://localhost:{port}/img/astronaut_jpg",
            f"http://[::1]:{port}/img/astronaut_jpg",
            f"http://[::ffff:127.0.0.2]:{port}/img/astronaut_jpg",
        ):
            url = http_server.redirect_to(target)
            assert (target, await _error_code(fetcher, url)) == (target, BLOCKED_URL)


async def test_private_networks_allowed_when_configured(http_server, fetcher):
    port = http_server.base_url.rsplit(":", 1)[1]
    assert await fetcher.fetch(f"http://localhost:{port}/img/astronaut_jpg") == http_server.body(
        "astronaut_jpg"
    )


# -- file:// --------------------------------------------------------------------------------------


async def test_file_urls_refused_unless_allowed(tmp_path, fetcher):
    path = tmp_path / "a.jpg"
    path.write_bytes(b"data")
    assert await _error_code(fetcher, path.as_uri()) == BLOCKED_URL


async def test_file_urls_confined_to_root(tmp_path, http_server):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.jpg").write_bytes(http_server.body("astronaut_jpg"))
    (tmp_path / "outside.jpg").write_bytes(b"secret")
    (root / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    (root / "big.bin").write_bytes(b"x" * 2048)
    limits = fetch_limits(allow_file_urls=True, file_root=str(root), max_bytes=1024 * 1024)
    async with Fetcher(limits) as fetcher:
        assert await fetcher.fetch((root / "sub" / "a.jpg").as_uri()) == http_server.body("astronaut_jpg")
        assert await fetcher.fetch(f"file://localhost{root}/sub/a.jpg")
        assert await _error_code(fetcher, (tmp_path / "outside.jpg").as_uri()) == BLOCKED_URL
        assert await _error_code(fetcher, f"file://{root}/sub/../../outside.jpg") == BLOCKED_URL
        assert await _error_code(fetcher, (root / "link.jpg").as_uri()) == BLOCKED_URL
        assert await _error_code(fetcher, (root / "missing.jpg").as_uri()) == FETCH_FAILED
        assert await _error_code(fetcher, root.as_uri()) == FETCH_FAILED
        assert await _error_code(fetcher, f"file://otherhost{root}/sub/a.jpg") == UNSUPPORTED_URL
    async with Fetcher(fetch_limits(allow_file_urls=True, max_bytes=1024)) as fetcher:
        assert await _error_code(fetcher, (root / "big.bin").as_uri()) == TOO_LARGE
        assert await fetcher.fetch((tmp_path / "outside.jpg").as_uri()) == b"secret"  # no root: any path
