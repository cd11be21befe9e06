"""Image servers on loopback (127.0.0.1 only, free ports) for the demo, the benchmarks and the tests
(the pictures they serve: ``testkit.pictures``):

- ``start_image_server(samples)`` -> ``ImageServer``: aiohttp on its own event loop in a daemon thread, so
  sync code, async code and code under test on any loop can use it. ``/img/<name>`` serves ``samples``;
  ``add(path, body)`` registers bytes at ``/custom/<path>``; misbehaving routes (slow, oversized, gzip bomb,
  redirects, a refused port) have URLs in ``urls`` when started with ``reference=True``. Every delay is
  bounded (``SLOW_SECONDS``) and every stream is bounded in size.
- ``ImageServerProcess(directory)``: the same server in a child process, serving a directory's images
  (a benchmark keeps the server's CPU out of its own process and can measure it apart).
"""

from __future__ import annotations

import asyncio
import gzip
import select
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from handlers.fetch import FetchLimits
from testkit.local import REPO, set_parent_death_signal
from testkit.pictures import EXPECTED_ERRORS, GOOD_SIZES, content_type, reference_samples

SLOW_SECONDS = 4.0  # how long slow routes stall (longer than fetch_limits().read_timeout_s)
TEST_MAX_BYTES = 4 * 1024 * 1024  # fetch_limits().max_bytes
STREAM_CAP = 64 * 1024 * 1024  # oversized routes never send more than this
_CHUNK = 64 * 1024

@dataclass
class _Custom:
    body: bytes
    content_type: str
    status: int
    headers: dict[str, str]


