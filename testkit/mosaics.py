"""Multi-label images with known truth: 2x2 mosaics of scikit-learn's 8x8 digits, tagged with the target digits
they contain.

Each mosaic holds four digit images drawn at random (a digit may repeat); its tags are the TARGET digits present
(``tags``: by default zero, one, two, three), so some mosaics carry several tags, some one repeated twice, and
some none (only non-target digits). The digit images of a mosaic come from one pool (train, val or test) so no
digit image is shared across splits.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image

from testkit.images import DIGIT_CLASS_NAMES

MOSAIC_TAGS = ["zero", "one", "two", "three"]
MOSAIC_IMAGE_SIZE = 32


def write_mosaics(directory: Path, count: int, *, seed: int = 0, size: int = MOSAIC_IMAGE_SIZE,
                  tags: list[str] | None = None, pool: str = "all", tile_count: int = 4,
                  p_target: float = 0.25) -> list[tuple[str, list[str]]]:
    """Write ``count`` mosaics as PNG files; ``[(path, [tag names present, in tag order])]``.

    ``pool`` (``train`` | ``val`` | ``test`` | ``all``) picks which digit images are used (digit images are cut
    60/20/20 by index). Each tile is a target digit with probability ``p_target`` (then uniformly one of
    ``tags``), else one of the other digits: mosaics with no tag, one, a repeated one and several all occur.
    ``tile_count`` 4 (2x2) or 9 (3x3). When ``tags`` name all ten digits, a non-target tile stays blank (a set with
    many negatives per image: few tags of ten).
    """
    from sklearn.datasets import load_digits

    tags = list(tags or MOSAIC_TAGS)
    digits = load_digits()
    n = len(digits.target)
    cut = {"train": (0, int(0.6 * n)), "val": (int(0.6 * n), int(0.8 * n)), "test": (int(0.8 * n), n), "all": (0, n)}[pool]
    by_digit: dict[int, list[int]] = {d: [] for d in range(10)}
    for index in range(*cut):
        by_digit[int(digits.target[index])].append(index)
    target_digits = [DIGIT_CLASS_NAMES.index(t) for t in tags]
    other_digits = [d for d in range(10) if d not in target_digits]
    side = int(round(tile_count ** 0.5))
    rng = random.Random(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out: list[tuple[str, list[str]]] = []
    for number in range(count):
        canvas = np.zeros((8 * side, 8 * side), dtype=np.float32)
        present: set[int] = set()
        for tile in range(side * side):
            digit = rng.choice(target_digits) if rng.random() < p_target else (
                rng.choice(other_digits) if other_digits else None)
            if digit is None:
                continue
            if digit in target_digits:
                present.add(digit)
            pixels = digits.images[rng.choice(by_digit[digit])]
            row, col = divmod(tile, side)
            canvas[row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] = pixels
        gray = (canvas * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.BILINEAR)
        path = directory / f"{pool}-{seed}-{number:05d}.png"
        image.save(path)
        out.append((str(path), [t for t in tags if DIGIT_CLASS_NAMES.index(t) in present]))
    return out
