"""Tensor preprocessing for CLIP, SigLIP and timm models: decode to uint8 tensors, then resize / crop /
normalise as torchvision ``transforms.v2.functional`` ops, on the CPU or on CUDA (``CLS_PREPROCESS=tensor``).

The reference is each family's own Pillow transform (``CLS_PREPROCESS=pil``): open_clip's and timm's eval
``Compose([Resize(shorter side), CenterCrop, ToTensor, Normalize])`` and transformers' SigLIP processor
(``Resize(H, W)`` on uint8, normalise). :class:`TensorPreprocess` is the same recipe as data, read off those
transforms (:func:`tensor_preprocess_for`), so there is one source of sizes, interpolation and statistics.
Antialiased bicubic resizing in torch differs from Pillow's by a little (rounding of the uint8 passes); the
parity tests (tests/unit/test_preprocess_parity.py) measure it on real photos.

Decoding: :func:`decode_cpu` (libjpeg-turbo / libpng through ``torchvision.io.decode_image``) and
:func:`decode_jpegs`, one batched ``decode_jpeg`` call for baseline JPEGs on a device (nvJPEG on CUDA); an image
it cannot take (progressive, CMYK, a decode failure) comes back as None so the caller decodes it on the CPU.
:func:`preprocess_jpegs` is the worker's batched path on top of it (CLS_GPU_DECODE): decode a batch on the
model's device in chunks of bounded pixels, check each image against its header's size, resize and normalise
there; None per image that must take the CPU path. Both take any device, so the CPU stands in for CUDA in the
tests. The untrusted-input checks (size, aspect ratio, decode memory budget) belong to ``handlers.images`` and
run before any of these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms.v2.functional as tvF
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import InterpolationMode

__all__ = [
    "PREPROCESS_MODES",
    "TensorPreprocess",
    "UnsupportedTransform",
    "DECODE_BATCH_PIXELS",
    "EncodedJpeg",
    "JpegBatch",
    "decode_cpu",
    "decode_jpegs",
    "is_baseline_jpeg",
    "preprocess_jpegs",
    "tensor_preprocess_for",
]

PREPROCESS_MODES = ("pil", "tensor")
"""``CLS_PREPROCESS`` values: the families' Pillow transforms, or :class:`TensorPreprocess`."""


class UnsupportedTransform(ValueError):
    """A model's Pillow transform has a step the tensor recipe does not reproduce (then: the Pillow path)."""