@dataclass
class ImageServer:
    """Handle on the running image server (see the module docstring)."""

    base_url: str = ""
    raw_base_url: str = ""
    refused_url: str = ""
    samples: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    good: tuple[str, ...] = tuple(GOOD_SIZES)
    expected_sizes: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(GOOD_SIZES))
    expected_errors: dict[str, str] = field(default_factory=lambda: dict(EXPECTED_ERRORS))
    _custom: dict[str, _Custom] = field(default_factory=dict)
    _requested: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: "_ServerThread | None" = None
    _refused: socket.socket | None = None

    def stop(self) -> None:
        """Stop the server thread and release the refused port."""
        if self._thread is not None:
            self._thread.stop()
            self._thread = None
        if self._refused is not None:
            self._refused.close()
            self._refused = None

    def url(self, path: str) -> str:
        """Absolute URL of a path on this server."""
        return self.base_url + "/" + path.lstrip("/")

    def body(self, name: str) -> bytes:
        """The exact bytes a static image route serves."""
        return self.samples[name][0]

    def add(
        self,
        path: str,
        body: bytes = b"",
        *,
        content_type: str = "application/octet-stream",
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> str:
        """Serve ``body`` at ``/custom/<path>``; returns its URL."""
        path = path.lstrip("/")
        with self._lock:
            self._custom[path] = _Custom(body, content_type, status, dict(headers or {}))
        return self.url(f"custom/{path}")

    def redirect_to(self, location: str, status: int = 302) -> str:
        """A URL on this server that redirects to ``location``."""
        return self.url(f"redirect-to?location={quote(location, safe='')}&status={status}")

    def fetch_limits(self, **overrides: object) -> FetchLimits:
        """The FetchLimits under which ``expected_errors`` hold (loopback allowed, short timeouts)."""
        values: dict[str, object] = dict(
            allow_private_networks=True,
            max_bytes=TEST_MAX_BYTES,
            connect_timeout_s=2.0,
            read_timeout_s=1.0,
            total_timeout_s=8.0,
            max_redirects=3,
        )
        values.update(overrides)
        from testkit.configs import fetch_limits  # the settings' defaults (imports the consumers layer)

        return replace(fetch_limits(), **values)

    def hits(self, prefix: str) -> int:
        """How many requests reached ``/custom/<prefix>...`` (registered paths or not)."""
        with self._lock:
            return sum(1 for path in self._requested if path.startswith(prefix))

    def _lookup(self, path: str) -> _Custom | None:
        with self._lock:
            self._requested.append(path)
            return self._custom.get(path)


def _build_app(server: ImageServer) -> web.Application:
    routes = web.RouteTableDef()
    payloads: dict[str, bytes] = {}  # the gzip routes' bodies, made on first use

    def gzip_bomb() -> bytes:
        if "bomb" not in payloads:
            payloads["bomb"] = gzip.compress(b"\x00" * (TEST_MAX_BYTES * 2 + 1), compresslevel=9)
        return payloads["bomb"]

    @routes.get("/img/{name}")
    async def image(request: web.Request) -> web.StreamResponse:
        sample = server.samples.get(request.match_info["name"])
        if sample is None:
            raise web.HTTPNotFound()
        return web.Response(body=sample[0], content_type=sample[1])

    @routes.get("/status/{code}")
    async def status(request: web.Request) -> web.StreamResponse:
        return web.Response(status=int(request.match_info["code"]), text="status route")

    @routes.get("/slow-headers")
    async def slow_headers(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(SLOW_SECONDS)
        return web.Response(body=server.body("astronaut_jpg"), content_type="image/jpeg")

    @routes.get("/slow-body")
    async def slow_body(request: web.Request) -> web.StreamResponse:
        data = server.body("astronaut_jpg")
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[:1024])
        await asyncio.sleep(SLOW_SECONDS)
        try:
            await response.write(data[1024:])
        except (ConnectionError, RuntimeError):
            pass
        return response

    @routes.get("/oversized-chunked")
    async def oversized_chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b"\xff" * _CHUNK
        try:
            for _ in range(STREAM_CAP // _CHUNK):
                await response.write(chunk)
        except (ConnectionError, RuntimeError):
            pass
        return response

    @routes.get("/oversized-declared")
    async def oversized_declared(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.content_length = 1 << 30
        await response.prepare(request)
        await asyncio.sleep(SLOW_SECONDS)  # the client must refuse before any body arrives
        if request.transport is not None:
            request.transport.close()
        return response

    @routes.get("/gzip-bomb")
    async def gzip_bomb_route(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=gzip_bomb(), headers={"Content-Type": "image/png", "Content-Encoding": "gzip"}
        )

    @routes.get("/gzip-png")
    async def gzip_png_route(request: web.Request) -> web.StreamResponse:
        if "chelsea_png" not in server.samples:
            raise web.HTTPNotFound()
        gzip_png = payloads.setdefault("png", gzip.compress(server.samples["chelsea_png"][0]))
        return web.Response(
            body=gzip_png, headers={"Content-Type": "image/png", "Content-Encoding": "gzip"}
        )

    @routes.get("/redirect/{hops}")
    async def redirect(request: web.Request) -> web.StreamResponse:
        hops = int(request.match_info["hops"])
        target = f"/redirect/{hops - 1}" if hops > 0 else "/img/astronaut_jpg"
        raise web.HTTPFound(target)

    @routes.get("/redirect-to")
    async def redirect_to(request: web.Request) -> web.StreamResponse:
        status = int(request.query.get("status", "302"))
        return web.Response(status=status, headers={"Location": request.query["location"]})

    @routes.get("/custom/{path:.*}")
    async def custom(request: web.Request) -> web.StreamResponse:
        entry = server._lookup(request.match_info["path"])
        if entry is None:
            raise web.HTTPNotFound()
        return web.Response(
            status=entry.status, body=entry.body, content_type=entry.content_type, headers=entry.headers
        )

    app = web.Application()
    app.add_routes(routes)
    return app


async def _raw_eof_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 200 with neither Content-Length nor chunking: the body ends when the socket closes."""
    try:
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=SLOW_SECONDS)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nConnection: close\r\n\r\n")
        chunk = b"\xd8" * _CHUNK
        for _ in range(STREAM_CAP // _CHUNK):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError, OSError):
        pass
    finally:
        writer.close()


class _ServerThread(threading.Thread):
    def __init__(self, app: web.Application) -> None:
        super().__init__(name="image-server", daemon=True)
        self.app = app
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.port = 0
        self.raw_port = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    def run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            runner = web.AppRunner(self.app, shutdown_timeout=1.0, access_log=None)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            self.port = runner.addresses[0][1]
            raw = loop.run_until_complete(asyncio.start_server(_raw_eof_body, "127.0.0.1", 0))
            self.raw_port = raw.sockets[0].getsockname()[1]
        except BaseException as exc:  # report start-up failures to start_image_server
            self.error = exc
            self.ready.set()
            loop.close()
            return
        self.ready.set()
        try:
            loop.run_forever()
        finally:
            raw.close()
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def stop(self) -> None:
        if self.loop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.join(timeout=10)


def start_image_server(samples: dict[str, tuple[bytes, str]] | None = None, *, reference: bool = False) -> ImageServer:
    """A running ImageServer on 127.0.0.1 serving ``samples`` (name -> (bytes, content type)) at ``/img/<name>``;
    with ``reference``, also ``reference_samples()`` and every misbehaving route, with their URLs in ``urls``."""
    all_samples = {**(reference_samples() if reference else {}), **(samples or {})}
    # A port that is bound but not listening: connections to it are refused, and nobody else takes it.
    refused = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    refused.bind(("127.0.0.1", 0))
    refused_url = f"http://127.0.0.1:{refused.getsockname()[1]}/img/astronaut_jpg"

    server = ImageServer(refused_url=refused_url, samples=all_samples, _refused=refused)
    thread = _ServerThread(_build_app(server))
    thread.start()
    thread.ready.wait(timeout=30)
    if thread.error is not None or not thread.port:
        refused.close()
        raise RuntimeError(f"image server did not start: {thread.error!r}")
    server._thread = thread
    server.base_url = f"http://127.0.0.1:{thread.port}"
    server.raw_base_url = f"http://127.0.0.1:{thread.raw_port}"
    urls = {name: server.url(f"img/{name}") for name in all_samples}
    if reference:
        urls.update(
            not_found=server.url("status/404"),
            server_error=server.url("status/500"),
            slow_headers=server.url("slow-headers"),
            slow_body=server.url("slow-body"),
            oversized_chunked=server.url("oversized-chunked"),
            oversized_declared=server.url("oversized-declared"),
            oversized_eof=server.raw_base_url + "/",
            gzip_bomb=server.url("gzip-bomb"),
            gzip_encoded_png=server.url("gzip-png"),
            redirect_chain=server.url("redirect/2"),
            too_many_redirects=server.url("redirect/5"),
            redirect_to_file=server.redirect_to("file:///etc/passwd"),
            connection_refused=refused_url,
        )
    else:
        server.good, server.expected_sizes, server.expected_errors = (), {}, {}
    server.urls = urls
    return server


# -- the server in a child process ---------------------------------------------------------------


def directory_samples(directory: Path) -> dict[str, tuple[bytes, str]]:
    """Every image file directly in ``directory``, by file name."""
    return {p.name: (p.read_bytes(), content_type(p.name)) for p in sorted(Path(directory).iterdir())
            if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png", ".gif", ".webp")}


class ImageServerProcess:
    """``start_image_server`` in a child process serving ``directory``'s images at ``/img/<file name>``; the
    child exits when this process closes its stdin (``stop``) or dies (parent-death signal)."""

    def __init__(self, directory: Path, start_timeout_s: float = 60) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "testkit.image_server", "serve", str(directory)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO,
                                     start_new_session=True, preexec_fn=set_parent_death_signal)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], start_timeout_s)  # bounded
        line = self.proc.stdout.readline() if ready else b""
        if not line.startswith(b"PORT "):
            self.stop()
            raise RuntimeError(f"image server process did not start: {line!r}")
        self.port = int(line.split()[1])
        self.base_url = f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, name: str) -> str:
        return f"{self.base_url}/img/{name}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _serve(directory: str) -> None:
    server = start_image_server(directory_samples(Path(directory)))
    print(f"PORT {server.base_url.rsplit(':', 1)[1]}", flush=True)
    sys.stdin.buffer.read()  # until the parent closes stdin or goes away
    server.stop()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "serve":
        sys.exit("usage: python -m testkit.image_server serve DIRECTORY")
    _serve(sys.argv[2])
