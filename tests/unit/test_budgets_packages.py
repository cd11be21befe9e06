"""A model package's config.json cannot demand any memory: its input size and crop_pct are bounded by what a
classifier needs, and a trained model's resize of each image is counted in the decode budget."""

from __future__ import annotations

import io

import pytest
import timm
from PIL import Image

from handlers.errors import TOO_MANY_PIXELS, ImageError
from handlers.images import DecodeBudget
from handlers.models import CustomHandle, ModelKey
from handlers.preprocessing import decode_and_preprocess
from ml.trained import TrainedModel
from ml.training.errors import PackageError
from ml.training.package import build_package_config, check_package_config, write_package
from testkit.configs import decode_limits


def _config(input_side: int = 32, crop_pct: float = 1.0, **kwargs) -> dict:
    return build_package_config(
        model_name="test_resnet", model_kwargs=kwargs, class_names=["a", "b"],
        data_config={"input_size": [3, input_side, input_side], "interpolation": "bilinear",
                     "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": crop_pct, "crop_mode": "center"},
        training={}, best_epoch=1)


@pytest.mark.parametrize(("config", "named"), [
    (_config(224, 0.005), "crop_pct"),  # Resize(44800): 6-8 GB per image
    (_config(1024, 0.25), "crop_pct"),  # Resize(4096)
    (_config(8192, 1.0), "input_size"),
    (_config(32, 1.0, img_size=8192), "model_kwargs.img_size"),
])
def test_a_package_demanding_huge_preprocessing_is_refused(config, named):
    with pytest.raises(PackageError) as caught:
        check_package_config(config)
    assert named in str(caught.value)


@pytest.mark.parametrize(("side", "crop_pct"), [(224, 0.875), (384, 1.0), (1024, 0.5), (224, 0.12)])
def test_the_sizes_real_classifiers_use_still_pass(side, crop_pct):
    check_package_config(_config(side, crop_pct))


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 200)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def large_input_model(tmp_path_factory):
    """test_resnet packaged at the largest allowed preprocessing: input 1024, crop_pct 0.5 (Resize(2048))."""
    model = timm.create_model("test_resnet", num_classes=2)
    package = write_package(tmp_path_factory.mktemp("pkg") / "p", model.state_dict(), _config(1024, 0.5), {})
    return CustomHandle(ModelKey("custom", "s3://b/p", "s3://b/p"), TrainedModel.load(package, device="cpu"))


@pytest.mark.parametrize("mode", ["pil", "tensor"])
def test_a_trained_models_resize_is_counted_in_the_decode_budget(large_input_model, mode):
    """A 20:1 banner of 200x4000 px is small to decode, but this model resizes its short side to 2048 px: 2048 x
    40960 RGB is over 300 MB. With a 256 MB decode budget that is refused, not allocated."""
    limits = decode_limits(budget=DecodeBudget(256 * 1024 * 1024))
    with pytest.raises(ImageError) as caught:
        decode_and_preprocess(_png(4000, 200), limits, large_input_model, mode)
    assert caught.value.code == TOO_MANY_PIXELS
    pixels = decode_and_preprocess(_png(64, 64), limits, large_input_model, mode)  # a square image fits
    assert tuple(pixels.shape) == (3, 1024, 1024)
    assert limits.budget.in_use == 0 and limits.budget.peak > 2048 * 2048 * 8  # the resize was reserved