@dataclass(frozen=True)
class TensorPreprocess:
    """Resize (shorter side to ``resize``, or exactly ``resize=(H, W)``), centre crop ``crop``, scale to [0, 1]
    and normalise with ``mean`` / ``std``: uint8 ``[3, H, W]`` RGB in, float32 ``[3, h, w]`` out, same device."""

    resize: int | tuple[int, int]
    crop: tuple[int, int] | None
    interpolation: InterpolationMode
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_size: int | None = None

    @classmethod
    def from_transform(cls, transform: Any) -> TensorPreprocess:
        """Read the recipe off a torchvision ``Compose`` (open_clip's and timm's eval transforms)."""
        from torchvision import transforms as T

        resize: int | tuple[int, int] | None = None
        crop: tuple[int, int] | None = None
        interpolation = InterpolationMode.BILINEAR
        max_size = None
        mean = std = None
        for step in getattr(transform, "transforms", None) or []:
            name = type(step).__name__
            if isinstance(step, T.Resize) and resize is None and crop is None:
                size = step.size
                if isinstance(size, int) or len(size) == 1:
                    resize = int(size if isinstance(size, int) else size[0])
                else:
                    resize = (int(size[0]), int(size[1]))
                interpolation, max_size = step.interpolation, step.max_size
                if step.antialias is False:
                    raise UnsupportedTransform("Resize without antialiasing")
            elif isinstance(step, T.CenterCrop) and crop is None and mean is None:
                crop = (int(step.size[0]), int(step.size[1]))
            elif name in ("MaybeConvertMode", "_convert_to_rgb", "ToTensor", "MaybeToTensor", "PILToTensor"):
                continue  # the input is already RGB; scaling to [0, 1] is folded into the normalisation
            elif isinstance(step, T.Normalize) and mean is None:
                mean, std = _triple(step.mean), _triple(step.std)
            else:
                raise UnsupportedTransform(f"no tensor equivalent for {step!r}")
        if resize is None or mean is None or std is None:
            raise UnsupportedTransform(f"not a resize / crop / normalise transform: {transform!r}")
        return cls(resize=resize, crop=crop, interpolation=interpolation, mean=mean, std=std, max_size=max_size)

    @classmethod
    def from_siglip(cls, siglip: Any) -> TensorPreprocess:
        """From ``ml.siglip.SiglipPreprocess`` (exact ``H x W`` resize; its mean/std are in 0-255 units)."""
        if not siglip.do_normalize:
            raise UnsupportedTransform("SigLIP processor without normalisation")
        scale = siglip.rescale_factor if siglip.do_rescale else 1 / 255
        mean = _triple([m * scale for m in siglip.mean])
        std = _triple([s * scale for s in siglip.std])
        return cls(resize=tuple(siglip.size), crop=None, interpolation=siglip.interpolation, mean=mean, std=std)

    def resized(self, image: torch.Tensor) -> torch.Tensor:
        """Resize and crop one uint8 ``[3, H, W]`` (or a same-size ``[B, 3, H, W]``) image, still uint8."""
        if image.dtype != torch.uint8:
            raise TypeError(f"expected uint8 pixels, got {image.dtype}")
        size = [self.resize] if isinstance(self.resize, int) else list(self.resize)
        out = tvF.resize(image, size, interpolation=self.interpolation, max_size=self.max_size, antialias=True)
        if self.crop is not None:
            out = tvF.center_crop(out, list(self.crop))
        return out

    def normalized(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> ``(pixels / 255 - mean) / std`` in float32."""
        mean = [255.0 * m for m in self.mean]
        std = [255.0 * s for s in self.std]
        return tvF.normalize(pixels.to(torch.float32), mean, std)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.normalized(self.resized(image))

    def batch(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Images of any sizes (each ``[3, H, W]`` uint8, all on one device) -> ``[B, 3, h, w]`` float32."""
        if not images:
            raise ValueError("no images")
        return self.normalized(torch.stack([self.resized(image) for image in images]))


def _triple(values: Any) -> tuple[float, float, float]:
    items = [float(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]
    if len(items) == 1:
        items = items * 3
    if len(items) != 3:
        raise UnsupportedTransform(f"expected 3 channel statistics, got {items}")
    return items[0], items[1], items[2]


def tensor_preprocess_for(model: Any) -> TensorPreprocess | None:
    """The tensor recipe of a loaded model (CLIP, SigLIP or trained timm), or None when its Pillow transform
    has a step without a tensor equivalent (the Pillow path is then used for it)."""
    from ml.siglip import SiglipPreprocess

    transform = getattr(model, "_transform", None)  # each family keeps its reference transform there
    try:
        if isinstance(transform, SiglipPreprocess):
            return TensorPreprocess.from_siglip(transform)
        return TensorPreprocess.from_transform(transform)
    except UnsupportedTransform:
        return None


def decode_cpu(data: bytes | torch.Tensor) -> torch.Tensor:
    """Encoded JPEG / PNG / ... bytes -> uint8 ``[3, H, W]`` RGB on the CPU, EXIF orientation applied.

    Raises whatever torchvision raises for data it cannot decode (callers fall back to Pillow)."""
    encoded = data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)


_SOF_BASELINE = (0xC0, 0xC1)  # baseline and extended-sequential Huffman: what nvJPEG's batched decoder takes
_SOF_OTHER = frozenset({0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def is_baseline_jpeg(data: bytes, max_scan: int = 1 << 20) -> bool:
    """Whether ``data`` is a complete baseline JPEG with 1 or 3 components (walks the marker segments up to the
    frame header, at most ``max_scan`` bytes; ends with EOI, so a truncated file is refused)."""
    if len(data) < 4 or not data.startswith(b"\xff\xd8") or not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return False
    pos, end = 2, min(len(data), max_scan)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            return False
        if marker in _SOF_BASELINE:
            return pos + 10 <= len(data) and data[pos + 4] == 8 and data[pos + 9] in (1, 3)
        if marker in _SOF_OTHER or marker == 0xDA:  # progressive / lossless / arithmetic, or scan before a frame
            return False
        pos += 2 + length
    return False


def decode_jpegs(datas: Sequence[bytes], device: torch.device | str) -> list[torch.Tensor | None]:
    """Decode baseline JPEGs on ``device`` in one batched ``decode_jpeg`` call (nvJPEG on CUDA): uint8
    ``[3, H, W]`` RGB on the device per image (EXIF orientation applied), None for an image to decode on the CPU
    path instead (not baseline, or the batched decoder refused it)."""
    out: list[torch.Tensor | None] = [None] * len(datas)
    chosen = [i for i, data in enumerate(datas) if is_baseline_jpeg(data)]
    if not chosen:
        return out
    encoded = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in chosen]
    try:
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError:  # one bad image fails the batch call: try each alone, the rest go to the CPU
        decoded = []
        for data in encoded:
            try:
                decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
            except RuntimeError:
                decoded.append(None)
    for index, image in zip(chosen, decoded, strict=True):
        out[index] = image
    return out


DECODE_BATCH_PIXELS = 128 * 1024 * 1024
"""Pixels decoded on the device at once by :func:`preprocess_jpegs` (384 MB of uint8 RGB, plus one image's resize
work at a time): a batch of large JPEGs is decoded in several calls, so device memory stays bounded whatever the
batch holds (one image is at most CLS_MAX_IMAGE_PIXELS, checked from its header before)."""


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG that passed the decode-limit checks, and its (width, height) after EXIF orientation as its header
    says (a decode of another size is not trusted: CPU path)."""

    data: bytes
    size: tuple[int, int]

    @property
    def pixels(self) -> int:
        return self.size[0] * self.size[1]


@dataclass(frozen=True)
class JpegBatch:
    """The JPEGs of one batched decode (what the decode batcher's forward takes)."""

    jpegs: tuple[EncodedJpeg, ...]

    @classmethod
    def of(cls, jpegs: Sequence[EncodedJpeg]) -> JpegBatch:
        return cls(tuple(jpegs))


def preprocess_jpegs(batch: JpegBatch | Sequence[EncodedJpeg], recipe: TensorPreprocess, device: torch.device | str,
                     max_batch_pixels: int = DECODE_BATCH_PIXELS) -> list[torch.Tensor | None]:
    """Decode a batch of checked JPEGs on ``device`` (:func:`decode_jpegs`, in chunks of at most
    ``max_batch_pixels``) and resize / crop / normalise each there: float32 ``[3, h, w]`` on ``device`` per image,
    or None for one to run through the CPU path (not baseline, refused by the decoder, a decoded size other than
    its header's, or a failure while resizing, out of memory included)."""
    jpegs = list(batch.jpegs if isinstance(batch, JpegBatch) else batch)
    out: list[torch.Tensor | None] = [None] * len(jpegs)
    start = 0
    while start < len(jpegs):
        end, pixels = start + 1, jpegs[start].pixels
        while end < len(jpegs) and pixels + jpegs[end].pixels <= max_batch_pixels:
            pixels += jpegs[end].pixels
            end += 1
        try:
            decoded = decode_jpegs([jpeg.data for jpeg in jpegs[start:end]], device)
        except RuntimeError:  # out of memory before any image: all of this chunk on the CPU path
            decoded = [None] * (end - start)
        for offset, image in enumerate(decoded):
            width, height = jpegs[start + offset].size
            if image is None or tuple(image.shape) != (3, height, width):
                continue
            try:
                out[start + offset] = recipe(image)
            except RuntimeError:
                continue
        del decoded
        start = end
    return out
