"""Scoring semantics, prompt templates, preprocessing and the batch-halving OOM fallback."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ml.backbones import load_zero_shot_model
from ml.embedding import encode_images_adaptive
from ml.zeroshot import (
    DEFAULT_TEMPLATES,
    ModelInfo,
    ZeroShotModel,
    render_prompts,
    warm_up,
)
from tests.fixtures.zeroshot import _few_threads, photos  # noqa: F401  (fixtures)

CLASSES = ["astronaut", "cat", "coffee", "temple", "rocket"]
TEMPLATES = ["a photo of a {}.", "a close-up photo of the {c}."]


@pytest.fixture(scope="module")
def clip():
    return load_zero_shot_model("clip", "cls-tiny-clip", "random", device="cpu")


@pytest.fixture(scope="module")
def siglip():
    model = load_zero_shot_model("siglip", "cls-tiny-siglip", "random", device="cpu", seed=1)
    with torch.no_grad():  # SigLIP-like scale and bias, so confidences spread
        model.logit_scale.fill_(30.0)
        model.logit_bias.fill_(-0.5)
    return model


def _embed(model, photos):
    return model.encode_images(torch.stack([model.preprocess(p) for p in photos]))


def test_models_satisfy_the_protocol(clip, siglip):
    for model in (clip, siglip):
        assert isinstance(model, ZeroShotModel)
        assert isinstance(model.info, ModelInfo) and model.device == torch.device("cpu")
        assert model.image_size == 64


def test_clip_scores_are_a_softmax_over_classes(clip, photos):
    images, text = _embed(clip, photos), clip.text_embeddings(CLASSES, TEMPLATES)
    scores = clip.scores(images, text)
    assert scores.shape == (len(photos), len(CLASSES)) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.sum(dim=-1), torch.ones(len(photos)))
    expected = (clip.logit_scale * images @ text.T).softmax(dim=-1)
    torch.testing.assert_close(scores, expected)
    # Softmax couples classes: dropping one changes the others.
    fewer = clip.scores(images, clip.text_embeddings(CLASSES[:3], TEMPLATES))
    assert not torch.allclose(fewer, scores[:, :3])


def test_siglip_scores_are_independent_sigmoids(siglip, photos):
    images, text = _embed(siglip, photos), siglip.text_embeddings(CLASSES, TEMPLATES)
    scores = siglip.scores(images, text)
    expected = torch.sigmoid(siglip.logit_scale * images @ text.T + siglip.logit_bias)
    torch.testing.assert_close(scores, expected)
    assert ((scores > 0) & (scores < 1)).all()
    assert not torch.allclose(scores.sum(dim=-1), torch.ones(len(photos)), atol=1e-2)
    # Each class's confidence does not depend on which other classes are asked about.
    alone = siglip.scores(images, siglip.text_embeddings(CLASSES[1:2], TEMPLATES))
    torch.testing.assert_close(alone[:, 0], scores[:, 1])


def test_image_embeddings_are_normalised_float32_on_cpu(clip, siglip, photos):
    for model in (clip, siglip):
        embeddings = _embed(model, photos)
        assert embeddings.device.type == "cpu" and embeddings.dtype == torch.float32
        torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(photos)))
        with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
            model.encode_images(torch.zeros(3, 64, 64))


def test_templates_accept_both_placeholders(clip):
    assert render_prompts(["cat", "dog"], ["a {}.", "the {c}!"]) == ["a cat.", "the cat!", "a dog.", "the dog!"]
    torch.testing.assert_close(
        clip.text_embeddings(["cat"], ["a photo of a {c}."]), clip.text_embeddings(["cat"], ["a photo of a {}."])
    )
    with pytest.raises(ValueError, match="placeholder"):
        clip.text_embeddings(["cat"], ["a photo of a cat"])
    with pytest.raises(ValueError, match="class"):
        clip.text_embeddings([], TEMPLATES)
    with pytest.raises(ValueError, match="template"):
        clip.text_embeddings(["cat"], [])
    with pytest.raises(TypeError):
        clip.text_embeddings("cat", TEMPLATES)


def test_default_templates_are_open_clips_imagenet_ensemble():
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    assert len(DEFAULT_TEMPLATES) == 80
    assert all(t.count("{}") == 1 for t in DEFAULT_TEMPLATES)
    assert [t.format("zebra") for t in DEFAULT_TEMPLATES] == [f("zebra") for f in OPENAI_IMAGENET_TEMPLATES]


def test_preprocess_is_thread_safe_and_handles_other_modes(clip, siglip, photos):
    inputs = photos * 4
    for model in (clip, siglip):
        serial = [model.preprocess(p) for p in inputs]
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(model.preprocess, inputs))
        assert all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))
        for mode in ("L", "RGBA", "P"):
            tensor = model.preprocess(photos[1].convert(mode))
            assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32


def test_warm_up_leaves_the_cache_empty(clip):
    before = (clip.text_cache.hits, clip.text_cache.misses, len(clip.text_cache))
    warm_up(clip)
    assert (clip.text_cache.hits, clip.text_cache.misses, len(clip.text_cache)) == before


class _FakeCudaModel:
    """Encodes on a pretend CUDA device that runs out of memory above ``capacity`` images."""

    def __init__(self, capacity: int, error: type[Exception] = torch.cuda.OutOfMemoryError) -> None:
        self.device = torch.device("cuda")
        self.capacity = capacity
        self.error = error
        self.batches: list[int] = []

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.batches.append(pixels.shape[0])
        if pixels.shape[0] > self.capacity:
            raise self.error("CUDA out of memory. Tried to allocate 1 GiB")
        return pixels.flatten(1)[:, :4].clone()


def test_adaptive_encoding_halves_the_batch_on_oom():
    pixels = torch.arange(10 * 3 * 2 * 2, dtype=torch.float32).reshape(10, 3, 2, 2)
    model = _FakeCudaModel(capacity=3)
    out = encode_images_adaptive(model, pixels)
    torch.testing.assert_close(out, pixels.flatten(1)[:, :4])  # same rows, same order
    assert model.batches[:3] == [10, 5, 3] and max(b for b in model.batches if b <= 3) == 3


def test_adaptive_encoding_gives_up_at_one_image_and_on_other_errors():
    with pytest.raises(torch.cuda.OutOfMemoryError):
        encode_images_adaptive(_FakeCudaModel(capacity=0), torch.zeros(4, 3, 2, 2))
    other = _FakeCudaModel(capacity=0, error=ValueError)
    with pytest.raises(ValueError):
        encode_images_adaptive(other, torch.zeros(4, 3, 2, 2))
    assert other.batches == [4]


def test_adaptive_encoding_on_cpu_is_a_plain_call(clip, photos):
    pixels = torch.stack([clip.preprocess(p) for p in photos])
    assert torch.equal(encode_images_adaptive(clip, pixels), clip.encode_images(pixels))
