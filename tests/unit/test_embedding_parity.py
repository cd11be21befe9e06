"""Embeddings equal the reference libraries' normalised image features (random weights, real photos):
open_clip's ``encode_image(normalize=True)``, transformers' ``get_image_features`` normalised, and timm's
``forward_head(forward_features(x), pre_logits=True)`` normalised with timm's own eval transform; and the
stored file (``ml.embedding_files``) reads back with numpy to the same vectors at float16 precision."""

from __future__ import annotations

import io
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from ml.backbones import load_image_embedder
from ml.embedding import ImageEmbedder
from ml.errors import ModelLoadError
from ml.embedding_files import EmbeddingFileError, read_embeddings, write_embeddings
from ml.siglip import siglip_config
from ml.weights import save_state_dict
from tests.fixtures.zeroshot import _few_threads, photos  # noqa: F401  (fixtures)

TOLERANCE = 1e-5


def test_clip_embeddings_equal_open_clip_image_features(tmp_path, photos):
    from ml.clip import register_model_configs

    register_model_configs()  # the tiny test architecture
    torch.manual_seed(3)
    reference = open_clip.create_model("cls-tiny-clip", pretrained=None)
    weights = save_state_dict(reference, tmp_path / "clip.safetensors")
    ref_model, _, ref_preprocess = open_clip.create_model_and_transforms("cls-tiny-clip", pretrained=str(weights))
    ref_model.eval()
    with torch.no_grad():
        expected = ref_model.encode_image(torch.stack([ref_preprocess(p) for p in photos]), normalize=True)

    model = load_image_embedder("clip", "cls-tiny-clip", str(weights), device="cpu")
    assert isinstance(model, ImageEmbedder)
    got = model.embed_images(photos)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
    assert torch.allclose(got.norm(dim=1), torch.ones(len(photos)), atol=1e-6)
    assert (got @ got.T).fill_diagonal_(0).abs().max() < 0.9999  # different photos, different vectors


def test_siglip_embeddings_equal_transformers_image_features(tmp_path, photos):
    from transformers import SiglipImageProcessor, SiglipModel

    torch.manual_seed(5)
    reference = SiglipModel(siglip_config("cls-tiny-siglip", vocab_size=49408)).eval()
    with torch.no_grad():
        reference.logit_scale.fill_(math.log(30.0))
    weights = save_state_dict(reference, tmp_path / "siglip.safetensors")
    pixels = SiglipImageProcessor(size={"height": 64, "width": 64})(images=photos, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = reference.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)
        expected = F.normalize(features, dim=-1)

    got = load_image_embedder("siglip", "cls-tiny-siglip", str(weights), device="cpu").embed_images(photos)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", ["resnet10t", "test_vit"])
def test_timm_embeddings_equal_pre_logits_features(tmp_path, photos, name):
    import timm
    from timm.data import create_transform, resolve_data_config

    torch.manual_seed(9)
    reference = timm.create_model(name, pretrained=False).eval()
    weights = save_state_dict(reference, tmp_path / f"{name}.safetensors")
    transform = create_transform(**resolve_data_config({}, model=reference), is_training=False)
    with torch.no_grad():
        pixels = torch.stack([transform(p.convert("RGB")) for p in photos])
        expected = F.normalize(reference.forward_head(reference.forward_features(pixels), pre_logits=True), dim=-1)

    model = load_image_embedder("timm", name, str(weights), device="cpu")
    got = model.embed_images(photos)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
    assert model.info.family == "timm" and got.shape[1] == reference.num_features


def test_timm_weights_without_the_classifier_load_and_others_are_refused(tmp_path):
    import timm

    headless = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    weights = save_state_dict(headless, tmp_path / "headless.safetensors")
    assert load_image_embedder("timm", "resnet10t", str(weights), device="cpu").info.variant == "resnet10t"
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_image_embedder("timm", "test_vit", str(weights), device="cpu")
    with pytest.raises(ModelLoadError, match="unknown timm model"):
        load_image_embedder("timm", "no_such_net_42", "random", device="cpu")


def test_trained_model_embeddings_are_its_pre_logits_features(photos):
    import timm

    from ml.device import policy_for
    from ml.trained import TrainedModel

    torch.manual_seed(2)
    module = timm.create_model("resnet10t", pretrained=False, num_classes=3).eval()
    config = {"class_names": ["a", "b", "c"], "model_name": "resnet10t", "input_size": [3, 64, 64],
              "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic", "crop_pct": 1.0}
    try:
        trained = TrainedModel(module, config, policy_for("cpu", module), "0" * 64)
    except (KeyError, TypeError) as exc:  # the package config's required fields changed
        pytest.fail(f"TrainedModel config for the test is out of date: {exc}")
    pixels = torch.stack([trained.preprocess(p) for p in photos])
    with torch.no_grad():
        expected = F.normalize(module.forward_head(module.forward_features(pixels), pre_logits=True), dim=-1)
    torch.testing.assert_close(trained.embed(pixels), expected, atol=TOLERANCE, rtol=0)


def test_stored_file_reads_back_with_numpy(photos):
    vectors = F.normalize(torch.randn(5, 48, generator=torch.Generator().manual_seed(0)), dim=-1).numpy()
    ids = ["a", "b/ü", "c" * 256, "d", "e"]
    data = write_embeddings(ids, vectors)
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:  # a data team's one-liner, no project code
        assert npz["ids"].tolist() == ids
        assert npz["embeddings"].dtype == np.float16
        np.testing.assert_allclose(npz["embeddings"].astype(np.float32), vectors, atol=1e-3, rtol=0)
    read_ids, read_vectors = read_embeddings(data)
    assert read_ids == ids and read_vectors.shape == (5, 48)
    empty_ids, empty = read_embeddings(write_embeddings([], np.zeros((0, 48), np.float32)))
    assert empty_ids == [] and empty.shape == (0, 48)


def test_reader_refuses_what_is_not_an_embedding_file():
    for data in (b"", b"not a zip", b"PK\x03\x04" + b"\x00" * 40):
        with pytest.raises(EmbeddingFileError):
            read_embeddings(data)
    buffer = io.BytesIO()
    np.savez(buffer, ids=np.array([{"x": 1}], dtype=object), embeddings=np.zeros((1, 4), np.float16))
    with pytest.raises(EmbeddingFileError):  # a pickled object array is never loaded
        read_embeddings(buffer.getvalue())
    buffer = io.BytesIO()
    np.savez(buffer, ids=np.array(["a"]), embeddings=np.zeros((2, 4), np.float16))
    with pytest.raises(EmbeddingFileError, match="float16"):
        read_embeddings(buffer.getvalue())
