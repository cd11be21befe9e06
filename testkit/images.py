"""Images on loopback for the demo, the benchmarks and the tests, in one import: the pictures
(``testkit.pictures``: sample photos, varied JPEGs, the digits, reference images with known outcomes) and
the servers that serve them (``testkit.image_server``: ``start_image_server``, ``ImageServerProcess``)."""

from __future__ import annotations

from testkit.image_server import (
    SLOW_SECONDS,
    STREAM_CAP,
    TEST_MAX_BYTES,
    ImageServer,
    ImageServerProcess,
    directory_samples,
    start_image_server,
)
from testkit.pictures import (
    DIGIT_CLASS_NAMES,
    DIGITS_IMAGE_SIZE,
    EXPECTED_ERRORS,
    GOOD_SIZES,
    VARIED_SIZE,
    content_type,
    digits_splits,
    huge_blank_png,
    ico_bmp_frame,
    ico_bomb,
    ico_with_frame,
    reference_samples,
    sample_photos,
    tiled_tiff,
    varied_jpegs,
    write_digits_dataset,
)

__all__ = [
    "DIGITS_IMAGE_SIZE",
    "DIGIT_CLASS_NAMES",
    "EXPECTED_ERRORS",
    "GOOD_SIZES",
    "SLOW_SECONDS",
    "STREAM_CAP",
    "TEST_MAX_BYTES",
    "VARIED_SIZE",
    "ImageServer",
    "ImageServerProcess",
    "content_type",
    "digits_splits",
    "directory_samples",
    "huge_blank_png",
    "ico_bmp_frame",
    "ico_bomb",
    "ico_with_frame",
    "reference_samples",
    "sample_photos",
    "start_image_server",
    "tiled_tiff",
    "varied_jpegs",
    "write_digits_dataset",
]
