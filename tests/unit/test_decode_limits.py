"""Image memory bounded by design: the aspect-ratio limit, the header estimate of a decode's peak
bytes (checked against measured peaks), the shared decode budget, and the bounded high-depth conversion."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from handlers.errors import BAD_ASPECT_RATIO, TOO_MANY_PIXELS, ImageError
from handlers.images import DecodeBudget, DecodeLimits, decode_image, decoded, estimate_decode_bytes
from testkit.configs import decode_limits
from testkit.images import huge_blank_png
from testkit.pictures import blank_png, float_tiff, gray16_png, many_frame_gif

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _code(data: bytes, limits: DecodeLimits) -> str:
    with pytest.raises(ImageError) as caught:
        decode_image(data, limits)
    return caught.value.code


# -- aspect ratio ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(4000, 1), (1, 100_000), (201, 10), (10, 201)])
def test_extreme_shapes_are_bad_aspect_ratio(width, height):
    assert _code(huge_blank_png(width, height), decode_limits()) == BAD_ASPECT_RATIO


@pytest.mark.parametrize(("width", "height"), [(200, 10), (10, 200), (970, 90), (64, 64)])
def test_shapes_within_the_limit_decode(width, height):
    assert decode_image(huge_blank_png(width, height), decode_limits()).size == (width, height)


def test_the_aspect_limit_is_a_setting():
    data = huge_blank_png(300, 100)
    assert _code(data, decode_limits(max_aspect_ratio=2.5)) == BAD_ASPECT_RATIO
    assert decode_image(data, decode_limits(max_aspect_ratio=3)).size == (300, 100)


def test_clip_preprocess_of_the_widest_allowed_image_stays_small():
    """The reason for the limit: a shortest-side resize to 224 makes at most 20 x 224 pixels on the long side."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    transform = image_transform_v2(PreprocessCfg(size=224), is_train=False)
    resize = transform.transforms[0]
    image = decode_image(huge_blank_png(2000, 100), decode_limits())
    assert resize(image).size == (4480, 224)
    assert tuple(transform(image).shape) == (3, 224, 224)


# -- the estimate ----------------------------------------------------------------------------------------


def test_an_image_whose_estimate_exceeds_the_budget_is_refused_before_decoding(monkeypatch):
    data = float_tiff(2000, 2000)  # 4 MP float: ~80 MB estimated
    loads: list[str] = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append("load"))
    with pytest.raises(ImageError) as caught:
        decode_image(data, decode_limits(budget=DecodeBudget(32 * 1024 * 1024)))
    assert caught.value.code == TOO_MANY_PIXELS and "decode budget of 32 MB" in caught.value.message
    assert loads == []  # refused from the header, no pixel decoded


def test_the_estimate_follows_mode_depth_and_format():
    def estimate(data: bytes) -> int:
        with Image.open(io.BytesIO(data)) as image:
            return estimate_decode_bytes(image)

    side = 1000
    one_bit, palette = estimate(huge_blank_png(side, side)), estimate(blank_png(side, side, 8, 3, bytes(768)))
    rgba, gray16 = estimate(blank_png(side, side, 8, 6)), estimate(gray16_png(side, side))
    float_tif = estimate(float_tiff(side, side))
    assert one_bit == palette  # both 1 byte per pixel as stored
    assert one_bit < gray16 < float_tif  # 1, 2, 4 bytes per pixel; TIFF decodes through a whole-frame buffer
    assert palette < estimate(blank_png(side, side, 8, 3, bytes(768), trns=b"\x00")) <= rgba  # transparency
    assert estimate(huge_blank_png(2 * side, side)) == 2 * one_bit - estimate(huge_blank_png(1, 1)) + 6  # linear


_MEASURE = r"""
import io, json, sys
from PIL import Image
from handlers.images import decoded, estimate_decode_bytes
from testkit.configs import decode_limits
data = sys.stdin.buffer.read()
with Image.open(io.BytesIO(data)) as header:
    estimate = estimate_decode_bytes(header, len(data))
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
before = status("VmRSS")
with decoded(data, decode_limits()) as image:
    image.resize((224, 224))
print(json.dumps({"estimate": estimate, "peak": status("VmHWM") - before}))
"""


def _rotated_jpeg(side: int) -> bytes:
    import skimage.data

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).resize((side, side)).save(buffer, "JPEG", exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["float_tiff", "gray16_png", "rgba_png", "palette_trns_png", "one_bit_png", "gif",
                                  "rotated_jpeg"])
def test_the_estimate_bounds_the_measured_peak(name):
    """Each decode in a fresh process: its peak RSS growth never exceeds the header estimate."""
    data = {
        "float_tiff": lambda: float_tiff(3000, 3000),
        "gray16_png": lambda: gray16_png(3000, 3000),
        "rgba_png": lambda: blank_png(3000, 3000, 8, 6),
        "palette_trns_png": lambda: blank_png(3000, 3000, 8, 3, bytes(range(256)) * 3, trns=b"\x00"),
        "one_bit_png": lambda: huge_blank_png(5000, 5000),
        "gif": lambda: many_frame_gif(2000, 2000, 50),
        "rotated_jpeg": lambda: _rotated_jpeg(3000),
    }[name]()
    done = subprocess.run([sys.executable, "-c", _MEASURE], input=data, capture_output=True, cwd=REPO_ROOT,
                          timeout=120, check=True)
    measured = json.loads(done.stdout)
    assert measured["peak"] > 8 * 1024 * 1024, measured  # the decode really happened and was measured
    assert measured["peak"] <= measured["estimate"], measured


