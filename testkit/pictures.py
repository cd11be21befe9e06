"""Pictures for the demo, the benchmarks and the tests (the servers that serve them: ``testkit.image_server``).

Pictures:
- ``sample_photos()``: ten real photos (scikit-image, scikit-learn) as JPEG/PNG bytes, by file name;
- ``varied_jpegs(count, directory)``: N varied JPEGs of 640x480 cut from those photos (the benchmarks' set);
- ``write_digits_dataset(directory)``, ``digits_splits(samples)``, ``DIGIT_CLASS_NAMES``: scikit-learn's
  digits as PNG files under ``<class>/<file>`` (training data with real labels);
- ``reference_samples()``, ``GOOD_SIZES``, ``EXPECTED_ERRORS``, ``huge_blank_png``: good and broken images
  with known outcomes (the fetch/decode tests);
- ``hostile_images()``, ``blank_png``, ``float_tiff``, ``gray16_png``, ``many_frame_gif``: small files that decode
  to large or odd images (extreme shapes, float and 16-bit pixels, palettes, many frames, large canvases), a few
  KB each on the wire.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from handlers.errors import (
    BLOCKED_URL,
    DECODE_FAILED,
    FETCH_FAILED,
    HTTP_STATUS,
    NOT_AN_IMAGE,
    TIMEOUT,
    TOO_LARGE,
    TOO_MANY_PIXELS,
)

VARIED_SIZE = (640, 480)
DIGIT_CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGITS_IMAGE_SIZE = 32


# -- sample photos -------------------------------------------------------------------------------


def sample_photos() -> dict[str, bytes]:
    """Ten real photos from scikit-image and scikit-learn, encoded as their file names say."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    arrays = {
        "astronaut.jpg": data.astronaut(), "chelsea-the-cat.jpg": data.chelsea(), "coffee.jpg": data.coffee(),
        "camera-man.png": data.camera(), "rocket.jpg": data.rocket(), "china.jpg": load_sample_image("china.jpg"),
        "flower.jpg": load_sample_image("flower.jpg"), "hubble.jpg": data.hubble_deep_field(),
        "immunohistochemistry.jpg": data.immunohistochemistry(), "cat-detail.png": data.chelsea()[50:250, 100:350],
    }
    out = {}
    for name, array in arrays.items():
        image = Image.fromarray(np.asarray(array))
        buffer = io.BytesIO()
        image.save(buffer, "PNG" if name.endswith(".png") else "JPEG", quality=90)
        out[name] = buffer.getvalue()
    return out


def content_type(name: str) -> str:
    """The Content-Type for a file name's suffix (JPEG unless it says otherwise)."""
    suffix = name.rsplit(".", 1)[-1].lower()
    return {"png": "image/png", "gif": "image/gif", "webp": "image/webp"}.get(suffix, "image/jpeg")


def _source_images() -> list[Image.Image]:
    import skimage.data
    import sklearn.datasets

    sources = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
                 "colorwheel", "logo", "camera", "coins", "moon", "page", "text", "clock", "grass", "gravel", "brick"):
        array = getattr(skimage.data, name)()
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        image = Image.fromarray(array)
        if image.mode == "RGBA":
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image).convert("RGB")
        sources.append(image)
    for array in sklearn.datasets.load_sample_images().images:  # china.jpg, flower.jpg
        sources.append(Image.fromarray(array))
    return sources


def varied_jpegs(count: int, directory: Path, seed: int = 0, size: tuple[int, int] = VARIED_SIZE) -> list[Path]:
    """``count`` varied JPEGs (``size``, 640x480 by default) written to ``directory/<nnnnn>.jpg``: random 4:3
    crops of the sample photos, flips, brightness and colour, JPEG quality 75-95 (~48 KB each)."""
    from PIL import ImageEnhance

    rng = random.Random(seed)
    sources = _source_images()
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    width, height = size
    for i in range(count):
        src = sources[i % len(sources)]
        w, h = src.size
        cw = min(w, h * width / height)
        scale = rng.uniform(0.55, 1.0)
        cw, ch = cw * scale, cw * scale * height / width
        x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        image = src.crop((round(x0), round(y0), round(x0 + cw), round(y0 + ch))).resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
        if image.mode == "RGB":
            image = ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.3))
        path = directory / f"{i:05d}.jpg"
        image.save(path, "JPEG", quality=rng.randint(75, 95))
        paths.append(path)
    return paths


# -- digits --------------------------------------------------------------------------------------


