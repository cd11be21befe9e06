"""Decode fetched bytes into RGB Pillow images, safely, off the event loop, within a memory budget.

``decode_image`` is synchronous (run it in a thread pool); ``decoded`` is the same as a context manager
that keeps the image's memory reserved while the caller preprocesses it (``decoded_tensor``: the same, giving
a uint8 tensor for the tensor preprocessing path, ``CLS_PREPROCESS=tensor``); ``fetch_image`` fetches and
decodes one URL. Failures raise ``ImageError`` with a stable code: ``not_an_image``, ``decode_failed``,
``too_many_pixels`` (also when the decode's estimated peak memory exceeds the whole budget),
``bad_aspect_ratio`` (plus the fetch codes from ``handlers.fetch``).

Memory is bounded by design, from the header, before any pixel is decoded:

- the aspect ratio is limited (``max_aspect_ratio``): shortest-side resizes (CLIP, timm) then produce at
  most ``ratio x side`` pixels on the long side, whatever the image's size in bytes;
- the peak bytes of decoding and converting the first frame are estimated from the size, the mode
  (bytes per pixel as Pillow stores it), the format (decoders that buffer a whole frame count twice) and
  the conversion to RGB (see :func:`estimate_decode_bytes`); only the first frame is ever decoded;
- the size is the real frame's: every allowed format's header gives it before any pixel is decoded, except
  ICO, whose directory cannot be trusted and whose frame Pillow decodes while opening: its frames' own headers
  are read first (:func:`eager_frame_size`) and the file is opened inside the reservation. Formats outside
  ``_ALLOWED_FORMATS`` (ICNS, CUR, EPS, PSD, ...) are not opened at all (``not_an_image``); multi-frame files
  (TIFF, GIF, MPO, APNG, animated WebP) have only their first frame decoded and their frames never counted; a
  tiled TIFF's tile, which libtiff allocates whole, is checked and counted like the frame;
- every decode reserves its estimate in a shared :class:`DecodeBudget` (a thread-safe semaphore on bytes,
  first come first served) until the caller is done with the image, so the decodes running at once never
  hold more than the budget, however many threads decode.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from handlers.errors import BAD_ASPECT_RATIO, DECODE_FAILED, NOT_AN_IMAGE, TOO_MANY_PIXELS, ImageError
from handlers.fetch import Fetcher

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
# Raster formats accepted from the outside (no EPS/PDF and friends that shell out or parse documents).
_ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "ICO", "PPM", "AVIF")
_IMAGE_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
    b"\x00\x00\x01\x00",  # ICO
)


class DecodeBudget:
    """A shared budget of bytes for the decodes in progress: a thread-safe, first-come-first-served semaphore.

    ``reserve(n)`` blocks until ``n`` bytes are free and no earlier caller is still waiting (so a large image
    is not starved by a stream of small ones); a request larger than the whole budget is refused at once.
    """

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be > 0")
        self.capacity = capacity_bytes
        self.in_use = 0
        self.peak = 0  # the most bytes ever reserved at once (tests, metrics)
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        if nbytes > self.capacity:
            raise ImageError(
                TOO_MANY_PIXELS,
                f"decoding needs about {_mb(nbytes)} MB, more than the whole decode budget of {_mb(self.capacity)} MB",
            )
        ticket = object()
        with self._cond:
            self._waiting.append(ticket)
            try:
                self._cond.wait_for(lambda: self._waiting[0] is ticket and self.in_use + nbytes <= self.capacity)
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= nbytes
                self._cond.notify_all()


@dataclass(frozen=True)
class DecodeLimits:
    """Limits for decoding one image (well below Pillow's own decompression-bomb threshold).

    ``max_aspect_ratio``: long side / short side. 20 admits banners (970x90 is 10.8) and phone panoramas
    (about 4:1 to 12:1); beyond it a centre crop sees under 5% of the image, and a shortest-side resize to
    224 px already yields 4480 px on the long side. ``budget``: the shared decode budget (None: only the
    per-image checks). ``consumers.worker.decode_limits`` builds them from ``CLS_*``; the defaults live in
    ``consumers.settings`` only.
    """

    max_pixels: int  # CLS_MAX_IMAGE_PIXELS
    max_aspect_ratio: float  # CLS_MAX_ASPECT_RATIO
    budget: DecodeBudget | None = None


# Bytes per pixel of a decoded frame as Pillow stores it (RGB is padded to 4); anything else counts 4.
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "I": 4, "F": 4}
# Formats whose decoder buffers a whole frame (libtiff strips/tiles, WebP/AVIF decode then copy).
_WHOLE_FRAME_DECODERS = frozenset({"TIFF", "WEBP", "AVIF"})
_CHUNK_ROWS_BYTES = 16 * 1024 * 1024  # row chunks of the high-depth conversion (float32 work space)
_FIXED_BYTES = 4 * 1024 * 1024  # decoder state and row buffers


def _mb(nbytes: int) -> int:
    return -(-nbytes // (1024 * 1024))


def estimate_decode_bytes(image: Image.Image, data_len: int = 0) -> int:
    """Peak bytes of decoding ``image``'s first frame to RGB, from its header (an upper bound).

    Decoded frame (x2 for whole-frame decoders), a tiled TIFF's tile buffer, a possible EXIF-rotated copy, and the
    RGB conversion: high-depth greyscale an array copy + 1 B (L) + 4 B (RGB) per pixel plus a bounded work space,
    alpha compositing 16 B, anything else 4 B; plus the encoded bytes and a fixed allowance. Measured peaks stay below it (see
    tests/unit/test_decode_limits.py).
    """
    width, height = image.size
    pixels = width * height
    stored = _STORED_BYTES.get(image.mode, 4)
    per_pixel = stored * (2 if image.format in _WHOLE_FRAME_DECODERS else 1)
    per_pixel += stored  # an EXIF rotation or a detached first frame (PNG's EXIF may follow the pixels: not read here)
    extra = data_len + _FIXED_BYTES
    extra += tiff_tile_pixels(image) * 8  # libtiff's buffer for one tile (up to 8 B/pixel: 16-bit RGBA)
    mode = image.mode
    if mode in _HIGH_DEPTH_MODES:
        per_pixel += stored + 5  # numpy's copy of the frame, then L and RGB
        extra += 2 * _CHUNK_ROWS_BYTES
    elif mode in _ALPHA_MODES or "transparency" in image.info:
        per_pixel += 16  # RGBA copy, white background, composite; then RGB (measured ~15)
    elif mode != "RGB":
        per_pixel += 4
    return pixels * per_pixel + extra




def tiff_tile_pixels(image: Image.Image) -> int:
    """The pixels of one tile of a tiled TIFF, from its header (``TileWidth x TileLength``; 0 for anything else):
    libtiff allocates a whole tile to decode, even when the tile is far larger than the image."""
    if image.format != "TIFF":
        return 0
    tags = getattr(image, "tag_v2", {})
    width, length = tags.get(322), tags.get(323)
    if not isinstance(width, int) or not isinstance(length, int):
        return 0
    return max(0, width) * max(0, length)


def _looks_like_image(data: bytes) -> bool:
    if data.startswith(_IMAGE_MAGIC):
        return True
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    return data[4:8] == b"ftyp"  # AVIF / HEIF family


def _allowed_formats() -> list[str]:
    Image.init()
    return [name for name in _ALLOWED_FORMATS if name in Image.OPEN]


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit RGB, scaling instead of clipping.

    Works on row chunks in float32, so the work space stays bounded (``_CHUNK_ROWS_BYTES``) whatever the size.
    """
    values = np.asarray(image)
    height, width = values.shape[:2]
    rows = max(1, _CHUNK_ROWS_BYTES // max(1, width * 4))
    mode = image.mode

    def chunks() -> Iterator[tuple[int, np.ndarray]]:
        for top in range(0, height, rows):
            yield top, values[top : top + rows].astype(np.float32)

    if mode.startswith("I;16"):
        divisor, multiplier = 257.0, 1.0
    elif mode == "I":
        top_value = max((float(np.clip(c, 0, 65535).max(initial=0)) for _, c in chunks()), default=0.0)
        divisor, multiplier = (257.0 if top_value > 255 else 1.0), 1.0
    else:  # "F"
        top_value = max((float(np.nan_to_num(c, nan=0.0, posinf=0.0, neginf=0.0).max(initial=0.0))
                         for _, c in chunks()), default=0.0)
        divisor, multiplier = 1.0, (255.0 if top_value <= 1.0 else 1.0)
    grey = np.empty((height, width), dtype=np.uint8)
    for top, chunk in chunks():
        np.nan_to_num(chunk, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        if mode == "I":
            np.clip(chunk, 0, 65535, out=chunk)
        chunk *= multiplier / divisor
        np.rint(chunk, out=chunk)
        np.clip(chunk, 0, 255, out=chunk)
        grey[top : top + chunk.shape[0]] = chunk
    del values
    return Image.fromarray(grey, mode="L").convert("RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    icc = image.info.get("icc_profile")
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            converted = ImageCms.profileToProfile(
                image, source, ImageCms.createProfile("sRGB"), outputMode="RGB"
            )
            if converted is not None:
                return converted
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # an unusable profile: fall back to Pillow's plain conversion
    return image.convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decoded mode to RGB; transparency is composited on white."""
    mode = image.mode
    if mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_rgb(image)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        composite = Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba)
        del rgba  # peak: source + 12 to 16 bytes per pixel (see estimate_decode_bytes)
        return composite.convert("RGB")
    if mode == "RGB":
        return image
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    return image.convert("RGB")


def decode_image(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Decode image bytes into a fully loaded RGB image (first frame; EXIF orientation applied).

    Synchronous and CPU-bound: call it from a thread pool. The limits are checked from the header
    before any pixel is decoded; the budget is held while decoding only.
    """
    with decoded(data, limits) as image:
        return image


@contextlib.contextmanager
def decoded(data: bytes, limits: DecodeLimits, work_bytes_per_pixel: int = 0,
            work_bytes: Callable[[int, int], int] | None = None) -> Iterator[Image.Image]:
    """``decode_image`` as a context manager: the decode's memory stays reserved in ``limits.budget``
    until the block ends (preprocess the image inside it; ``work_bytes_per_pixel``: what that work
    allocates per pixel, reserved too; ``work_bytes(width, height)``: what it allocates per image, e.g. a
    model's resize to its own input size)."""
    with _opened(data, limits, lambda image: work_bytes_per_pixel, work_bytes) as image:
        yield _load_rgb(image)


@contextlib.contextmanager
def _opened(data: bytes, limits: DecodeLimits, work_per_pixel: Callable[[Image.Image], int],
            work_bytes: Callable[[int, int], int] | None = None) -> Iterator[Image.Image]:
    """The one opener: the frame's real size from its header, the shape checks, the decode estimate reserved
    in the budget, then the opened (not yet decoded) image, for as long as the block runs.

    Pillow opens every allowed format lazily (header only) except ICO, which decodes its largest frame while
    opening: for ICO the size comes from :func:`eager_frame_size` (each frame's own header) and the file is
    opened inside the reservation."""
    eager = eager_frame_size(data)
    if eager is not None:
        _check_shape(eager, limits)
        width, height = eager
        estimate = _ICO_BYTES_PER_PIXEL * width * height + len(data) + _FIXED_BYTES
        estimate += work_bytes(width, height) if work_bytes is not None else 0
        with _reservation(limits, estimate):
            image = _open(data)
            if image.size[0] * image.size[1] > width * height:  # never: the largest frame was counted
                raise ImageError(DECODE_FAILED, f"ICO frame {image.size} larger than its header said")
            _check_shape(image.size, limits)  # the frame Pillow chose (its aspect ratio)
            yield image
        return
    image = _open(data)
    _check_shape(image.size, limits)
    if tiff_tile_pixels(image) > limits.max_pixels:
        raise ImageError(TOO_MANY_PIXELS, f"TIFF tile of {tiff_tile_pixels(image)} pixels > limit {limits.max_pixels}")
    width, height = image.size
    estimate = estimate_decode_bytes(image, len(data)) + work_per_pixel(image) * width * height
    estimate += work_bytes(width, height) if work_bytes is not None else 0
    with _reservation(limits, estimate):
        yield image


def _reservation(limits: DecodeLimits, estimate: int) -> contextlib.AbstractContextManager[None]:
    return limits.budget.reserve(estimate) if limits.budget is not None else contextlib.nullcontext()


# An ICO frame decodes to RGBA (4 B), or P/L plus an RGBA mask; then the alpha composite (16 B): 24 B/pixel.
_ICO_BYTES_PER_PIXEL = 24
_ICO_MAX_FRAMES = 256
_BMP_INFO_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})  # BITMAPCOREHEADER ... BITMAPV5HEADER


def eager_frame_size(data: bytes) -> tuple[int, int] | None:
    """For a format Pillow decodes while opening (ICO): the largest frame's real (width, height), read from each
    frame's own header (the embedded PNG's IHDR or the BMP's info header), never from the icon directory, whose
    1-byte sizes say nothing about what a frame holds. None for any other format (Pillow reads their size from the
    header without decoding). ImageError ``decode_failed`` when the directory or a frame header is unreadable."""
    if not data.startswith(b"\x00\x00\x01\x00") or len(data) < 6:
        return None
    count = int.from_bytes(data[4:6], "little")
    if not 0 < count <= _ICO_MAX_FRAMES or len(data) < 6 + 16 * count:
        raise ImageError(DECODE_FAILED, f"ICO with {count} directory entries in {len(data)} bytes")
    largest = (0, 0)
    for index in range(count):
        entry = data[6 + 16 * index : 22 + 16 * index]
        offset = int.from_bytes(entry[12:16], "little")
        frame = data[offset : offset + 32]
        if frame.startswith(b"\x89PNG\r\n\x1a\n") and len(frame) >= 24 and frame[12:16] == b"IHDR":
            width, height = int.from_bytes(frame[16:20], "big"), int.from_bytes(frame[20:24], "big")
        elif len(frame) >= 12 and int.from_bytes(frame[0:4], "little") in _BMP_INFO_HEADER_SIZES:
            if int.from_bytes(frame[0:4], "little") == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
                width, height = int.from_bytes(frame[4:6], "little"), int.from_bytes(frame[6:8], "little") // 2
            else:
                width = abs(int.from_bytes(frame[4:8], "little", signed=True))
                height = abs(int.from_bytes(frame[8:12], "little", signed=True)) // 2
        else:
            raise ImageError(DECODE_FAILED, f"ICO frame {index}: no PNG or BMP header at offset {offset}")
        if width * height >= largest[0] * largest[1]:
            largest = (width, height)
    return largest


# Decoded by torchvision (libjpeg-turbo / libpng) in the tensor path; any other format or mode (CMYK, alpha,
# palettes, 16-bit, multi-picture JPEGs) goes through Pillow's conversions above, as in the Pillow path.
_TENSOR_DECODABLE = {"JPEG": frozenset({"RGB", "L"}), "PNG": frozenset({"RGB", "L"})}
TENSOR_WORK_BYTES_PER_PIXEL = 4
"""Reserved per input pixel on top of the decode estimate when torchvision decodes (its RGB output, an EXIF
rotation copy and the uint8 resize passes come to about 9 B/pixel against the estimate's 8 for an RGB JPEG).
Images Pillow decodes reserve nothing more: their conversion peak (the estimate) is over the RGB frame plus
its 3 B/pixel tensor copy that the tensor path keeps afterwards."""


@contextlib.contextmanager
def decoded_tensor(data: bytes, limits: DecodeLimits,
                   work_bytes: Callable[[int, int], int] | None = None) -> Iterator[torch.Tensor]:
    """:func:`decoded` for the tensor path: the same checks and budget first, then a uint8 ``[3, H, W]`` RGB
    tensor. Baseline JPEGs and plain RGB/grey PNGs are decoded by torchvision; anything else, and any failure
    there, is decoded by Pillow exactly as :func:`decoded` does, so the per-image errors are the same."""
    from ml.preprocess import decode_cpu

    def work(image: Image.Image) -> int:
        return TENSOR_WORK_BYTES_PER_PIXEL if _directly_decodable(image) else 0

    with _opened(data, limits, work, work_bytes) as image:
        pixels = None
        if _directly_decodable(image):
            try:
                pixels = decode_cpu(data)
            except Exception:  # noqa: BLE001 - Pillow below decodes it or names the error
                pixels = None
        if pixels is None or tuple(pixels.shape) != (3, *reversed(_oriented_size(image))):
            array = np.asarray(_load_rgb(image))
            pixels = torch.from_numpy(array if array.flags.writeable else array.copy()).permute(2, 0, 1)
        yield pixels


def _directly_decodable(image: Image.Image) -> bool:
    return image.mode in _TENSOR_DECODABLE.get(image.format or "", ()) and "transparency" not in image.info


def batched_jpeg_size(data: bytes, limits: DecodeLimits) -> tuple[int, int] | None:
    """The checks of :func:`decoded` for an image the batched device decoder may take (the same errors, from the
    header, before any pixel is decoded): its (width, height) after EXIF orientation when it is a baseline JPEG
    in RGB or grey, None for anything else (which the per-image path decodes). Reserves no decode budget: the
    host holds only the encoded bytes; device memory is bounded per decode call (``ml.preprocess``)."""
    from ml.preprocess import is_baseline_jpeg

    eager = eager_frame_size(data)
    if eager is not None:  # an icon: the per-image path decodes it, within the budget
        _check_shape(eager, limits)
        return None
    image = _open(data)
    _check_shape(image.size, limits)
    if image.format != "JPEG" or image.mode not in ("RGB", "L") or not is_baseline_jpeg(data):
        return None
    return _oriented_size(image)


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied (5-8 swap the sides)."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: Pillow's path keeps the stored orientation too
        orientation = 1
    width, height = image.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _check_shape(size: tuple[int, int], limits: DecodeLimits) -> None:
    width, height = size
    if width * height > limits.max_pixels:
        raise ImageError(
            TOO_MANY_PIXELS, f"{width}x{height} = {width * height} pixels > limit {limits.max_pixels}"
        )
    if min(width, height) < 1 or max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise ImageError(
            BAD_ASPECT_RATIO,
            f"{width}x{height}: aspect ratio over the limit {limits.max_aspect_ratio:g}:1 (CLS_MAX_ASPECT_RATIO)",
        )


@functools.cache
def _return_large_frames_to_the_os() -> None:
    """Pillow allocates frames in blocks of at most ``block_size``; blocks over glibc's largest mmap
    threshold (32 MB) are mmapped and go back to the OS when freed, instead of staying in a decode
    thread's malloc arena (which would let freed frames of several threads add up beyond the budget)."""
    Image.core.set_block_size(64 * 1024 * 1024)


def _open(data: bytes) -> Image.Image:
    _return_large_frames_to_the_os()
    if not data:
        raise ImageError(NOT_AN_IMAGE, "empty body")
    try:
        return Image.open(io.BytesIO(data), formats=_allowed_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(TOO_MANY_PIXELS, str(exc)) from exc
    except UnidentifiedImageError as exc:
        if _looks_like_image(data):
            raise ImageError(DECODE_FAILED, f"unreadable image data ({len(data)} bytes)") from exc
        raise ImageError(NOT_AN_IMAGE, f"not a supported image ({len(data)} bytes)") from exc
    except Exception as exc:  # corrupt headers surface as many exception types
        raise ImageError(DECODE_FAILED, f"bad image header: {type(exc).__name__}: {exc}") from exc


def _load_rgb(image: Image.Image) -> Image.Image:
    width, height = image.size
    try:
        image.seek(0)
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(TOO_MANY_PIXELS, str(exc)) from exc
    except Exception as exc:  # truncated or corrupt pixel data
        raise ImageError(
            DECODE_FAILED, f"{image.format} {width}x{height}: {type(exc).__name__}: {exc}"
        ) from exc

    try:
        ImageOps.exif_transpose(image, in_place=True)  # no copy unless the EXIF says to rotate
    except Exception:  # a broken EXIF block: keep the stored orientation rather than fail
        pass
    try:
        rgb = to_rgb(image)
    except Exception as exc:
        raise ImageError(DECODE_FAILED, f"cannot convert {image.mode} to RGB: {exc}") from exc
    if rgb is image and getattr(image, "is_animated", False):
        # detach the first frame from the multi-frame file object (``is_animated`` looks one frame ahead at most:
        # ``n_frames`` would walk every frame of a TIFF or GIF, a CPU cost that grows with the file)
        rgb = rgb.copy()
    return rgb


async def fetch_image(
    fetcher: Fetcher, url: str, limits: DecodeLimits, executor: Executor | None = None
) -> Image.Image:
    """Fetch ``url`` and decode it to RGB; decoding runs in ``executor`` (default: the loop's pool)."""
    data = await fetcher.fetch(url)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, decode_image, data, limits)
