"""Hard image sets from pictures that packages ship, for judging learned features with real weights.

Digits are too easy for ImageNet features (every method scores ~1.0). These sets are not:

- ``photo_crops``: 10 classes, one per sample photo (scikit-image, scikit-learn); an item is a random crop of
  20-45% of the photo's short side, flipped and jittered in brightness and contrast. Crops of different photos
  look alike (sky, dark backgrounds, fur and plants), crops of one photo often do not.
- ``textures``: 10 classes of grey textures: six photos that are mostly texture (brick, grass, gravel, moon,
  cell, coins) and four generated ones (coarse and fine binary blobs, oriented sinusoid gratings, filtered
  noise), each crop tinted with a random colour so colour says nothing about the class.

Two labeled sets whose classes overlap (where the plain audit baseline flags many correct labels):

- ``photo_halves``: the left and the right half of five photos are two classes each; an item is a crop of
  25-60% of the short side whose centre lies in its half, so crops near the middle show both classes.
- ``texture_blends``: ten textures in five pairs (:data:`BLEND_PAIRS`); an item is a crop of its texture blended
  with a crop of its partner, its own weight uniform in [0.5, 1], then tinted: items near 0.5 sit on the boundary.

:func:`flipped` makes the label noise of the audit measurements and :func:`baseline_issues` the plain baseline.

:func:`labeled_set` draws ``per_class`` items per class (seeded). :func:`duplicate_set` cuts every source
into a grid of non-overlapping tiles (the distinct items: no two share a pixel, and tiles of one texture are
the look-alikes that must never be linked), skips near-uniform tiles, and makes one copy of each original
per kind in :data:`COPY_KINDS` (JPEG q40, half size, 2-px and 5% crops, +15% brightness, +20% contrast, a
10-px border, PNG). Pillow, numpy and the sample images only; no download.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

__all__ = ["COPY_KINDS", "HARD_SET_NAMES", "LABELED_SET_NAMES", "NOISE_RATE", "SET_NAMES", "CopyItem", "LabeledSet",
           "baseline_issues", "duplicate_set", "flipped", "labeled_set", "real_embeddings", "set_classes"]

SET_NAMES = ("photo_crops", "textures")  # labeled and duplicate sets
HARD_SET_NAMES = ("photo_halves", "texture_blends")  # labeled sets whose classes overlap
LABELED_SET_NAMES = SET_NAMES + HARD_SET_NAMES
ITEM_SIZE = 160
PHOTO_CLASSES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
                 "china.jpg", "flower.jpg", "camera")
TEXTURE_PHOTOS = ("brick", "grass", "gravel", "moon", "cell", "coins")
TEXTURE_GENERATED = ("blobs_coarse", "blobs_fine", "gratings", "filtered_noise")
HALVES_PHOTOS = ("astronaut", "coffee", "chelsea", "china.jpg", "flower.jpg")
# texture_blends: each class is blended with its partner (the other member of its pair)
BLEND_PAIRS = (("brick", "gravel"), ("grass", "filtered_noise"), ("blobs_coarse", "blobs_fine"), ("moon", "cell"),
               ("coins", "gratings"))
NOISE_RATE = 0.1  # labels flipped by :func:`flipped`
COPY_KINDS = ("jpeg_q40", "half_size", "crop_2px", "crop_5pct", "brightness_15", "contrast_20", "border_10px", "png")


@dataclass(frozen=True)
class LabeledSet:
    name: str
    classes: tuple[str, ...]
    images: list[Image.Image]
    labels: np.ndarray  # [N] class indices


@dataclass(frozen=True)
class CopyItem:
    id: str
    image: Image.Image  # decoded as a worker would see it
    data: bytes  # the uploaded file
    original: str  # the id of the original it copies (itself for an original)
    kind: str  # "original" or one of COPY_KINDS
    source: str  # the class/source picture it was cut from


def set_classes(name: str) -> tuple[str, ...]:
    if name == "photo_crops":
        return PHOTO_CLASSES
    if name == "textures":
        return TEXTURE_PHOTOS + TEXTURE_GENERATED
    if name == "photo_halves":
        return tuple(f"{photo}/{side}" for photo in HALVES_PHOTOS for side in ("left", "right"))
    if name == "texture_blends":
        return tuple(member for pair in BLEND_PAIRS for member in pair)
    raise ValueError(f"unknown set {name!r}; one of {LABELED_SET_NAMES}")


@functools.cache
def _source(name: str) -> np.ndarray:
    """One source picture as an RGB (photos) or grey (textures) uint8 array, at most 640 px a side."""
    if name.endswith(".jpg"):
        from sklearn.datasets import load_sample_image

        array = load_sample_image(name)
    elif name in TEXTURE_GENERATED:
        array = _generated(name)
    else:
        import skimage.data

        array = getattr(skimage.data, name)()
    array = np.asarray(array)
    if array.dtype != np.uint8:
        array = (255 * (array - array.min()) / max(1e-9, float(array.max() - array.min()))).astype(np.uint8)
    image = Image.fromarray(array)
    image.thumbnail((640, 640), Image.Resampling.LANCZOS)
    out = np.asarray(image)
    out.flags.writeable = False
    return out


def _generated(name: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    size = 512
    if name.startswith("blobs"):
        from skimage.data import binary_blobs

        fraction = 0.1 if name == "blobs_coarse" else 0.035
        blobs = binary_blobs(size, blob_size_fraction=fraction, volume_fraction=0.45, rng=3).astype(np.float32)
        return (blobs * 200 + 30 + rng.normal(0, 8, blobs.shape)).clip(0, 255)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    if name == "gratings":  # patches of gratings at random orientations and periods
        out = np.zeros((size, size), np.float32)
        cell = 64
        for r in range(0, size, cell):
            for c in range(0, size, cell):
                theta, period = rng.uniform(0, np.pi), rng.uniform(6, 18)
                yy, xx = y[r:r + cell, c:c + cell], x[r:r + cell, c:c + cell]
                out[r:r + cell, c:c + cell] = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period)
        from scipy.ndimage import gaussian_filter

        return gaussian_filter(out, 1.0) * 100 + 128
    if name == "filtered_noise":
        from scipy.ndimage import gaussian_filter

        noise = gaussian_filter(rng.normal(size=(size, size)), 3.0)
        return noise / noise.std() * 45 + 128
    raise ValueError(name)


def _as_rgb(array: np.ndarray, rng: np.random.Generator, tint: bool) -> Image.Image:
    image = Image.fromarray(array)
    if image.mode == "RGB":
        return image
    grey = image.convert("L")
    if not tint:
        return grey.convert("RGB")
    dark = tuple(int(v) for v in rng.integers(0, 90, 3))
    light = tuple(int(v) for v in rng.integers(165, 256, 3))
    return ImageOps.colorize(grey, black=dark, white=light)


def _random_crop(name: str, rng: np.random.Generator, tint: bool) -> Image.Image:
    array = _source(name)
    h, w = array.shape[:2]
    side = int(min(h, w) * rng.uniform(0.2, 0.45))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    image = _as_rgb(np.ascontiguousarray(array[top:top + side, left:left + side]), rng, tint)
    image = image.resize((ITEM_SIZE, ITEM_SIZE), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.8, 1.2)))
    image = ImageEnhance.Contrast(image).enhance(float(rng.uniform(0.8, 1.2)))
    return image


def _jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    image = image.resize((ITEM_SIZE, ITEM_SIZE), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.8, 1.2)))
    return ImageEnhance.Contrast(image).enhance(float(rng.uniform(0.8, 1.2)))


def _half_crop(photo: str, side: str, rng: np.random.Generator) -> Image.Image:
    """A crop of ``photo`` (25-60% of its short side) whose centre lies in its ``side`` half: crops near the
    middle show as much of the other half as of their own."""
    array = _source(photo)
    h, w = array.shape[:2]
    size = int(min(h, w) * rng.uniform(0.25, 0.6))
    lowest, highest = size // 2, w - size + size // 2  # the centre's range with the crop inside the photo
    middle = w // 2
    centre = int(rng.integers(lowest, middle)) if side == "left" else int(rng.integers(middle, highest + 1))
    left = min(max(0, centre - size // 2), w - size)
    top = int(rng.integers(0, h - size + 1))
    return _jitter(Image.fromarray(np.ascontiguousarray(array[top:top + size, left:left + size])), rng)


def _grey_crop(name: str, rng: np.random.Generator) -> np.ndarray:
    array = _source(name)
    h, w = array.shape[:2]
    side = int(min(h, w) * rng.uniform(0.2, 0.6))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    image = Image.fromarray(np.ascontiguousarray(array[top:top + side, left:left + side])).convert("L")
    return np.asarray(image.resize((ITEM_SIZE, ITEM_SIZE), Image.Resampling.BICUBIC), np.float32)


def _blend(texture: str, rng: np.random.Generator) -> Image.Image:
    """A crop of ``texture`` blended with a crop of its pair partner, its own weight uniform in [0.5, 1]: items
    near weight 0.5 sit on the boundary between the two classes. Tinted at random, like ``textures``."""
    partner = next(b if a == texture else a for a, b in BLEND_PAIRS if texture in (a, b))
    weight = float(rng.uniform(0.5, 1.0))
    mixed = weight * _grey_crop(texture, rng) + (1.0 - weight) * _grey_crop(partner, rng)
    image = _as_rgb(mixed.clip(0, 255).astype(np.uint8), rng, tint=True)
    return _jitter(image, rng)


def labeled_set(name: str, per_class: int, seed: int = 0) -> LabeledSet:
    """``per_class`` random items of each class of set ``name`` (seeded; new images on every call)."""
    classes = set_classes(name)
    rng = np.random.default_rng([seed, LABELED_SET_NAMES.index(name)])
    images: list[Image.Image] = []
    labels: list[int] = []
    for index, source in enumerate(classes):
        for _ in range(per_class):
            if name == "photo_halves":
                photo, side = source.rsplit("/", 1)
                images.append(_half_crop(photo, side, rng))
            elif name == "texture_blends":
                images.append(_blend(source, rng))
            else:
                images.append(_random_crop(source, rng, tint=name == "textures"))
            labels.append(index)
    return LabeledSet(name, classes, images, np.asarray(labels, np.int64))


def flipped(labels: np.ndarray, vectors: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """``labels`` with ``NOISE_RATE`` of them (seeded) changed: ``random`` to any other class, ``class_conditional``
    to the class whose mean vector is most similar to the true class's, ``clean``: none."""
    classes = int(labels.max()) + 1
    if kind == "clean":
        return labels.copy()
    rng = np.random.default_rng(seed)
    centres = np.stack([vectors[labels == c].mean(axis=0) for c in range(classes)])
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    similarity = centres @ centres.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = similarity.argmax(axis=1)
    noisy = labels.copy()
    for i in rng.choice(len(labels), int(NOISE_RATE * len(labels)), replace=False):
        noisy[i] = (labels[i] + rng.integers(1, classes)) % classes if kind == "random" else nearest[labels[i]]
    return noisy


