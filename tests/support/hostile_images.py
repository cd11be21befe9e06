"""Small files that decode to large or odd images: extreme shapes, float and 16-bit pixels,
palettes, many frames, large canvases. Each is a few KB on the wire."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from testkit.images import huge_blank_png


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def blank_png(width: int, height: int, bit_depth: int, colour_type: int, plte: bytes = b"", trns: bytes = b"") -> bytes:
    """A valid PNG of zero bytes (streamed through zlib row by row: no full frame in memory here)."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour_type]
    row = b"\x00" + b"\x00" * ((width * channels * bit_depth + 7) // 8)
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row * 256) for _ in range(height // 256)]
    parts += [compressor.compress(row * (height % 256)), compressor.flush()]
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    chunks = _chunk(b"IHDR", header)
    if plte:
        chunks += _chunk(b"PLTE", plte)
    if trns:
        chunks += _chunk(b"tRNS", trns)
    return b"\x89PNG\r\n\x1a\n" + chunks + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def float_tiff(width: int, height: int) -> bytes:
    """A 32-bit float ("F") TIFF, deflate-compressed, values in [0, 1] (one bright square)."""
    array = np.zeros((height, width), dtype=np.float32)
    array[: height // 4, : width // 4] = 0.75
    return _encode(Image.fromarray(array), "TIFF", compression="tiff_adobe_deflate")


def gray16_png(width: int, height: int) -> bytes:
    """A 16-bit greyscale PNG: a coarse gradient."""
    column = (np.arange(height, dtype=np.uint32) * 65535 // max(1, height - 1)).astype(np.uint16)
    return _encode(Image.fromarray(np.repeat(column[:, None], width, axis=1)), "PNG")


def many_frame_gif(width: int, height: int, frames: int) -> bytes:
    """An animated GIF with a large canvas and many small frames (only the first should ever be decoded)."""
    first = Image.new("P", (width, height), 0)
    first.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (253 * 3))
    rest = []
    for i in range(frames - 1):
        frame = first.copy()
        frame.paste(1 + i % 2, (i % 50, i % 50, i % 50 + 4, i % 50 + 4))
        rest.append(frame)
    return _encode(first, "GIF", save_all=True, append_images=rest, duration=10, loop=0, optimize=False)


def hostile_images() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, content type)."""
    palette = bytes(range(256)) * 3
    return {
        "wide_4000x1_png": (huge_blank_png(4000, 1), "image/png"),
        "tall_1x100000_png": (huge_blank_png(1, 100_000), "image/png"),
        "float_tiff_16mp": (float_tiff(4000, 4000), "image/tiff"),
        "float_tiff_40mp": (float_tiff(8000, 5000), "image/tiff"),  # the 40 MP float TIFF
        "gray16_png_16mp": (gray16_png(4000, 4000), "image/png"),
        "palette_png_25mp": (blank_png(5000, 5000, 8, 3, plte=palette, trns=b"\x00"), "image/png"),
        "gif_300_frames": (many_frame_gif(1000, 1000, 300), "image/gif"),
        "canvas_png_36mp": (huge_blank_png(6000, 6000), "image/png"),
        "rgba_png_36mp": (blank_png(6000, 6000, 8, 6), "image/png"),
    }