def write_digits_dataset(directory: Path, size: int = DIGITS_IMAGE_SIZE,
                         limit: int | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """Write scikit-learn's 8x8 digits (1,797 images) upscaled to ``size`` as PNG files ``<dir>/<class>/<n>.png``.

    Returns ``(samples, class_names)`` with samples ``(path, class index)`` in dataset order; the parent folder
    of each file is its class name (so folder-labeled URLs work too). ``limit`` keeps the first N images.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images if limit is None else digits.images[:limit]
    targets = digits.target if limit is None else digits.target[:limit]
    directory = Path(directory)
    for name in DIGIT_CLASS_NAMES:
        (directory / name).mkdir(parents=True, exist_ok=True)
    samples: list[tuple[str, int]] = []
    for index, (pixels, label) in enumerate(zip(images, targets)):
        gray = (np.asarray(pixels, dtype=np.float32) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.BILINEAR)
        path = directory / DIGIT_CLASS_NAMES[int(label)] / f"{index:04d}.png"
        image.save(path)
        samples.append((str(path), int(label)))
    return samples, list(DIGIT_CLASS_NAMES)


def digits_splits(samples: list[tuple[str, int]], seed: int = 0) -> tuple[list, list, list]:
    """(train, val, test): 10% held back for tests, then 20% of the rest for validation; stratified."""
    from ml.training import stratified_split

    rest, test = stratified_split(samples, 0.1, seed)
    train, val = stratified_split(rest, 0.2, seed)
    return train, val, test


# -- reference samples: good and broken images with known outcomes ------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def blank_png(width: int, height: int, bit_depth: int, colour_type: int, plte: bytes = b"", trns: bytes = b"") -> bytes:
    """A valid PNG of zero bytes (streamed through zlib row by row: no full frame in memory here)."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour_type]
    row = b"\x00" + b"\x00" * ((width * channels * bit_depth + 7) // 8)
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row * 256) for _ in range(height // 256)]
    parts += [compressor.compress(row * (height % 256)), compressor.flush()]
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", header)
    if plte:
        chunks += _png_chunk(b"PLTE", plte)
    if trns:
        chunks += _png_chunk(b"tRNS", trns)
    return b"\x89PNG\r\n\x1a\n" + chunks + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b"")


def huge_blank_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of width x height, all black: tiny on the wire, huge when decoded."""
    return blank_png(width, height, 1, 0)


def ico_with_frame(frame: bytes, directory_size: int = 16) -> bytes:
    """An ICO whose one directory entry says ``directory_size`` square and holds ``frame`` (PNG or BMP bytes)."""
    side = directory_size % 256
    entry = struct.pack("<BBBBHHII", side, side, 0, 0, 1, 32, len(frame), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + frame


def ico_bomb(width: int, height: int) -> bytes:
    """An ICO whose directory says 16x16 and that embeds a blank ``width x height`` PNG: a few KB on the wire;
    Pillow decodes the embedded frame while opening the file."""
    return ico_with_frame(huge_blank_png(width, height))


def ico_bmp_frame(width: int, height: int) -> bytes:
    """An ICO whose BMP frame's info header claims ``width x height`` (pixel data truncated)."""
    header = struct.pack("<IiiHHIIiiII", 40, width, 2 * height, 1, 32, 0, 0, 0, 0, 0, 0)
    return ico_with_frame(header + b"\x00" * 64)

def tiled_tiff(width: int, height: int, tile_width: int, tile_length: int) -> bytes:
    """A deflate-compressed 8-bit grey TIFF of ``width x height`` whose tiles are ``tile_width x tile_length`` (64
    bytes of tile data): libtiff allocates a whole tile to decode it, however small the image."""
    tags = [(256, 3, width), (257, 3, height), (258, 3, 8), (259, 3, 8), (262, 3, 1), (277, 3, 1),
            (322, 4, tile_width), (323, 4, tile_length), (324, 4, 0), (325, 4, 64)]
    data_offset = 8 + 2 + 12 * len(tags) + 4
    ifd = struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        value = data_offset if tag == 324 else value
        ifd += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\x00" * 64

def reference_samples() -> dict[str, tuple[bytes, str]]:
    """Route name -> (bytes, content type): real photos in many formats and modes, and broken or hostile
    files; what each decodes to is in ``GOOD_SIZES`` and ``EXPECTED_ERRORS``."""
    import skimage.data
    import sklearn.datasets

    astronaut = Image.fromarray(skimage.data.astronaut())  # 512x512 RGB
    chelsea = Image.fromarray(skimage.data.chelsea())  # 451x300 RGB
    coffee = Image.fromarray(skimage.data.coffee())  # 600x400 RGB
    camera = skimage.data.camera()  # 512x512 uint8 grey
    sklearn_images = Path(sklearn.datasets.__file__).parent / "images"

    rgba = chelsea.convert("RGBA")
    alpha = np.full((chelsea.height, chelsea.width), 255, dtype=np.uint8)
    alpha[:50, :50] = 0  # fully transparent top-left corner -> white after decode
    rgba.putalpha(Image.fromarray(alpha))

    la = Image.fromarray(camera).convert("LA")
    la_alpha = np.full(camera.shape, 255, dtype=np.uint8)
    la_alpha[:40, :40] = 0
    la.putalpha(Image.fromarray(la_alpha))

    palette = chelsea.quantize(colors=63)  # indices 0..62; index 63 reserved for "transparent"
    colours = palette.getpalette()[: 63 * 3] + [0, 255, 0]
    palette.putpalette(colours)
    palette.paste(63, (0, 0, 60, 60))

    frames = [Image.new("RGB", (64, 48), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    astronaut_jpg = _encode(astronaut, "JPEG", quality=85)

    return {
        "astronaut_jpg": (astronaut_jpg, "image/jpeg"),
        "chelsea_png": (_encode(chelsea, "PNG"), "image/png"),
        "coffee_jpg": (_encode(coffee, "JPEG", quality=85), "image/jpeg"),
        "camera_png": (_encode(Image.fromarray(camera), "PNG"), "image/png"),
        "china_jpg": ((sklearn_images / "china.jpg").read_bytes(), "image/jpeg"),
        "flower_jpg": ((sklearn_images / "flower.jpg").read_bytes(), "image/jpeg"),
        "cmyk_jpg": (_encode(coffee.convert("CMYK"), "JPEG", quality=90), "image/jpeg"),
        "gray16_png": (
            _encode(Image.fromarray(camera.astype(np.uint16) * 257), "PNG"),
            "image/png",
        ),
        "palette_transparent_png": (_encode(palette, "PNG", transparency=63), "image/png"),
        "rgba_png": (_encode(rgba, "PNG"), "image/png"),
        "la_png": (_encode(la, "PNG"), "image/png"),
        "animated_gif": (
            _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
            "image/gif",
        ),
        "exif_rotated_jpg": (_encode(coffee, "JPEG", quality=85, exif=exif.tobytes()), "image/jpeg"),
        "truncated_jpg": (astronaut_jpg[: len(astronaut_jpg) // 2], "image/jpeg"),
        "not_an_image": (
            b"<!doctype html><html><body><h1>Not an image</h1></body></html>",
            "text/html",
        ),
        # Pillow's own bomb check fires (400 M pixels > 2 x MAX_IMAGE_PIXELS).
        "bomb_png": (huge_blank_png(20_000, 20_000), "image/png"),
        # Under Pillow's threshold but over CLS_MAX_IMAGE_PIXELS (48 M > 40 M): our header check.
        "large_pixels_png": (huge_blank_png(8_000, 6_000), "image/png"),
    }


GOOD_SIZES: dict[str, tuple[int, int]] = {
    "astronaut_jpg": (512, 512),
    "chelsea_png": (451, 300),
    "coffee_jpg": (600, 400),
    "camera_png": (512, 512),
    "china_jpg": (640, 427),
    "flower_jpg": (640, 427),
    "cmyk_jpg": (600, 400),
    "gray16_png": (512, 512),
    "palette_transparent_png": (451, 300),
    "rgba_png": (451, 300),
    "la_png": (512, 512),
    "animated_gif": (64, 48),
    "exif_rotated_jpg": (400, 600),  # stored 600x400, EXIF orientation 6 swaps the sides
    "redirect_chain": (512, 512),  # 3 hops, then astronaut_jpg
    "gzip_encoded_png": (451, 300),  # chelsea_png with Content-Encoding: gzip
}

EXPECTED_ERRORS: dict[str, str] = {
    "not_found": HTTP_STATUS,
    "server_error": HTTP_STATUS,
    "slow_headers": TIMEOUT,
    "slow_body": TIMEOUT,
    "not_an_image": NOT_AN_IMAGE,
    "truncated_jpg": DECODE_FAILED,
    "bomb_png": TOO_MANY_PIXELS,
    "large_pixels_png": TOO_MANY_PIXELS,
    "oversized_chunked": TOO_LARGE,  # no Content-Length, chunked body past the limit
    "oversized_declared": TOO_LARGE,  # Content-Length over the limit, body never sent
    "oversized_eof": TOO_LARGE,  # no Content-Length, no chunking: body until the connection closes
    "gzip_bomb": TOO_LARGE,  # honest small Content-Length, gzip body that inflates past the limit
    "too_many_redirects": FETCH_FAILED,
    "redirect_to_file": BLOCKED_URL,
    "connection_refused": FETCH_FAILED,
}


# -- hostile images: small files that decode to large or odd images ------------------------------------------------------------------------------


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
        "float_tiff_40mp": (float_tiff(8000, 5000), "image/tiff"),
        "gray16_png_16mp": (gray16_png(4000, 4000), "image/png"),
        "palette_png_25mp": (blank_png(5000, 5000, 8, 3, plte=palette, trns=b"\x00"), "image/png"),
        "gif_300_frames": (many_frame_gif(1000, 1000, 300), "image/gif"),
        "canvas_png_36mp": (huge_blank_png(6000, 6000), "image/png"),
        "rgba_png_36mp": (blank_png(6000, 6000, 8, 6), "image/png"),
    }


def noisy_png(colour: tuple[int, int, int], seed: int, size: int = 32) -> bytes:
    """A ``size`` x ``size`` PNG of one colour with Gaussian noise (sigma 25): other bytes for every seed, the same
    bytes for the same arguments."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour, np.float32) + rng.normal(0, 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def photo_jpeg(index: int, size: tuple[int, int] = (320, 240)) -> bytes:
    """A real photo (scikit-image), resized and cropped a little differently per index, as JPEG."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee()]
    image = Image.fromarray(np.asarray(photos[index % len(photos)], dtype=np.uint8))
    shift = index % 17
    image = image.crop((shift, shift, image.width - shift, image.height - shift)).resize(size)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()
