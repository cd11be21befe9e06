"""The worker's batched JPEG decode path (CLS_GPU_DECODE, ml.preprocess.preprocess_jpegs, handlers.images
.batched_jpeg_size), with the CPU standing in for CUDA: which images it takes, the per-image fallback to the CPU
path, pixel-exact results against that path, and device memory bounded per decode call. tests/cuda runs the same
on a GPU."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

import ml.preprocess
from handlers.errors import ImageError
from handlers.images import batched_jpeg_size, decoded_tensor
from ml.preprocess import EncodedJpeg, JpegBatch, TensorPreprocess, preprocess_jpegs
from testkit.photos import encode_jpeg, photo_jpegs, photos
from testkit.configs import decode_limits

LIMITS = decode_limits()
RECIPE = TensorPreprocess(resize=48, crop=(48, 48), interpolation=InterpolationMode.BICUBIC,
                          mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))


def _cpu_path(data: bytes) -> torch.Tensor:
    with decoded_tensor(data, LIMITS) as pixels:
        return RECIPE(pixels)


def _corrupt_body(data: bytes) -> bytes:
    broken = bytearray(data)
    start = len(data) // 3
    broken[start : start + 1000] = b"\xff" * 1000  # garbage in the entropy-coded data, markers intact at both ends
    return bytes(broken)


def _images() -> dict[str, bytes]:
    coffee = photos(("coffee",))[0].resize((150, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate: the decoded image is 100x150
    png = io.BytesIO()
    coffee.save(png, "PNG")
    jpegs = photo_jpegs(3, (160, 120))
    return {"photo0": jpegs[0], "photo1": jpegs[1], "photo2": jpegs[2], "grey": encode_jpeg(coffee.convert("L")),
            "exif_rotated": encode_jpeg(coffee, exif=exif.tobytes()), "progressive": encode_jpeg(coffee, progressive=True),
            "png": png.getvalue(), "cmyk": encode_jpeg(coffee.convert("CMYK")),
            "corrupt_body": _corrupt_body(encode_jpeg(photos(("astronaut",))[0].resize((256, 256)))),
            "truncated": jpegs[0][: len(jpegs[0]) // 2]}


BATCHED = {"photo0", "photo1", "photo2", "grey", "exif_rotated", "corrupt_body"}


def test_header_checks_choose_baseline_jpegs_and_keep_the_errors_of_the_cpu_path() -> None:
    images = _images()
    sizes = {name: batched_jpeg_size(data, LIMITS) for name, data in images.items()}
    assert {name for name, size in sizes.items() if size is not None} == BATCHED
    assert sizes["exif_rotated"] == (100, 150) and sizes["photo0"] == (160, 120)
    for limits, code in ((decode_limits(max_pixels=100 * 100), "too_many_pixels"),):
        with pytest.raises(ImageError) as caught:
            batched_jpeg_size(images["photo0"], limits)
        assert caught.value.code == code
    wide = encode_jpeg(Image.new("RGB", (2100, 100)))
    for data, code in ((wide, "bad_aspect_ratio"), (b"not an image at all", "not_an_image"), (b"", "not_an_image")):
        with pytest.raises(ImageError) as caught:
            batched_jpeg_size(data, LIMITS)
        assert caught.value.code == code
        with pytest.raises(ImageError) as same:
            _cpu_path(data)
        assert same.value.code == code


def test_batched_decode_on_cpu_equals_the_per_image_path_and_refuses_per_image(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    images = _images()
    names = sorted(BATCHED)
    jpegs = [EncodedJpeg(images[name], batched_jpeg_size(images[name], LIMITS)) for name in names]  # type: ignore[arg-type]
    jpegs.append(EncodedJpeg(images["photo0"], (120, 160)))  # a header size the decode does not match: refused
    calls: list[int] = []
    real = ml.preprocess.decode_jpegs

    def counting(datas, device):  # type: ignore[no-untyped-def]
        calls.append(len(datas))
        return real(datas, device)

    monkeypatch.setattr(ml.preprocess, "decode_jpegs", counting)
    out = preprocess_jpegs(JpegBatch.of(jpegs), RECIPE, "cpu")
    assert calls == [len(jpegs)]  # one decode call for the whole batch
    assert out[-1] is None
    for name, tensor in zip(names, out, strict=False):
        if name == "corrupt_body":
            assert tensor is None  # the batched decoder refused it: the CPU path decides (Pillow or its error)
            continue
        assert tensor is not None and tensor.shape == (3, 48, 48) and tensor.dtype == torch.float32, name
        assert torch.equal(tensor, _cpu_path(images[name])), name  # the same decoder, the same pixels


def test_device_memory_is_bounded_per_decode_call(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    datas = photo_jpegs(5, (160, 120))
    big = encode_jpeg(Image.new("RGB", (3000, 2000), (90, 120, 200)))
    jpegs = [EncodedJpeg(d, (160, 120)) for d in datas[:2]] + [EncodedJpeg(big, (3000, 2000))]
    jpegs += [EncodedJpeg(d, (160, 120)) for d in datas[2:]]
    chunks: list[int] = []
    real = ml.preprocess.decode_jpegs

    def recording(batch, device):  # type: ignore[no-untyped-def]
        chunks.append(sum(Image.open(io.BytesIO(d)).size[0] * Image.open(io.BytesIO(d)).size[1] for d in batch))
        return real(batch, device)

    monkeypatch.setattr(ml.preprocess, "decode_jpegs", recording)
    budget = 3 * 160 * 120
    out = preprocess_jpegs(jpegs, RECIPE, "cpu", max_batch_pixels=budget)
    assert chunks == [2 * 160 * 120, 3000 * 2000, 3 * 160 * 120]  # the large image alone, the rest within budget
    assert all(tensor is not None for tensor in out)
    assert torch.equal(out[2], _cpu_path(big))  # type: ignore[arg-type]
