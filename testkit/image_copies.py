"""Injected copies of an image, the kinds near-duplicate detection must find: re-encoded at JPEG quality 10,
resized to half, 5% cropped, converted to PNG. Used by the duplicate-quality test set
(testkit/duplicate_set.py) and by the demo (examples/demo.py); pillow only."""

from __future__ import annotations

import io

from PIL import Image

__all__ = ["COPY_KINDS", "encode", "image_copies"]

COPY_KINDS = ("jpeg_q10", "half_size", "crop_5pct", "png")
"""The kinds of copy :func:`image_copies` makes, in this order."""


def encode(image: Image.Image, fmt: str, **kw: object) -> bytes:
    """The file bytes of ``image`` saved as ``fmt`` (a PIL format name: "JPEG", "PNG")."""
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def image_copies(image: Image.Image) -> dict[str, bytes]:
    """One encoded copy of ``image`` per kind in :data:`COPY_KINDS` (kind -> file bytes).

    The PNG copy keeps the image's mode; a PNG original re-saved as PNG is therefore byte-identical to an
    original that was encoded the same way (an exact duplicate by content hash), a JPEG original is not.
    """
    rgb = image.convert("RGB")
    w, h = rgb.size
    dx, dy = max(1, round(w * 0.05 / 2)), max(1, round(h * 0.05 / 2))  # 5% of each side, half at each edge
    return {
        "jpeg_q10": encode(rgb, "JPEG", quality=10),
        "half_size": encode(rgb.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BILINEAR), "JPEG", quality=85),
        "crop_5pct": encode(rgb.crop((dx, dy, w - dx, h - dy)), "JPEG", quality=85),
        "png": encode(image, "PNG"),
    }
