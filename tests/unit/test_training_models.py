"""Architectures, model names, pretrained weights files, augmentation presets, bad images."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from ml.trained import TrainedModel
from ml.training import (
    DatasetError,
    NullCallbacks,
    PretrainedWeightsError,
    TrainSpec,
    UnknownModelError,
    check_model_name,
    train,
)
from ml.training.augment import build_mixup, resolve_data_config, train_transform
from ml.training.models import build_model, head_names, model_kwargs_for
from tests.fixtures.trained_model import digits_dataset  # noqa: F401  (fixture)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def eight_images(digits_dataset):
    samples, _, _ = digits_dataset
    by_label: dict[int, list] = {}
    for path, label in samples:
        by_label.setdefault(label, []).append((path, label))
    train_samples = [by_label[0][i] for i in range(4)] + [by_label[1][i] for i in range(4)]
    val_samples = [by_label[0][10], by_label[1][10]]
    return train_samples, val_samples


def _spec(model_name: str, **overrides) -> TrainSpec:
    values = dict(
        model_name=model_name, num_classes=2, class_names=["zero", "one"], epochs=1, batch_size=4,
        learning_rate=1e-3, augmentation="none", pretrained=False, image_size=32, device="cpu",
    )
    values.update(overrides)
    return TrainSpec(**values)


# Reduced sizes: ViT and Swin are built with img_size=<image_size> (timm resamples/pads windows as needed; 32 works
# for both), the convolutional models take any size as is.
@pytest.mark.parametrize(
    ("model_name", "image_size", "expected_kwargs"),
    [
        ("vit_base_patch16_224", 32, {"img_size": 32}),
        ("convnext_tiny", 32, {}),
        ("efficientnet_b0", 32, {}),
        ("swin_tiny_patch4_window7_224", 32, {"img_size": 32}),
    ],
)
def test_one_short_epoch_per_architecture_writes_a_loadable_package(model_name, image_size, expected_kwargs, eight_images, tmp_path):
    train_samples, val_samples = eight_images
    train_samples = train_samples[2:6]  # 4 images (two per class), batch 4: one step
    result = train(_spec(model_name, image_size=image_size), train_samples, val_samples, tmp_path, NullCallbacks())
    assert result.epochs_run == 1 and result.metrics["epochs"][0]["images_per_s"] > 0
    loaded = TrainedModel.load(result.package_dir, device="cpu")
    assert loaded.info_variant == model_name and loaded.image_size == image_size
    assert loaded.config["model_kwargs"] == expected_kwargs
    pixels = loaded.preprocess(Image.open(train_samples[0][0]))
    assert pixels.shape == (3, image_size, image_size)
    probabilities = loaded.predict(pixels)
    assert probabilities.shape == (1, 2)
    torch.testing.assert_close(probabilities.sum(), torch.tensor(1.0))


def test_fixed_size_models_get_img_size_only_when_it_differs():
    assert model_kwargs_for("vit_base_patch16_224", 224) == {}
    assert model_kwargs_for("vit_base_patch16_224", 64) == {"img_size": 64}
    assert model_kwargs_for("convnext_tiny", 64) == {}
    assert model_kwargs_for("resnet10t", None) == {}


def test_unknown_model_names_are_refused_before_anything_is_built(eight_images, tmp_path):
    with pytest.raises(UnknownModelError, match="not_a_model"):
        check_model_name("not_a_model")
    with pytest.raises(UnknownModelError, match="did you mean"):
        check_model_name("resnet10")
    with pytest.raises(UnknownModelError, match="hub-prefixed"):
        check_model_name("hf-hub:timm/resnet18.a1_in1k")
    check_model_name("convnext_tiny.fb_in22k")  # pretrained tags are fine
    train_samples, val_samples = eight_images
    with pytest.raises(UnknownModelError):
        train(_spec("not_a_model"), train_samples, val_samples, tmp_path, NullCallbacks())
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def source_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False).state_dict()  # 1000-class head


def _assert_backbone_loaded_and_head_reset(model, source):
    state = model.state_dict()
    heads = head_names(model)
    assert heads == ("fc",)
    assert state["fc.weight"].shape[0] == 3 and source["fc.weight"].shape[0] == 1000
    backbone = [k for k in source if not k.startswith("fc.")]
    assert backbone and all(torch.equal(state[k], source[k]) for k in backbone)


def test_pretrained_safetensors_file_loads_with_head_reset(source_state, tmp_path):
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(source_state, str(path))
    model, _ = build_model("test_resnet", 3, None, pretrained=True, pretrained_path=str(path))
    _assert_backbone_loaded_and_head_reset(model, source_state)


def test_pretrained_torch_file_loads_with_weights_only(source_state, tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source_state.items()}, "epoch": 7}, path)
    model, _ = build_model("test_resnet", 3, None, pretrained=True, pretrained_path=str(path))
    _assert_backbone_loaded_and_head_reset(model, source_state)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickles_with_arbitrary_objects_are_refused(source_state, tmp_path):
    path = tmp_path / "evil.pt"
    with path.open("wb") as fh:
        pickle.dump({"state_dict": source_state, "extra": Payload()}, fh)
    with pytest.raises(PretrainedWeightsError, match="refused"):
        build_model("test_resnet", 3, None, pretrained=True, pretrained_path=str(path))


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "convnext.safetensors"
    safetensors.torch.save_file(timm.create_model("test_convnext").state_dict(), str(path))
    with pytest.raises(PretrainedWeightsError, match="do not fit"):
        build_model("test_resnet", 3, None, pretrained=True, pretrained_path=str(path))
    with pytest.raises(PretrainedWeightsError, match="not found"):
        build_model("test_resnet", 3, None, pretrained=True, pretrained_path=str(tmp_path / "missing.pt"))


def test_pretrained_vit_at_another_image_size_trains_from_the_file(eight_images, tmp_path):
    source = timm.create_model("vit_tiny_patch16_224").state_dict()  # 224 px: 14x14 position embeddings
    path = tmp_path / "vit.safetensors"
    safetensors.torch.save_file(source, str(path))
    train_samples, val_samples = eight_images
    spec = _spec("vit_tiny_patch16_224", image_size=48, pretrained=True, pretrained_path=str(path), learning_rate=1e-9)
    result = train(spec, train_samples, val_samples, tmp_path / "run", NullCallbacks())
    state = result.model.state_dict()
    assert state["pos_embed"].shape == (1, 1 + 3 * 3, 192)  # resampled to 48 px by timm's filter
    assert state["head.weight"].shape == (2, 192)
    torch.testing.assert_close(state["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("augmentation", ["none", "light", "medium", "heavy"])
def test_each_augmentation_preset_runs_a_step(augmentation, eight_images, tmp_path, monkeypatch):
    mix_calls = []
    original_call = timm.data.Mixup.__call__

    def counting_call(self, x, target):
        mix_calls.append(x.shape[0])
        return original_call(self, x, target)

    monkeypatch.setattr(timm.data.Mixup, "__call__", counting_call)
    train_samples, val_samples = eight_images
    spec = _spec("test_resnet", augmentation=augmentation, batch_size=3)  # odd batches: mixup trims to pairs
    result = train(spec, train_samples, val_samples, tmp_path, NullCallbacks())
    assert result.epochs_run == 1
    assert bool(mix_calls) == (augmentation == "heavy")
    assert all(size % 2 == 0 for size in mix_calls)


def test_augmentation_presets_compose_the_expected_transforms():
    model = timm.create_model("test_resnet", num_classes=2)
    described = {}
    for preset in ("none", "light", "medium", "heavy"):
        cfg = resolve_data_config(model, 64, preset)
        described[preset] = repr(train_transform(cfg, preset))
        assert cfg.input_size == (3, 64, 64)
    assert resolve_data_config(model, 64, "none").crop_pct == 1.0
    assert "CenterCrop" in described["none"] and "RandomResized" not in described["none"]
    assert "RandomResized" in described["light"] and "RandomHorizontalFlip" in described["light"]
    assert "RandAugment" not in described["light"] and "ColorJitter" not in described["light"]
    assert "RandAugment" in described["medium"] and "RandomErasing" not in described["medium"]
    assert "RandAugment" in described["heavy"] and "RandomErasing" in described["heavy"]
    assert build_mixup("heavy", 2, 0.1) is not None and build_mixup("medium", 2, 0.1) is None


def test_an_undecodable_image_is_a_dataset_error_naming_the_file(eight_images, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    train_samples, val_samples = eight_images
    with pytest.raises(DatasetError, match="broken.png"):
        train(_spec("test_resnet"), train_samples + [(str(bad), 0)], val_samples, tmp_path / "run", NullCallbacks())


def test_labels_out_of_range_and_empty_splits_are_dataset_errors(eight_images, tmp_path):
    train_samples, val_samples = eight_images
    with pytest.raises(DatasetError, match="label 5"):
        train(_spec("test_resnet"), train_samples + [(train_samples[0][0], 5)], val_samples, tmp_path, NullCallbacks())
    with pytest.raises(DatasetError, match="val split is empty"):
        train(_spec("test_resnet"), train_samples, [], tmp_path, NullCallbacks())


def test_split_readable(eight_images, tmp_path):
    from ml.training import split_readable

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    good, unreadable = split_readable(eight_images[0][:2] + [(str(bad), 1)])
    assert good == eight_images[0][:2] and unreadable == [(str(bad), 1)]
    assert Path(unreadable[0][0]).name == "broken.jpg"


def test_a_multi_label_run_holds_the_lr_decays_it_at_the_end_and_keeps_the_whole_image(eight_images, tmp_path):
    """Multi-label: warmup-stable-decay (the base lr until the last fifth of the steps) and a package whose
    evaluation resizes the whole image; the same data single-label keeps the whole-run cosine."""
    import json

    train_samples, val_samples = eight_images
    tagged = [(path, (label,) if i % 3 else ()) for i, (path, label) in enumerate(train_samples)]
    val_tagged = [(path, (label,)) for path, label in val_samples]
    spec = _spec("test_resnet", epochs=3, batch_size=2, multi_label=True, augmentation="light", report=False)
    result = train(spec, tagged, val_tagged, tmp_path / "multi", NullCallbacks())
    lrs = [epoch["lr"] for epoch in result.metrics["epochs"]]  # the lr of the step after each epoch
    assert lrs == [pytest.approx(1e-3), pytest.approx(1e-3), pytest.approx(1e-5)]  # 12 steps: the last 2 decay
    config = json.loads((result.package_dir / "config.json").read_text())
    assert (config["crop_pct"], config["crop_mode"]) == (1.0, "squash")
    single = train(_spec("test_resnet", epochs=2, batch_size=2, report=False), train_samples, val_samples,
                   tmp_path / "single", NullCallbacks())
    single_lrs = [epoch["lr"] for epoch in single.metrics["epochs"]]
    assert 1e-3 > single_lrs[0] > single_lrs[1]  # the cosine decays from the first step
