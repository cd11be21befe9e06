"""Zero-shot models reproduce the reference implementations on the same random weights.

CLIP is compared with open_clip's own pipeline (``create_model_and_transforms`` loading the same
safetensors file, ``build_zero_shot_classifier``, ``encode_image``, softmax); SigLIP with
transformers (``SiglipImageProcessor`` + ``SiglipModel(input_ids=..., pixel_values=...)``, sigmoid).
Images are real photos shipped by scikit-image and scikit-learn.
"""

from __future__ import annotations

import math

import open_clip
import torch

from ml.siglip import siglip_config
from ml.weights import save_state_dict
from schemas.defaults import DEFAULT_CLIP_VARIANT, DEFAULT_SIGLIP_VARIANT
from ml.backbones import load_zero_shot_model
from tests.fixtures.zeroshot import _few_threads, photos  # noqa: F401  (fixtures)

TOLERANCE = 1e-4
CLASSES = ["astronaut", "cat", "coffee cup", "palace"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {c}.", "a drawing of a {}."]


def _clip_checkpoint(variant: str, path, seed: int = 7):
    torch.manual_seed(seed)
    model = open_clip.create_model(variant, pretrained=None)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # peaky softmax: a stronger comparison than ~uniform
    return save_state_dict(model, path)


def _open_clip_reference(variant: str, weights_file, photos, classes, templates):
    model, _, preprocess = open_clip.create_model_and_transforms(variant, pretrained=str(weights_file))
    model.eval()
    tokenizer = open_clip.get_tokenizer(variant)
    format_templates = [t.replace("{c}", "{}") for t in templates]
    pixels = torch.stack([preprocess(p) for p in photos])
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, classes, format_templates, device="cpu")
        features = model.encode_image(pixels, normalize=True)
        probs = (model.logit_scale.exp() * features @ classifier).softmax(dim=-1)
    return pixels, features, classifier.T, probs


def _check_clip(variant: str, tmp_path, photos) -> None:
    weights_file = _clip_checkpoint(variant, tmp_path / f"{variant}.safetensors")
    ref_pixels, ref_features, ref_text, ref_probs = _open_clip_reference(
        variant, weights_file, photos, CLASSES, TEMPLATES
    )

    model = load_zero_shot_model("clip", variant, str(weights_file), device="cpu")
    pixels = torch.stack([model.preprocess(p) for p in photos])
    assert torch.equal(pixels, ref_pixels)  # exactly open_clip's eval transform
    images = model.encode_images(pixels)
    text = model.text_embeddings(CLASSES, TEMPLATES)
    probs = model.scores(images, text)

    torch.testing.assert_close(images, ref_features, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(text, ref_text, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(probs, ref_probs, atol=TOLERANCE, rtol=0)
    assert model.image_size == ref_pixels.shape[-1]


def test_clip_default_variant_matches_open_clip(tmp_path, photos):
    _check_clip(DEFAULT_CLIP_VARIANT, tmp_path, photos)


def test_tiny_clip_matches_open_clip(tmp_path, photos):
    _check_clip("cls-tiny-clip", tmp_path, photos)


def test_tiny_siglip_matches_transformers(tmp_path, photos):
    from transformers import SiglipImageProcessor, SiglipModel

    from ml.siglip import bundled_bpe_tokenizer

    config = siglip_config("cls-tiny-siglip", vocab_size=49408)
    torch.manual_seed(11)
    reference = SiglipModel(config).eval()
    with torch.no_grad():
        reference.logit_scale.fill_(math.log(30.0))
        reference.logit_bias.fill_(-1.5)
    weights_file = save_state_dict(reference, tmp_path / "tiny-siglip.safetensors")

    template = "a photo of a {}."
    processor = SiglipImageProcessor(size={"height": 64, "width": 64})
    ref_pixels = processor(images=photos, return_tensors="pt")["pixel_values"]
    input_ids = bundled_bpe_tokenizer()(
        [template.format(c) for c in CLASSES], padding="max_length", max_length=64, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        ref_probs = torch.sigmoid(reference(input_ids=input_ids, pixel_values=ref_pixels).logits_per_image)

    model = load_zero_shot_model("siglip", "cls-tiny-siglip", str(weights_file), device="cpu")
    pixels = torch.stack([model.preprocess(p) for p in photos])
    assert torch.equal(pixels, ref_pixels)  # exactly SiglipImageProcessor
    probs = model.scores(model.encode_images(pixels), model.text_embeddings(CLASSES, [template]))
    torch.testing.assert_close(probs, ref_probs, atol=TOLERANCE, rtol=0)
    assert probs.std() > 0.01  # the comparison is not between constants


def test_siglip_preprocess_matches_processor_at_other_sizes(photos):
    from transformers import SiglipImageProcessor

    from ml.siglip import SiglipPreprocess

    for size in (224, 384):
        processor = SiglipImageProcessor(size={"height": size, "width": size})
        expected = processor(images=photos[:2], return_tensors="pt")["pixel_values"]
        transform = SiglipPreprocess(processor)
        assert torch.equal(torch.stack([transform(p) for p in photos[:2]]), expected)


def test_siglip_default_variant_architecture_is_base_patch16_224():
    from transformers import SiglipConfig

    defaults = SiglipConfig()
    config = siglip_config(DEFAULT_SIGLIP_VARIANT)
    for section in ("text_config", "vision_config"):
        ours, theirs = getattr(config, section).to_dict(), getattr(defaults, section).to_dict()
        keys = [k for k in theirs if k not in ("_name_or_path", "transformers_version", "dtype")]
        assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}, section