# -- the shared budget -----------------------------------------------------------------------------------


def test_budget_never_exceeded_by_concurrent_reservations_and_large_ones_are_not_starved():
    budget = DecodeBudget(100)
    held = [0]
    most = [0]
    lock = threading.Lock()
    order: list[int] = []

    def work(size: int) -> None:
        with budget.reserve(size):
            with lock:
                held[0] += size
                most[0] = max(most[0], held[0])
                order.append(size)
            time.sleep(0.002)
            with lock:
                held[0] -= size

    sizes = [random.Random(i).randint(1, 60) for i in range(150)]
    sizes[20] = 100  # needs the whole budget: waits for the others, then runs before later arrivals
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, sizes))
    assert most[0] <= 100 and budget.peak <= 100 and budget.in_use == 0
    assert most[0] > 60  # reservations did overlap: the bound is what stopped them
    assert 100 in order and order.index(100) < 60


def test_budget_refuses_a_reservation_larger_than_itself():
    with pytest.raises(ImageError) as caught, DecodeBudget(10).reserve(11):
        pass
    assert caught.value.code == TOO_MANY_PIXELS


def test_concurrent_decodes_hold_at_most_the_budget():
    images = [float_tiff(1500, 1500), gray16_png(2000, 2000), blank_png(2000, 2000, 8, 6), huge_blank_png(3000, 3000)]
    estimates = []
    for data in images:
        with Image.open(io.BytesIO(data)) as header:
            estimates.append(estimate_decode_bytes(header, len(data)))
    budget = DecodeBudget(max(estimates) + min(estimates))  # room for the largest and the smallest at once
    limits = decode_limits(budget=budget)
    inside: list[int] = []

    def decode(data: bytes) -> tuple[int, int]:
        with decoded(data, limits) as image:
            inside.append(budget.in_use)
            assert budget.in_use <= budget.capacity
            return image.size

    with ThreadPoolExecutor(6) as pool:
        sizes = list(pool.map(decode, images * 4))
    assert len(sizes) == 16 and budget.in_use == 0
    assert budget.peak <= budget.capacity
    assert budget.peak > max(estimates)  # decodes did run side by side, within the budget


# -- high-depth conversion in bounded chunks -------------------------------------------------------------


def _reference(mode: str, values: np.ndarray) -> np.ndarray:
    """The previous whole-frame float64 conversion, as the reference."""
    if mode == "I;16":
        scaled = values.astype(np.float64) / 257.0
    elif mode == "I":
        values = np.clip(values, 0, 65535)
        scaled = values / 257.0 if values.max(initial=0) > 255 else values.astype(np.float64)
    else:
        finite = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scaled = finite * 255.0 if finite.max(initial=0.0) <= 1.0 else finite
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("case", ["float_unit", "float_large", "float_nan_inf", "int16", "int32_small", "int32_large"])
def test_high_depth_conversion_matches_the_whole_frame_reference(case):
    rng = np.random.default_rng(0)
    shape = (2100, 2300)  # several row chunks
    values = {
        "float_unit": lambda: rng.random(shape, dtype=np.float32),
        "float_large": lambda: (rng.random(shape, dtype=np.float32) * 300).astype(np.float32),
        "float_nan_inf": lambda: np.where(rng.random(shape) < 0.1, np.nan,
                                          np.where(rng.random(shape) < 0.1, np.inf, rng.random(shape))).astype(np.float32),
        "int16": lambda: rng.integers(0, 65536, shape, dtype=np.uint16),
        "int32_small": lambda: rng.integers(-5, 256, shape, dtype=np.int32),
        "int32_large": lambda: rng.integers(-100, 70000, shape, dtype=np.int32),
    }[case]()
    image = Image.fromarray(values)
    from handlers.images import to_rgb

    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (*shape, 3)
    expected = _reference(image.mode if not image.mode.startswith("I;16") else "I;16", values)
    difference = np.abs(rgb[..., 0].astype(np.int16) - expected)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3  # float32 work space: rounding ties only
    assert np.array_equal(rgb[..., 0], rgb[..., 2])


_MEASURE_SIGLIP = r"""
import json
import numpy as np
from PIL import Image
from ml.backbones import load_zero_shot_model
model = load_zero_shot_model("siglip", "cls-tiny-siglip", "random", device="cpu")
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (3000, 3000, 3), dtype=np.uint8))
model.preprocess(image.resize((300, 300)))  # first-call allocations (torch kernels) are not per pixel
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
model.preprocess(image)
print(json.dumps({"per_pixel": (status("VmHWM") - before) / 9e6, "declared": model.preprocess_bytes_per_pixel}))
"""


def test_siglip_preprocessing_is_counted_per_pixel_in_the_reservation():
    """SigLIP resizes a full-size tensor copy: what it declares covers what it allocates, and is reserved."""
    done = subprocess.run([sys.executable, "-c", _MEASURE_SIGLIP], capture_output=True, cwd=REPO_ROOT, timeout=300,
                          check=True)
    measured = json.loads(done.stdout.splitlines()[-1])
    assert 3 < measured["per_pixel"] <= measured["declared"], measured
    data = huge_blank_png(2000, 2000)
    with Image.open(io.BytesIO(data)) as header:
        alone = estimate_decode_bytes(header, len(data))
    budget = DecodeBudget(alone + 1_000_000)
    with decoded(data, decode_limits(budget=budget)):
        assert budget.in_use == alone
    with pytest.raises(ImageError) as caught, decoded(data, decode_limits(budget=budget), measured["declared"]):
        pass
    assert caught.value.code == TOO_MANY_PIXELS