def baseline_issues(vectors: np.ndarray, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """The plain audit baseline: 5-fold ``LogisticRegression()`` (scikit-learn defaults) out-of-sample
    probabilities on ``vectors`` and the confident-learning rule of ``ml.audit``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from ml.audit import confident_learning

    classes = int(labels.max()) + 1
    probabilities = np.zeros((len(labels), classes))
    for train, test in StratifiedKFold(5, shuffle=True, random_state=seed).split(vectors, labels):
        model = LogisticRegression().fit(vectors[train], labels[train])
        probabilities[np.ix_(test, model.classes_)] = model.predict_proba(vectors[test])
    return confident_learning(probabilities, labels).label_issue


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def copy_of(image: Image.Image, kind: str) -> bytes:
    """The uploaded bytes of one copy of ``image`` (RGB) of ``kind`` (one of :data:`COPY_KINDS`)."""
    w, h = image.size
    if kind == "jpeg_q40":
        return encode(image, "JPEG", quality=40)
    if kind == "half_size":
        return encode(image.resize((w // 2, h // 2), Image.Resampling.BILINEAR), "JPEG", quality=85)
    if kind == "crop_2px":
        return encode(image.crop((2, 2, w - 2, h - 2)), "JPEG", quality=85)
    if kind == "crop_5pct":
        dx, dy = round(w * 0.025), round(h * 0.025)
        return encode(image.crop((dx, dy, w - dx, h - dy)), "JPEG", quality=85)
    if kind == "brightness_15":
        return encode(ImageEnhance.Brightness(image).enhance(1.15), "JPEG", quality=85)
    if kind == "contrast_20":
        return encode(ImageEnhance.Contrast(image).enhance(1.2), "JPEG", quality=85)
    if kind == "border_10px":
        return encode(ImageOps.expand(image, border=10, fill=(255, 255, 255)), "JPEG", quality=85)
    if kind == "png":
        return encode(image, "PNG")
    raise ValueError(f"unknown copy kind {kind!r}")


def duplicate_set(name: str, tiles: int = 4, copies: tuple[str, ...] = COPY_KINDS,
                  max_originals: int | None = None, seed: int = 0) -> list[CopyItem]:
    """Originals (non-overlapping ``tiles x tiles`` grid cells of every source of set ``name``, near-uniform
    cells skipped) as JPEG q90 uploads, each followed by one copy per kind in ``copies``. With
    ``max_originals``, a seeded sample of the originals."""
    rng = np.random.default_rng([seed, 100 + SET_NAMES.index(name)])
    originals: list[tuple[str, str, Image.Image]] = []
    for source in set_classes(name):
        array = _source(source)
        h, w = array.shape[:2]
        side = min(h, w) // tiles
        for r in range(h // side):
            for c in range(w // side):
                cell = np.ascontiguousarray(array[r * side:(r + 1) * side, c * side:(c + 1) * side])
                if cell.std() < 12:  # near-uniform (sky, black background): copies of nothing in particular
                    continue
                image = _as_rgb(cell, rng, tint=name == "textures").resize((ITEM_SIZE, ITEM_SIZE), Image.Resampling.BICUBIC)
                originals.append((f"{name}/{source}/{r}-{c}", source, image))
    if max_originals is not None and len(originals) > max_originals:
        keep = np.sort(rng.choice(len(originals), max_originals, replace=False))
        originals = [originals[i] for i in keep]
    items: list[CopyItem] = []
    for item_id, source, image in originals:
        data = encode(image, "JPEG", quality=90)
        items.append(CopyItem(item_id, Image.open(io.BytesIO(data)).convert("RGB"), data, item_id, "original", source))
        for kind in copies:
            copied = copy_of(Image.open(io.BytesIO(data)).convert("RGB"), kind)
            items.append(CopyItem(f"{item_id}~{kind}", Image.open(io.BytesIO(copied)).convert("RGB"), copied, item_id,
                                  kind, source))
    return items


def real_embeddings(images: list[Image.Image], weights: str, batch_size: int = 64) -> np.ndarray:
    """``[N, D]`` L2-normalised float32 embeddings of ``images`` by the worker's timm embedder
    (``ml.timm_backbone``: ``tf_efficientnet_lite0``, its eval transform) with the safetensors file ``weights``."""
    import torch

    from ml.embedding import WeightsSource
    from ml.timm_backbone import load_timm_embedder

    model = load_timm_embedder("tf_efficientnet_lite0", WeightsSource.parse(weights), device=torch.device("cpu"))
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            out.append(model.embed_images(images[start:start + batch_size]).float().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 1280), np.float32)


def cluttered_digits(seed: int = 0, side: int = ITEM_SIZE) -> LabeledSet:
    """A hard set: scikit-learn's 1,797 handwritten digits (10 classes), each drawn in a random dark or light
    colour (against the background's brightness), rotated (+-15 degrees), scaled (70-95% of the side) and shifted onto a random crop of a sample photo or texture,
    blurred and faded towards grey (the backgrounds are shared by all classes). ImageNet features cluster these by background more than by digit, so
    a strategy that only follows the feature space's clusters picks backgrounds, not classes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng([seed, 200])
    backgrounds = PHOTO_CLASSES + TEXTURE_PHOTOS
    images: list[Image.Image] = []
    for pixels in digits.images:
        image = _random_crop(backgrounds[int(rng.integers(len(backgrounds)))], rng, tint=True).resize((side, side))
        image = Image.blend(image.filter(ImageFilter.GaussianBlur(4)), Image.new("RGB", image.size, (128, 128, 128)), 0.8)
        mask = Image.fromarray((pixels * 255 / 16).astype(np.uint8)).resize((64, 64), Image.Resampling.BICUBIC)
        size = int(side * rng.uniform(0.7, 0.95))
        mask = mask.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BICUBIC, expand=True).resize((size, size))
        dark = np.asarray(image.convert("L")).mean() > 128  # the ink contrasts with the background, in any hue
        colour = tuple(int(v) for v in (rng.integers(0, 70, 3) if dark else rng.integers(185, 256, 3)))
        ink = Image.new("RGB", (size, size), colour)
        image.paste(ink, (int(rng.integers(0, side - size + 1)), int(rng.integers(0, side - size + 1))), mask)
        images.append(image)
    return LabeledSet("cluttered_digits", tuple(str(d) for d in range(10)), images, digits.target.astype(np.int64))
