"""decode_image / fetch_image: every odd format to RGB, the pixel limit, corrupt data, off-loop decoding."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import skimage.data
from PIL import Image

import handlers.images as images
from handlers.errors import DECODE_FAILED, NOT_AN_IMAGE, TOO_MANY_PIXELS, ImageError
from handlers.fetch import Fetcher
from handlers.images import DecodeLimits, decode_image, fetch_image, to_rgb
from testkit.configs import decode_limits

LIMITS = decode_limits()
STATIC_GOOD = [
    "astronaut_jpg",
    "chelsea_png",
    "coffee_jpg",
    "camera_png",
    "china_jpg",
    "flower_jpg",
    "cmyk_jpg",
    "gray16_png",
    "palette_transparent_png",
    "rgba_png",
    "la_png",
    "animated_gif",
    "exif_rotated_jpg",
]


def _png(image: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def _decode_error(data: bytes, limits: DecodeLimits = LIMITS) -> str:
    with pytest.raises(ImageError) as caught:
        decode_image(data, limits)
    return caught.value.code


@pytest.mark.parametrize("name", STATIC_GOOD)
def test_decodes_to_loaded_rgb_of_expected_size(http_server, name):
    image = decode_image(http_server.body(name), LIMITS)
    assert image.mode == "RGB"
    assert image.size == http_server.expected_sizes[name]
    image.getpixel((0, 0))  # loaded: no lazy decoding left


def test_exif_orientation_swaps_width_and_height(http_server):
    stored = Image.open(io.BytesIO(http_server.body("exif_rotated_jpg")))
    assert stored.size == (600, 400)
    image = decode_image(http_server.body("exif_rotated_jpg"), LIMITS)
    assert image.size == (400, 600)
    # Orientation 6 = rotate 90 degrees clockwise: the stored top-left pixel ends up top-right.
    reference = np.asarray(Image.fromarray(skimage.data.coffee()).rotate(-90, expand=True), dtype=float)
    assert np.abs(np.asarray(image, dtype=float) - reference).mean() < 8


@pytest.mark.parametrize(
    ("name", "corner"),
    [("rgba_png", (10, 10)), ("la_png", (10, 10)), ("palette_transparent_png", (10, 10))],
)
def test_transparency_is_composited_on_white(http_server, name, corner):
    image = decode_image(http_server.body(name), LIMITS)
    assert image.getpixel(corner) == (255, 255, 255)
    assert image.getpixel((image.width - 1, image.height - 1)) != (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped(http_server):
    image = decode_image(http_server.body("gray16_png"), LIMITS)
    camera = skimage.data.camera().astype(float)
    red, green, blue = (np.asarray(image.getchannel(band), dtype=float) for band in "RGB")
    assert np.array_equal(red, green) and np.array_equal(green, blue)
    assert np.abs(red - camera).max() <= 1


def test_cmyk_jpeg_comes_back_as_plausible_rgb(http_server):
    image = decode_image(http_server.body("cmyk_jpg"), LIMITS)
    coffee = skimage.data.coffee().astype(float)
    assert np.abs(np.asarray(image, dtype=float) - coffee).mean() < 20


def test_animated_gif_gives_its_first_frame(http_server):
    image = decode_image(http_server.body("animated_gif"), LIMITS)
    red, green, blue = image.getpixel((32, 24))
    assert red > 200 and green < 50 and blue < 50


@pytest.mark.parametrize(
    ("mode", "array", "expected"),
    [
        ("1", None, (255, 255, 255)),
        ("L", np.full((4, 4), 128, np.uint8), (128, 128, 128)),
        ("I", np.full((4, 4), 65535, np.int32), (255, 255, 255)),
        ("I", np.full((4, 4), 100, np.int32), (100, 100, 100)),
        ("F", np.full((4, 4), 0.5, np.float32), (128, 128, 128)),
    ],
)
def test_other_modes_convert_to_rgb(mode, array, expected):
    image = Image.new("1", (4, 4), 1) if array is None else Image.fromarray(array)
    assert image.mode == mode
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == expected


def test_one_bit_png_decodes():
    image = decode_image(_png(Image.new("1", (10, 7), 1)), LIMITS)
    assert image.mode == "RGB" and image.size == (10, 7)


@pytest.mark.parametrize("name", ["bomb_png", "large_pixels_png"])
def test_decompression_bombs_are_refused_before_decoding(http_server, name):
    assert _decode_error(http_server.body(name)) == TOO_MANY_PIXELS


def test_pixel_limit_is_configurable(http_server):
    assert _decode_error(http_server.body("astronaut_jpg"), decode_limits(max_pixels=512 * 511)) == (
        TOO_MANY_PIXELS
    )
    assert decode_image(http_server.body("astronaut_jpg"), decode_limits(max_pixels=512 * 512))


def test_truncated_jpeg_is_decode_failed(http_server):
    assert _decode_error(http_server.body("truncated_jpg")) == DECODE_FAILED


def test_corrupt_png_is_decode_failed(http_server):
    data = bytearray(http_server.body("chelsea_png"))
    data[200:400] = b"\x00" * 200  # inside the image data: CRC and zlib errors
    assert _decode_error(bytes(data)) == DECODE_FAILED


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 10,  # PNG signature, no valid header
        b"\xff\xd8\xff\xe0" + b"\x00" * 4,  # JPEG SOI, nothing else
    ],
)
def test_image_signature_with_garbage_is_decode_failed(data):
    assert _decode_error(data) == DECODE_FAILED


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"<html><body>hello</body></html>",
        b'{"error": "not found"}',
        bytes(range(256)) * 4,
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",  # EPS is not accepted from outside
    ],
)
def test_non_images_are_not_an_image(data):
    assert _decode_error(data) == NOT_AN_IMAGE


async def test_fetch_image_decodes_off_the_event_loop(http_server, monkeypatch):
    loop_thread = threading.get_ident()
    decode_threads: list[int] = []
    original = images.decode_image

    def recording_decode(data: bytes, limits: DecodeLimits) -> Image.Image:
        decode_threads.append(threading.get_ident())
        return original(data, limits)

    monkeypatch.setattr(images, "decode_image", recording_decode)
    async with Fetcher(http_server.fetch_limits()) as fetcher:
        image = await fetch_image(fetcher, http_server.urls["astronaut_jpg"], LIMITS)
        with ThreadPoolExecutor(1, thread_name_prefix="decode-test") as executor:
            named = await fetch_image(fetcher, http_server.urls["exif_rotated_jpg"], LIMITS, executor)
    assert image.size == (512, 512) and named.size == (400, 600)
    assert len(decode_threads) == 2 and loop_thread not in decode_threads


async def test_fetch_image_errors_come_from_decode_in_the_pool(http_server):
    async with Fetcher(http_server.fetch_limits()) as fetcher:
        with pytest.raises(ImageError) as caught:
            await fetch_image(fetcher, http_server.urls["truncated_jpg"], LIMITS)
    assert caught.value.code == DECODE_FAILED
