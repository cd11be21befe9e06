"""Weights specs: random (seeded, offline), local files and directories, pretrained tags/hub ids."""

from __future__ import annotations

import pickle

import pytest
import torch
from PIL import Image

from ml.errors import WeightsFileError
from ml.weights import load_state_dict_file, save_state_dict
from ml.backbones import load_zero_shot_model
from ml.errors import ModelLoadError
from tests.fixtures.zeroshot import _few_threads  # noqa: F401  (fixtures)

TINY = [("clip", "cls-tiny-clip"), ("siglip", "cls-tiny-siglip")]
CLASSES = ["cat", "dog"]
TEMPLATES = ["a photo of a {}."]


@pytest.fixture(scope="module")
def photo_batch():
    from skimage import data

    return [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee())]


def _outputs(model, photos) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.stack([model.preprocess(p) for p in photos])
    return model.encode_images(pixels), model.text_embeddings(CLASSES, TEMPLATES)


@pytest.mark.parametrize(("family", "variant"), TINY, ids=["clip", "siglip"])
def test_random_weights_are_seeded_and_named(family, variant, photo_batch):
    a = load_zero_shot_model(family, variant, "random", device="cpu", seed=3)
    b = load_zero_shot_model(family, variant, "random", device="cpu", seed=3)
    c = load_zero_shot_model(family, variant, "random", device="cpu", seed=4)
    assert a.info.family == family and a.info.variant == variant and a.info.weights == "random"
    for x, y in zip(_outputs(a, photo_batch), _outputs(b, photo_batch), strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(_outputs(a, photo_batch)[0], _outputs(c, photo_batch)[0])


def test_openai_style_clip_variant_names_are_accepted():
    assert load_zero_shot_model("clip", "cls/tiny-clip", "random", device="cpu").info.variant == "cls-tiny-clip"


def test_random_init_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_zero_shot_model("clip", "cls-tiny-clip", "random", device="cpu", seed=9)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(("family", "variant"), TINY, ids=["clip", "siglip"])
def test_safetensors_round_trip_gives_identical_outputs(family, variant, tmp_path, photo_batch):
    original = load_zero_shot_model(family, variant, "random", device="cpu", seed=5)
    path = save_state_dict(original.module, tmp_path / "weights.safetensors")
    reloaded = load_zero_shot_model(family, variant, str(path), device="cpu", seed=0)  # seed irrelevant
    assert reloaded.info.weights == str(path)
    for x, y in zip(_outputs(original, photo_batch), _outputs(reloaded, photo_batch), strict=True):
        assert torch.equal(x, y)


def test_weights_only_torch_file_and_directory_load(tmp_path, photo_batch):
    original = load_zero_shot_model("clip", "cls-tiny-clip", "random", device="cpu", seed=5)
    pt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in original.module.state_dict().items()}}, pt)
    assert set(load_state_dict_file(pt)) == set(original.module.state_dict())  # unwrapped, prefix stripped
    from_pt = load_zero_shot_model("clip", "cls-tiny-clip", str(pt), device="cpu")

    directory = tmp_path / "clip-dir"
    save_state_dict(original.module, directory / "open_clip_model.safetensors")
    from_dir = load_zero_shot_model("clip", "cls-tiny-clip", str(directory), device="cpu")
    for model in (from_pt, from_dir):
        for x, y in zip(_outputs(original, photo_batch), _outputs(model, photo_batch), strict=True):
            assert torch.equal(x, y)


def test_siglip_directory_round_trip_offline(tmp_path, photo_batch, monkeypatch):
    from ml.siglip import save_siglip_directory

    _offline(monkeypatch)
    original = load_zero_shot_model("siglip", "cls-tiny-siglip", "random", device="cpu", seed=2)
    directory = save_siglip_directory(original, tmp_path / "siglip-dir")
    reloaded = load_zero_shot_model("siglip", "cls-tiny-siglip", str(directory), device="cpu")
    assert torch.equal(reloaded.preprocess(photo_batch[0]), original.preprocess(photo_batch[0]))
    for x, y in zip(_outputs(original, photo_batch), _outputs(reloaded, photo_batch), strict=True):
        assert torch.equal(x, y)


class _Payload:
    """Unpickling this would create a file: proof that arbitrary code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unsafe_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    original = load_zero_shot_model("clip", "cls-tiny-clip", "random", device="cpu")
    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        torch.save({"state_dict": original.module.state_dict(), "extra": _Payload(marker)}, f)
    assert not marker.exists()

    with pytest.raises(WeightsFileError, match="weights_only"):
        load_state_dict_file(path)
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_zero_shot_model("clip", "cls-tiny-clip", str(path), device="cpu")
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_zero_shot_model("clip", "cls-tiny-clip", str(raw), device="cpu")
    assert not marker.exists()


def test_bad_weight_files_raise_model_load_error(tmp_path):
    siglip = load_zero_shot_model("siglip", "cls-tiny-siglip", "random", device="cpu")
    mismatched = save_state_dict(siglip.module, tmp_path / "siglip.safetensors")
    with pytest.raises(ModelLoadError, match="do not fit CLIP cls-tiny-clip"):
        load_zero_shot_model("clip", "cls-tiny-clip", str(mismatched), device="cpu")

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_zero_shot_model("siglip", "cls-tiny-siglip", str(corrupt), device="cpu")

    not_a_state_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(ModelLoadError, match="state dict"):
        load_zero_shot_model("clip", "cls-tiny-clip", str(not_a_state_dict), device="cpu")

    with pytest.raises(ModelLoadError, match="does not exist"):
        load_zero_shot_model("clip", "cls-tiny-clip", str(tmp_path / "missing.safetensors"), device="cpu")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ModelLoadError, match="no weight file"):
        load_zero_shot_model("clip", "cls-tiny-clip", str(empty_dir), device="cpu")


def _offline(monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time


@pytest.mark.parametrize(
    ("family", "variant", "weights", "message"),
    [
        ("clip", "ViT-B-32", "laion2b_s34b_b79k", "cannot fetch pretrained weights 'laion2b_s34b_b79k' for CLIP ViT-B-32"),
        ("clip", "ViT-B-32", "openai", "cannot fetch pretrained weights 'openai'"),
        ("siglip", "google/siglip-base-patch16-224", "pretrained", "cannot fetch pretrained SigLIP 'google/siglip-base-patch16-224'"),
    ],
)
def test_unfetchable_pretrained_weights_raise_model_load_error(monkeypatch, family, variant, weights, message):
    _offline(monkeypatch)
    with pytest.raises(ModelLoadError, match=message):
        load_zero_shot_model(family, variant, weights, device="cpu")


def test_unknown_names_raise_model_load_error():
    with pytest.raises(ModelLoadError, match="unknown pretrained tag 'no-such-tag'.*openai"):
        load_zero_shot_model("clip", "ViT-B-32", "no-such-tag", device="cpu")
    with pytest.raises(ModelLoadError, match="unknown CLIP variant"):
        load_zero_shot_model("clip", "ViT-Nope", "random", device="cpu")
    with pytest.raises(ModelLoadError, match="unknown SigLIP variant"):
        load_zero_shot_model("siglip", "google/siglip-nope", "random", device="cpu")
    with pytest.raises(ModelLoadError, match="family"):
        load_zero_shot_model("blip", None, "random", device="cpu")  # type: ignore[arg-type]
    with pytest.raises(ModelLoadError, match="device"):
        load_zero_shot_model("clip", "cls-tiny-clip", "random", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            load_zero_shot_model("clip", "cls-tiny-clip", "random", device="cuda")
