"""Images on loopback for the demo, the benchmarks and the tests: sample pictures and a local image server.

Pictures:
- ``sample_photos()``: ten real photos (scikit-image, scikit-learn) as JPEG/PNG bytes, by file name;
- ``varied_jpegs(count, directory)``: N varied JPEGs of 640x480 cut from those photos (the benchmarks' set);
- ``write_digits_dataset(directory)``, ``digits_splits(samples)``, ``DIGIT_CLASS_NAMES``: scikit-learn's
  digits as PNG files under ``<class>/<file>`` (training data with real labels);
- ``reference_samples()``, ``GOOD_SIZES``, ``EXPECTED_ERRORS``, ``huge_blank_png``: good and broken images
  with known outcomes (the fetch/decode tests).

Servers (127.0.0.1 only, free ports):
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
import io
import random
import select
import socket
import struct
import subprocess
import sys
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
from aiohttp import web
from PIL import Image

from handlers.errors import (
    BLOCKED_URL,
    DECODE_FAILED,
    FETCH_FAILED,
    HTTP_STATUS,
    NOT_AN_IMAGE,
    TIMEOUT,
    TOO_LARGE,
    TOO_MANY_PIXELS,
)
from handlers.fetch import FetchLimits
from testkit.local import REPO, set_parent_death_signal

SLOW_SECONDS = 4.0  # how long slow routes stall (longer than fetch_limits().read_timeout_s)
TEST_MAX_BYTES = 4 * 1024 * 1024  # fetch_limits().max_bytes
STREAM_CAP = 64 * 1024 * 1024  # oversized routes never send more than this
_CHUNK = 64 * 1024
VARIED_SIZE = (640, 480)
DIGIT_CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGITS_IMAGE_SIZE = 32


# -- sample photos -------------------------------------------------------------------------------


def sample_photos() -> dict[str, bytes]:
    """Ten real photos from scikit-image and scikit-learn, encoded as their file names say."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    arrays = {
        "astronaut.jpg": data.astronaut(), "chelsea-the-cat.jpg": data.chelsea(), "coffee.jpg": data.coffee(),
        "camera-man.png": data.camera(), "rocket.jpg": data.rocket(), "china.jpg": load_sample_image("china.jpg"),
        "flower.jpg": load_sample_image("flower.jpg"), "hubble.jpg": data.hubble_deep_field(),
        "immunohistochemistry.jpg": data.immunohistochemistry(), "cat-detail.png": data.chelsea()[50:250, 100:350],
    }
    out = {}
    for name, array in arrays.items():
        image = Image.fromarray(np.asarray(array))
        buffer = io.BytesIO()
        image.save(buffer, "PNG" if name.endswith(".png") else "JPEG", quality=90)
        out[name] = buffer.getvalue()
    return out


def content_type(name: str) -> str:
    """The Content-Type for a file name's suffix (JPEG unless it says otherwise)."""
    suffix = name.rsplit(".", 1)[-1].lower()
    return {"png": "image/png", "gif": "image/gif", "webp": "image/webp"}.get(suffix, "image/jpeg")


def _source_images() -> list[Image.Image]:
    import skimage.data
    import sklearn.datasets

    sources = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
                 "colorwheel", "logo", "camera", "coins", "moon", "page", "text", "clock", "grass", "gravel", "brick"):
        array = getattr(skimage.data, name)()
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        image = Image.fromarray(array)
        if image.mode == "RGBA":
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image).convert("RGB")
        sources.append(image)
    for array in sklearn.datasets.load_sample_images().images:  # china.jpg, flower.jpg
        sources.append(Image.fromarray(array))
    return sources


def varied_jpegs(count: int, directory: Path, seed: int = 0, size: tuple[int, int] = VARIED_SIZE) -> list[Path]:
    """``count`` varied JPEGs (``size``, 640x480 by default) written to ``directory/<nnnnn>.jpg``: random 4:3
    crops of the sample photos, flips, brightness and colour, JPEG quality 75-95 (~48 KB each)."""
    from PIL import ImageEnhance

    rng = random.Random(seed)
    sources = _source_images()
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    width, height = size
    for i in range(count):
        src = sources[i % len(sources)]
        w, h = src.size
        cw = min(w, h * width / height)
        scale = rng.uniform(0.55, 1.0)
        cw, ch = cw * scale, cw * scale * height / width
        x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        image = src.crop((round(x0), round(y0), round(x0 + cw), round(y0 + ch))).resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
        if image.mode == "RGB":
            image = ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.3))
        path = directory / f"{i:05d}.jpg"
        image.save(path, "JPEG", quality=rng.randint(75, 95))
        paths.append(path)
    return paths


