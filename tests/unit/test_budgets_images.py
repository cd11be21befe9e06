"""The one image opener: every allowed format's real frame size is known before any pixel is decoded.

ICO is the format Pillow decodes while opening: its directory's sizes are one byte each and say nothing about
the frame it holds, so an icon that says 16x16 may embed a 10000x8000 PNG.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from handlers.errors import DECODE_FAILED, NOT_AN_IMAGE, TOO_MANY_PIXELS, ImageError
from handlers.images import DecodeBudget, DecodeLimits, batched_jpeg_size, decode_image, decoded_tensor, eager_frame_size
from testkit.configs import decode_limits
from testkit.images import ico_bmp_frame, ico_bomb, ico_with_frame, tiled_tiff

REPO_ROOT = Path(__file__).resolve().parents[2]


def _code(data: bytes, limits: DecodeLimits) -> str:
    with pytest.raises(ImageError) as caught:
        decode_image(data, limits)
    return caught.value.code


def test_the_real_frame_size_of_an_icon_comes_from_the_frame_header():
    assert eager_frame_size(ico_bomb(10_000, 8_000)) == (10_000, 8_000)
    assert eager_frame_size(ico_bmp_frame(3_000, 2_000)) == (3_000, 2_000)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, "PNG")
    assert eager_frame_size(buffer.getvalue()) is None  # every other format: Pillow's header size


_MEASURE = """
import json, sys
from handlers.errors import ImageError
from handlers.images import decode_image
from testkit.configs import decode_limits
from testkit.images import ico_bomb
data = ico_bomb(10_000, 8_000)
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
before = status("VmRSS")
try:
    decode_image(data, decode_limits())
    code = None
except ImageError as exc:
    code = exc.code
print(json.dumps({"code": code, "peak": status("VmHWM") - before, "bytes": len(data)}))
"""


def test_an_icon_bomb_is_refused_before_its_frame_is_decoded():
    """A few-KB ICO embedding an 80-megapixel PNG: too_many_pixels, and the process never grows by the frame."""
    done = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, cwd=REPO_ROOT, timeout=120,
                          check=True)
    measured = json.loads(done.stdout)
    assert measured["bytes"] < 200_000, measured
    assert measured["code"] == TOO_MANY_PIXELS, measured
    assert measured["peak"] < 20 * 1024 * 1024, measured  # the 80 MB frame was never decoded


def test_an_icon_frame_over_the_decode_budget_is_refused_by_the_budget():
    # 1500x1500 passes the pixel limit; its decode (24 B/pixel) does not fit a 16 MB budget
    limits = decode_limits(budget=DecodeBudget(16 * 1024 * 1024))
    assert _code(ico_bomb(1_500, 1_500), limits) == TOO_MANY_PIXELS
    assert _code(ico_bmp_frame(1_500, 1_500), limits) == TOO_MANY_PIXELS
    assert limits.budget.in_use == 0


def test_an_icon_waits_for_its_reservation():
    """With the whole budget held elsewhere, an icon's decode waits until the budget frees up (the peak-RSS test
    above shows that its frame is not decoded before the reservation either)."""
    budget = DecodeBudget(64 * 1024 * 1024)
    limits = decode_limits(budget=budget)
    data = ico_bomb(1_000, 1_000)
    decoded_at: list[int] = []
    with budget.reserve(budget.capacity):
        worker = threading.Thread(target=lambda: decoded_at.append(decode_image(data, limits).size[0]))
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive() and not decoded_at  # waiting for the budget, not decoding
    worker.join(timeout=30)
    assert decoded_at == [1_000]


def test_a_small_icon_still_decodes_on_every_path():
    buffer = io.BytesIO()
    Image.new("RGBA", (48, 48), (255, 0, 0, 128)).save(buffer, "ICO", sizes=[(48, 48), (16, 16)])
    data = buffer.getvalue()
    limits = decode_limits(budget=DecodeBudget(64 * 1024 * 1024))
    assert decode_image(data, limits).size == (48, 48)
    with decoded_tensor(data, limits) as pixels:
        assert tuple(pixels.shape) == (3, 48, 48)
    assert batched_jpeg_size(data, limits) is None
    assert limits.budget.in_use == 0


def test_the_batched_path_checks_an_icon_without_opening_it():
    with pytest.raises(ImageError) as caught:
        batched_jpeg_size(ico_bomb(10_000, 8_000), decode_limits())
    assert caught.value.code == TOO_MANY_PIXELS


def test_a_broken_icon_directory_is_decode_failed():
    assert _code(b"\x00\x00\x01\x00\x00\x00", decode_limits()) == DECODE_FAILED  # no entries
    assert _code(ico_with_frame(b"garbage" * 10), decode_limits()) == DECODE_FAILED


@pytest.mark.parametrize("fmt", ["ICNS", "TGA", "PCX", "SGI"])
def test_formats_outside_the_allowed_list_are_not_opened(fmt):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, fmt)
    assert _code(buffer.getvalue(), decode_limits()) in (NOT_AN_IMAGE, DECODE_FAILED)


def test_a_many_frame_tiff_costs_its_first_frame_only():
    """A TIFF of 300 frames: the first is decoded and detached; the frames are not walked one by one."""
    frames = [Image.new("L", (8, 8), value % 256) for value in range(300)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "TIFF", save_all=True, append_images=frames[1:])
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as probe:
        assert probe.is_animated
    image = decode_image(data, decode_limits())
    assert image.size == (8, 8) and image.getpixel((0, 0)) == (0, 0, 0)


def test_a_tiff_tile_larger_than_the_image_counts_in_the_decode():
    """A 16x16 TIFF with 16384x16384 tiles: libtiff allocates the whole 256 MB tile to decode it."""
    data = tiled_tiff(16, 16, 16_384, 16_384)
    with Image.open(io.BytesIO(data)) as probe:
        assert probe.size == (16, 16)
    assert _code(data, decode_limits()) == TOO_MANY_PIXELS  # 268 M tile pixels > CLS_MAX_IMAGE_PIXELS
    limits = decode_limits(budget=DecodeBudget(64 * 1024 * 1024))
    assert _code(tiled_tiff(16, 16, 4_096, 4_096), limits) == TOO_MANY_PIXELS  # 16 M pixels x 8 B > 64 MB
    assert limits.budget.in_use == 0
