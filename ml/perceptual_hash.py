"""A 64-bit DCT perceptual hash of an image, and Hamming distances between such hashes.

``perceptual_hash``: the image in grey, a uniform border trimmed (when the four corners agree, the rows and
columns at the edges within ``BORDER_TOLERANCE`` grey levels of the corner pixel, when what remains is at least a quarter of the image),
resized to 32 x 32 (Lanczos), its 2-D DCT-II, the 8 x 8 lowest frequencies, one bit per coefficient above
their median (the ``phash`` of the imagehash library and of cleanvision, plus the trim, which makes a copy
with a frame added hash like its original). Robust to what a re-upload does to an image (re-encoding, resizing, brightness and contrast
changes, format changes) and blind to what an embedding sees (a different picture with the same content);
a small crop or a border shifts it. Pillow, numpy and SciPy only.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["HASH_BITS", "hamming_distances", "perceptual_hash", "perceptual_hashes"]

HASH_BITS = 64
_SIDE = 32
BORDER_TOLERANCE = 16
_LOW = 8
_WEIGHTS = (np.uint64(1) << np.arange(HASH_BITS, dtype=np.uint64)).reshape(_LOW, _LOW)


def perceptual_hash(image: Image.Image) -> int:
    """The image's 64-bit DCT hash as an unsigned integer (bit ``8 r + c``: coefficient ``(r, c)`` > median)."""
    from scipy.fft import dctn

    grey = _trim_border(image.convert("L")).resize((_SIDE, _SIDE), Image.Resampling.LANCZOS)
    low = dctn(np.asarray(grey, dtype=np.float64), type=2, norm="ortho")[:_LOW, :_LOW]
    bits = low > np.median(low)
    return int(np.bitwise_or.reduce(np.where(bits, _WEIGHTS, np.uint64(0)).ravel()))


def _trim_border(grey: Image.Image) -> Image.Image:
    array = np.asarray(grey, dtype=np.int16)
    corners = array[[0, 0, -1, -1], [0, -1, 0, -1]]
    if corners.max() - corners.min() > BORDER_TOLERANCE // 2:  # a frame has one colour in all four corners
        return grey
    content = np.abs(array - array[0, 0]) > BORDER_TOLERANCE
    rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
    if not len(rows):
        return grey
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    if (bottom - top) * (right - left) * 4 < array.size or (bottom - top, right - left) == array.shape:
        return grey
    return grey.crop((int(left), int(top), int(right), int(bottom)))


def perceptual_hashes(images: list[Image.Image]) -> np.ndarray:
    """``[N]`` uint64 hashes of ``images``."""
    return np.fromiter((perceptual_hash(image) for image in images), dtype=np.uint64, count=len(images))


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit differences between uint64 hashes ``a`` and ``b`` (broadcast), as int64 in [0, 64]."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    as_bytes = np.ascontiguousarray(x).view(np.uint8).reshape(*x.shape, 8)
    return _POPCOUNT8[as_bytes].sum(axis=-1, dtype=np.int64)