# -- digits --------------------------------------------------------------------------------------


def write_digits_dataset(directory: Path, size: int = DIGITS_IMAGE_SIZE,
                         limit: int | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """Write scikit-learn's 8x8 digits (1,797 images) upscaled to ``size`` as PNG files ``<dir>/<class>/<n>.png``.

    Returns ``(samples, class_names)`` with samples ``(path, class index)`` in dataset order; the parent folder
    of each file is its class name (so folder-labeled URLs work too). ``limit`` keeps the first N images.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images if limit is None else digits.images[:limit]
    targets = digits.target if limit is None else digits.target[:limit]
    directory = Path(directory)
    for name in DIGIT_CLASS_NAMES:
        (directory / name).mkdir(parents=True, exist_ok=True)
    samples: list[tuple[str, int]] = []
    for index, (pixels, label) in enumerate(zip(images, targets)):
        gray = (np.asarray(pixels, dtype=np.float32) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.BILINEAR)
        path = directory / DIGIT_CLASS_NAMES[int(label)] / f"{index:04d}.png"
        image.save(path)
        samples.append((str(path), int(label)))
    return samples, list(DIGIT_CLASS_NAMES)


def digits_splits(samples: list[tuple[str, int]], seed: int = 0) -> tuple[list, list, list]:
    """(train, val, test): 10% held back for tests, then 20% of the rest for validation; stratified."""
    from ml.training import stratified_split

    rest, test = stratified_split(samples, 0.1, seed)
    train, val = stratified_split(rest, 0.2, seed)
    return train, val, test


# -- reference samples: good and broken images with known outcomes ------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def huge_blank_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of width x height, all black: tiny on the wire, huge when decoded."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row * 500) for _ in range(height // 500)]
    parts.append(compressor.compress(row * (height % 500)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )



def ico_with_frame(frame: bytes, directory_size: int = 16) -> bytes:
    """An ICO whose one directory entry says ``directory_size`` square and holds ``frame`` (PNG or BMP bytes)."""
    side = directory_size % 256
    entry = struct.pack("<BBBBHHII", side, side, 0, 0, 1, 32, len(frame), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + frame


def ico_bomb(width: int, height: int) -> bytes:
    """An ICO whose directory says 16x16 and that embeds a blank ``width x height`` PNG: a few KB on the wire;
    Pillow decodes the embedded frame while opening the file."""
    return ico_with_frame(huge_blank_png(width, height))


def ico_bmp_frame(width: int, height: int) -> bytes:
    """An ICO whose BMP frame's info header claims ``width x height`` (pixel data truncated)."""
    header = struct.pack("<IiiHHIIiiII", 40, width, 2 * height, 1, 32, 0, 0, 0, 0, 0, 0)
    return ico_with_frame(header + b"\x00" * 64)

def reference_samples() -> dict[str, tuple[bytes, str]]:
    """Route name -> (bytes, content type): real photos in many formats and modes, and broken or hostile
    files; what each decodes to is in ``GOOD_SIZES`` and ``EXPECTED_ERRORS``."""
    import skimage.data
    import sklearn.datasets

    astronaut = Image.fromarray(skimage.data.astronaut())  # 512x512 RGB
    chelsea = Image.fromarray(skimage.data.chelsea())  # 451x300 RGB
    coffee = Image.fromarray(skimage.data.coffee())  # 600x400 RGB
    camera = skimage.data.camera()  # 512x512 uint8 grey
    sklearn_images = Path(sklearn.datasets.__file__).parent / "images"

    rgba = chelsea.convert("RGBA")
    alpha = np.full((chelsea.height, chelsea.width), 255, dtype=np.uint8)
    alpha[:50, :50] = 0  # fully transparent top-left corner -> white after decode
    rgba.putalpha(Image.fromarray(alpha))

    la = Image.fromarray(camera).convert("LA")
    la_alpha = np.full(camera.shape, 255, dtype=np.uint8)
    la_alpha[:40, :40] = 0
    la.putalpha(Image.fromarray(la_alpha))

    palette = chelsea.quantize(colors=63)  # indices 0..62; index 63 reserved for "transparent"
    colours = palette.getpalette()[: 63 * 3] + [0, 255, 0]
    palette.putpalette(colours)
    palette.paste(63, (0, 0, 60, 60))

    frames = [Image.new("RGB", (64, 48), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    astronaut_jpg = _encode(astronaut, "JPEG", quality=85)

    return {
        "astronaut_jpg": (astronaut_jpg, "image/jpeg"),
        "chelsea_png": (_encode(chelsea, "PNG"), "image/png"),
        "coffee_jpg": (_encode(coffee, "JPEG", quality=85), "image/jpeg"),
        "camera_png": (_encode(Image.fromarray(camera), "PNG"), "image/png"),
        "china_jpg": ((sklearn_images / "china.jpg").read_bytes(), "image/jpeg"),
        "flower_jpg": ((sklearn_images / "flower.jpg").read_bytes(), "image/jpeg"),
        "cmyk_jpg": (_encode(coffee.convert("CMYK"), "JPEG", quality=90), "image/jpeg"),
        "gray16_png": (
            _encode(Image.fromarray(camera.astype(np.uint16) * 257), "PNG"),
            "image/png",
        ),
        "palette_transparent_png": (_encode(palette, "PNG", transparency=63), "image/png"),
        "rgba_png": (_encode(rgba, "PNG"), "image/png"),
        "la_png": (_encode(la, "PNG"), "image/png"),
        "animated_gif": (
            _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
            "image/gif",
        ),
        "exif_rotated_jpg": (_encode(coffee, "JPEG", quality=85, exif=exif.tobytes()), "image/jpeg"),
        "truncated_jpg": (astronaut_jpg[: len(astronaut_jpg) // 2], "image/jpeg"),
        "not_an_image": (
            b"<!doctype html><html><body><h1>Not an image</h1></body></html>",
            "text/html",
        ),
        # Pillow's own bomb check fires (400 M pixels > 2 x MAX_IMAGE_PIXELS).
        "bomb_png": (huge_blank_png(20_000, 20_000), "image/png"),
        # Under Pillow's threshold but over DecodeLimits().max_pixels (48 M > 40 M): our header check.
        "large_pixels_png": (huge_blank_png(8_000, 6_000), "image/png"),
    }


GOOD_SIZES: dict[str, tuple[int, int]] = {
    "astronaut_jpg": (512, 512),
    "chelsea_png": (451, 300),
    "coffee_jpg": (600, 400),
    "camera_png": (512, 512),
    "china_jpg": (640, 427),
    "flower_jpg": (640, 427),
    "cmyk_jpg": (600, 400),
    "gray16_png": (512, 512),
    "palette_transparent_png": (451, 300),
    "rgba_png": (451, 300),
    "la_png": (512, 512),
    "animated_gif": (64, 48),
    "exif_rotated_jpg": (400, 600),  # stored 600x400, EXIF orientation 6 swaps the sides
    "redirect_chain": (512, 512),  # 3 hops, then astronaut_jpg
    "gzip_encoded_png": (451, 300),  # chelsea_png with Content-Encoding: gzip
}

EXPECTED_ERRORS: dict[str, str] = {
    "not_found": HTTP_STATUS,
    "server_error": HTTP_STATUS,
    "slow_headers": TIMEOUT,
    "slow_body": TIMEOUT,
    "not_an_image": NOT_AN_IMAGE,
    "truncated_jpg": DECODE_FAILED,
    "bomb_png": TOO_MANY_PIXELS,
    "large_pixels_png": TOO_MANY_PIXELS,
    "oversized_chunked": TOO_LARGE,  # no Content-Length, chunked body past the limit
    "oversized_declared": TOO_LARGE,  # Content-Length over the limit, body never sent
    "oversized_eof": TOO_LARGE,  # no Content-Length, no chunking: body until the connection closes
    "gzip_bomb": TOO_LARGE,  # honest small Content-Length, gzip body that inflates past the limit
    "too_many_redirects": FETCH_FAILED,
    "redirect_to_file": BLOCKED_URL,
    "connection_refused": FETCH_FAILED,
}


# -- the server (a thread of this process) ---------------------------------------------------------------------------------


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
        return FetchLimits(**values)  # type: ignore[arg-type]

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
        self.proc = subprocess.Popen([sys.executable, "-m", "testkit.images", "serve", str(directory)],
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
        sys.exit("usage: python -m testkit.images serve DIRECTORY")
    _serve(sys.argv[2])
