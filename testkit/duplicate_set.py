"""A duplicate-detection set from images that packages ship: photos (scikit-learn, scikit-image) and digits
(scikit-learn), each original with injected copies (testkit.image_copies: JPEG quality 10, resized to half,
5% cropped, PNG), and look-alike non-copies (different digits of the same class). For the quality test and
the threshold choice."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from testkit.image_copies import COPY_KINDS, encode, image_copies

PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "camera", "rocket", "immunohistochemistry", "hubble_deep_field",
               "coins", "moon", "page", "text", "brick", "grass", "gravel", "clock", "cell", "retina")
DIGIT_SIZE = 128
PHOTO_MAX_SIDE = 400


@dataclass(frozen=True)
class Item:
    id: str
    image: Image.Image
    data: bytes  # the encoded file, as it would be uploaded (its hash is the content hash)
    original: str  # the id of the original this is a copy of (itself for an original)


def _copies(name: str, image: Image.Image, data: bytes) -> list[Item]:
    variants = image_copies(image)
    items = [Item(name, Image.open(io.BytesIO(data)).convert("RGB"), data, name)]
    for kind in COPY_KINDS:
        items.append(Item(f"{name}~{kind}", Image.open(io.BytesIO(variants[kind])).convert("RGB"), variants[kind], name))
    return items


def photos() -> list[tuple[str, Image.Image]]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    out = [(f"sample-{i}", Image.fromarray(a)) for i, a in enumerate(load_sample_images().images)]
    for name in PHOTO_NAMES:
        array = getattr(data, name)()
        if array.dtype != np.uint8:
            array = (255 * (array - array.min()) / max(1e-9, float(array.max() - array.min()))).astype(np.uint8)
        out.append((name, Image.fromarray(array).convert("RGB")))
    for _, image in out:
        image.thumbnail((PHOTO_MAX_SIDE, PHOTO_MAX_SIDE), Image.Resampling.LANCZOS)  # keeps the set fast to embed
    return out


def digits(per_class: int, offset: int = 0) -> list[tuple[str, int, Image.Image]]:
    """``per_class`` digits of each class (the first ones after ``offset`` per class), upscaled to 64 px."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    out = []
    for label in range(10):
        where = np.flatnonzero(bunch.target == label)[offset:offset + per_class]
        for index in where:
            gray = (bunch.images[index] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            image = Image.fromarray(gray, mode="L").resize((DIGIT_SIZE, DIGIT_SIZE), Image.Resampling.BILINEAR)
            out.append((f"digit{label}-{index}", label, image.convert("RGB")))
    return out


def duplicate_set(digits_with_copies: int = 2, look_alikes: int = 3) -> list[Item]:
    """Originals with their 4 copies each; plus ``look_alikes`` more digits per class, no copies."""
    items: list[Item] = []
    for name, image in photos():
        items += _copies(name, image, encode(image.convert("RGB"), "JPEG", quality=90))
    for name, _, image in digits(digits_with_copies):
        items += _copies(name, image, encode(image, "PNG"))
    for name, _, image in digits(look_alikes, offset=digits_with_copies):
        data = encode(image, "PNG")
        items.append(Item(name, image, data, name))
    return items


def similarity_margin(items: list[Item], vectors: np.ndarray) -> tuple[float, float, tuple[str, str], tuple[str, str]]:
    """(lowest copy similarity, highest non-copy similarity, and the pairs that reach them)."""
    sims = vectors @ vectors.T
    same = np.array([[a.original == b.original for b in items] for a in items])
    upper = np.triu(np.ones_like(same), 1).astype(bool)
    copy_sims = np.where(same & upper, sims, np.inf)
    other_sims = np.where(~same & upper, sims, -np.inf)
    low = np.unravel_index(np.argmin(copy_sims), sims.shape)
    high = np.unravel_index(np.argmax(other_sims), sims.shape)
    return (float(copy_sims[low]), float(other_sims[high]), (items[low[0]].id, items[low[1]].id),
            (items[high[0]].id, items[high[1]].id))
