"""Decode fetched bytes into RGB Pillow images, safely, off the event loop.

``decode_image`` is synchronous (run it in a thread pool); ``fetch_image`` fetches and decodes one URL.
Failures raise ``ImageError`` with a stable code: ``not_an_image``, ``decode_failed``, ``too_many_pixels``
(plus the fetch codes from ``handlers.fetch``).
"""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from handlers.errors import DECODE_FAILED, NOT_AN_IMAGE, TOO_MANY_PIXELS, ImageError
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


@dataclass(frozen=True)
class DecodeLimits:
    """Limits for decoding one image (well below Pillow's own decompression-bomb threshold)."""

    max_pixels: int = 40_000_000


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
    """16/32-bit integer or float greyscale -> 8-bit RGB, scaling instead of clipping."""
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = values.astype(np.float64) / 257.0
    elif image.mode == "I":
        values = np.clip(values, 0, 65535)
        scaled = values / 257.0 if values.max(initial=0) > 255 else values.astype(np.float64)
    else:  # "F"
        finite = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = finite.max(initial=0.0)
        scaled = finite * 255.0 if top <= 1.0 else finite
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
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
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    return image.convert("RGB")


def decode_image(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Decode image bytes into a fully loaded RGB image (first frame; EXIF orientation applied).

    Synchronous and CPU-bound: call it from a thread pool. The pixel limit is checked from the
    header before any pixel is decoded.
    """
    if not data:
        raise ImageError(NOT_AN_IMAGE, "empty body")
    try:
        image = Image.open(io.BytesIO(data), formats=_allowed_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(TOO_MANY_PIXELS, str(exc)) from exc
    except UnidentifiedImageError as exc:
        if _looks_like_image(data):
            raise ImageError(DECODE_FAILED, f"unreadable image data ({len(data)} bytes)") from exc
        raise ImageError(NOT_AN_IMAGE, f"not a supported image ({len(data)} bytes)") from exc
    except Exception as exc:  # corrupt headers surface as many exception types
        raise ImageError(DECODE_FAILED, f"bad image header: {type(exc).__name__}: {exc}") from exc

    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageError(
            TOO_MANY_PIXELS, f"{width}x{height} = {width * height} pixels > limit {limits.max_pixels}"
        )
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
        oriented = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block: keep the stored orientation rather than fail
        oriented = image
    try:
        rgb = to_rgb(oriented if oriented is not None else image)
    except Exception as exc:
        raise ImageError(DECODE_FAILED, f"cannot convert {image.mode} to RGB: {exc}") from exc
    if rgb is image and getattr(image, "n_frames", 1) > 1:
        rgb = rgb.copy()  # detach the first frame from the multi-frame file object
    return rgb


async def fetch_image(
    fetcher: Fetcher, url: str, limits: DecodeLimits, executor: Executor | None = None
) -> Image.Image:
    """Fetch ``url`` and decode it to RGB; decoding runs in ``executor`` (default: the loop's pool)."""
    data = await fetcher.fetch(url)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, decode_image, data, limits)
