"""The tensor preprocessing path (CLS_PREPROCESS=tensor, ml/preprocess.py) against the Pillow path.

- Decoding: every image the Pillow path decodes (JPEG, PNG, CMYK, 16-bit, palettes, alpha, GIF, EXIF-rotated)
  gives the same uint8 pixels; every bad image gives the same error code, the decode limits still apply first.
- Models: on real photos (scikit-image / scikit-learn) with random-weight CLIP ViT-B-32, SigLIP and a timm
  classifier, the same top-1 and confidences within 1e-2. Measured here: pixels differ by at most one uint8
  level where the shorter-side bicubic resize rounds differently (0.0150 after CLIP's normalisation, 0.0175 after
  timm's; SigLIP's exact-size resize: 0.0); the largest confidence difference was 1.1e-5 (CLIP ViT-B-32),
  0.0 (SigLIP) and 7.6e-7 (timm resnet10t); each run prints its own (-s).
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from handlers.preprocessing import decode_and_preprocess as _decode_and_preprocess
from handlers.errors import ImageError
from handlers.images import DecodeBudget, DecodeLimits, decode_image, decoded_tensor
from testkit.configs import decode_limits
from ml.device import policy_for
from ml.preprocess import TensorPreprocess, is_baseline_jpeg, tensor_preprocess_for
from testkit.pictures import hostile_images
from testkit.photos import encode_jpeg, photo_jpegs, photos
from tests.fixtures.zeroshot import _few_threads  # noqa: F401 - autouse fixture

LIMITS = decode_limits()
GOOD = ["astronaut_jpg", "chelsea_png", "coffee_jpg", "camera_png", "china_jpg", "flower_jpg", "cmyk_jpg",
        "gray16_png", "palette_transparent_png", "rgba_png", "la_png", "animated_gif", "exif_rotated_jpg"]
CONFIDENCE_TOLERANCE = 1e-2
CLASSES = ["cat", "dog", "person", "coffee cup", "rocket", "flower", "building", "coins"]


def _tensor(data: bytes, limits: DecodeLimits = LIMITS) -> np.ndarray:
    with decoded_tensor(data, limits) as pixels:
        assert pixels.dtype == torch.uint8 and pixels.shape[0] == 3
        return pixels.permute(1, 2, 0).numpy().copy()


def _code(fn, *args) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ImageError) as caught:
        fn(*args)
    return caught.value.code


@pytest.mark.parametrize("name", GOOD)
def test_tensor_decode_gives_the_pillow_pixels(http_server, name: str) -> None:  # type: ignore[no-untyped-def]
    data = http_server.body(name)
    assert np.array_equal(_tensor(data), np.asarray(decode_image(data, LIMITS)))


def test_progressive_and_grey_jpegs_decode_the_same() -> None:
    photo = photos(("coffee",))[0]
    for data in (encode_jpeg(photo, progressive=True), encode_jpeg(photo.convert("L"))):
        assert np.array_equal(_tensor(data), np.asarray(decode_image(data, LIMITS)))
    assert not is_baseline_jpeg(encode_jpeg(photo, progressive=True))
    assert is_baseline_jpeg(encode_jpeg(photo))
    assert not is_baseline_jpeg(encode_jpeg(photo)[:-2])  # truncated: no EOI


@pytest.mark.parametrize("name", ["truncated_jpg", "bomb_png", "large_pixels_png", "not_an_image"])
def test_bad_images_give_the_same_error_codes(http_server, name: str) -> None:  # type: ignore[no-untyped-def]
    data = http_server.body(name)
    assert _code(_tensor, data) == _code(decode_image, data, LIMITS) == http_server.expected_errors[name]


def test_hostile_images_give_the_same_errors_within_the_same_budget() -> None:
    # The default budget (CLS_DECODE_MEMORY_MB=512). For images torchvision decodes the tensor path reserves
    # 4 B/pixel more than CLIP's Pillow path (SigLIP's reserves 16), so a large JPEG within a few MB of the
    # budget can be refused by one path and not the other; these hostile images all go through Pillow.
    limits = decode_limits(max_pixels=40_000_000, budget=DecodeBudget(512 * 1024 * 1024))
    for name, (data, _) in hostile_images().items():
        outcomes = []
        for decode in (_tensor, lambda d, lim: np.asarray(decode_image(d, lim))):
            try:
                outcomes.append(decode(data, limits).shape)
            except ImageError as exc:
                outcomes.append(exc.code)
        assert outcomes[0] == outcomes[1], name
    assert limits.budget is not None and limits.budget.in_use == 0


def test_a_corrupt_jpeg_body_falls_back_to_pillow_and_its_error() -> None:
    data = bytearray(encode_jpeg(photos(("astronaut",))[0]))
    data[600:5000] = b"\xff" * 4400  # garbage inside the entropy-coded data, markers intact at both ends
    data = bytes(data)
    try:
        expected: object = np.asarray(decode_image(data, LIMITS))
    except ImageError as exc:
        expected = exc.code
    try:
        got: object = _tensor(data)
    except ImageError as exc:
        got = exc.code
    assert type(got) is type(expected)
    if isinstance(expected, np.ndarray):
        assert np.array_equal(got, expected)  # type: ignore[arg-type]


def _random_timm_model() -> tuple[object, TensorPreprocess]:
    from ml.trained import TrainedModel
    from ml.training.augment import resolve_data_config

    module = timm.create_model("resnet10t", pretrained=False, num_classes=len(CLASSES)).eval()
    data_config = resolve_data_config(module, 112, "light")
    config = {"model_name": "resnet10t", "class_names": CLASSES, **data_config.to_json_dict()}
    model = TrainedModel(module, config, policy_for("cpu", module), "0" * 64)
    recipe = tensor_preprocess_for(model)
    assert recipe is not None
    return model, recipe


@pytest.fixture(scope="module")
def photo_bytes() -> list[bytes]:
    return photo_jpegs()


@pytest.mark.parametrize(("family", "variant"), [("clip", "ViT-B-32"), ("siglip", "cls-tiny-siglip"), ("custom", "")])
def test_tensor_path_gives_the_same_top1_and_confidences(photo_bytes: list[bytes], family: str,
                                                         variant: str) -> None:
    from handlers.models import CustomHandle, ModelKey, ZeroShotHandle
    from ml.backbones import load_zero_shot_model

    if family == "custom":
        model, _ = _random_timm_model()
        handle: object = CustomHandle(ModelKey("custom", "x", "x"), model)
    else:
        handle = ZeroShotHandle(ModelKey(family, variant, "random"),
                                load_zero_shot_model(family, variant, "random", device="cpu"))  # type: ignore[arg-type]
    assert handle.tensor_preprocess is not None  # type: ignore[attr-defined]
    pil = torch.stack([_decode_and_preprocess(d, LIMITS, handle, "pil") for d in photo_bytes])  # type: ignore[arg-type]
    tensor = torch.stack([_decode_and_preprocess(d, LIMITS, handle, "tensor") for d in photo_bytes])  # type: ignore[arg-type]
    assert pil.shape == tensor.shape
    one_level = 1 / (255 * min(handle.tensor_preprocess.std)) + 1e-5  # type: ignore[attr-defined]
    assert (pil - tensor).abs().max().item() <= one_level  # at most one uint8 level after normalisation
    if family == "custom":
        prepared = list(range(len(CLASSES)))
    else:
        prepared = handle.model.text_embeddings(CLASSES, ["a photo of a {}."])  # type: ignore[attr-defined]
    scores = [handle.confidences(handle.forward(batch), prepared) for batch in (pil, tensor)]  # type: ignore[attr-defined]
    difference = (scores[0] - scores[1]).abs().max().item()
    print(f"{family} {variant}: max pixel difference {(pil - tensor).abs().max().item():.4f}, "
          f"max confidence difference {difference:.2e}")
    assert torch.equal(scores[0].argmax(dim=1), scores[1].argmax(dim=1))
    assert difference < CONFIDENCE_TOLERANCE


def test_batched_recipe_equals_one_by_one_and_keeps_the_decode_limits() -> None:
    _, recipe = _random_timm_model()
    images = [_tensor(d) for d in photo_jpegs(3, (320, 240))] + [_tensor(photo_jpegs(1)[0])]
    tensors = [torch.from_numpy(i).permute(2, 0, 1) for i in images]
    batch = recipe.batch(tensors)
    assert batch.shape == (4, 3, 112, 112) and batch.dtype == torch.float32
    assert torch.equal(batch, torch.stack([recipe(t) for t in tensors]))
    with pytest.raises(TypeError, match="uint8"):
        recipe(tensors[0].float())
    tiny = decode_limits(max_pixels=100 * 100)
    assert _code(_tensor, photo_jpegs(1)[0], tiny) == "too_many_pixels"
    wide = Image.new("RGB", (2100, 100))
    assert _code(_tensor, encode_jpeg(wide), LIMITS) == "bad_aspect_ratio"


def test_a_transform_without_tensor_equivalent_keeps_the_pillow_path() -> None:
    from torchvision import transforms as T

    class Holder:
        _transform = T.Compose([T.Resize(32), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])

    assert tensor_preprocess_for(Holder()) is None
    assert tensor_preprocess_for(object()) is None
