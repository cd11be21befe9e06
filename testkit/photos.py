"""Real photos as encoded bytes, for the preprocessing parity tests and the device bench.

The photos are scikit-image's and scikit-learn's sample images (no download); :func:`photo_jpegs` re-encodes
them as baseline JPEGs, optionally as random 4:3 crops at a fixed size (the bench's 640x480 workload).
"""

from __future__ import annotations

import functools
import io
import random

import numpy as np
from PIL import Image, ImageEnhance

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "camera",
               "coins", "china.jpg", "flower.jpg")
"""scikit-image names and scikit-learn sample image file names: colour and grey photos, several shapes."""


def photos(names: tuple[str, ...] = PHOTO_NAMES) -> list[Image.Image]:
    """The named sample photos as RGB Pillow images (grey ones converted); new images on every call."""
    return [Image.fromarray(_photo_array(name)).convert("RGB") for name in names]


@functools.cache
def _photo_array(name: str) -> np.ndarray:
    """One sample photo's pixels, loaded once per process (loading them all takes about a second)."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    array = load_sample_image(name) if name.endswith(".jpg") else getattr(skimage.data, name)()
    array = np.asarray(array, dtype=np.uint8)
    array.flags.writeable = False
    return array


def encode_jpeg(image: Image.Image, quality: int = 90, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, **options)
    return buffer.getvalue()


def photo_jpegs(count: int | None = None, size: tuple[int, int] | None = None, seed: int = 0) -> list[bytes]:
    """``count`` JPEGs (default: one per photo, native size); with ``size``, random crops of that aspect ratio
    resized to it, with flips, brightness and quality varied (seeded)."""
    sources = photos()
    count = len(sources) if count is None else count
    rng = random.Random(seed)
    out = []
    for index in range(count):
        image = sources[index % len(sources)]
        if size is not None:
            width, height = image.size
            crop_w = min(width, height * size[0] / size[1]) * rng.uniform(0.6, 1.0)
            crop_h = crop_w * size[1] / size[0]
            left, top = rng.uniform(0, width - crop_w), rng.uniform(0, height - crop_h)
            image = image.crop((round(left), round(top), round(left + crop_w), round(top + crop_h)))
            image = image.resize(size, Image.Resampling.BICUBIC)
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
        out.append(encode_jpeg(image, quality=rng.randint(75, 95) if size is not None else 90))
    return out
