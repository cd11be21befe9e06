"""Which weights a CLIP variant gets and which variants a message may ask for."""

from __future__ import annotations

import open_clip
import pytest

from handlers.errors import PermanentError
from handlers.models import parse_allowed_variants, parse_variant_weights
from testkit.configs import model_config
from ml.clip import default_pretrained_tag


def test_each_clip_variant_gets_a_tag_of_its_own():
    config = model_config()  # the defaults: ViT-B-32 with laion2b_s34b_b79k
    assert config.key_for("clip", None).weights == "laion2b_s34b_b79k"
    large = config.key_for("clip", "ViT-L-14")
    assert large.variant == "ViT-L-14" and large.weights == "laion2b_s32b_b82k"
    assert large.weights in open_clip.list_pretrained_tags_by_model("ViT-L-14")
    assert open_clip.get_pretrained_cfg("ViT-L-14", large.weights)  # a real entry of open_clip's table
    assert config.key_for("clip", "ViT-L/14").variant == "ViT-L-14"  # OpenAI spelling
    # any variant with a tag in open_clip's table gets one; the configured tag wins where the variant has it
    assert config.key_for("clip", "RN50").weights == "openai" == default_pretrained_tag("RN50")
    assert model_config(clip_weights="openai").key_for("clip", "ViT-L-14").weights == "openai"


def test_overrides_and_random_weights():
    config = model_config(clip_variant_weights=parse_variant_weights("ViT-L-14=s3://models/l14.safetensors, RN50=random"))
    assert config.key_for("clip", "ViT-L-14").weights == "s3://models/l14.safetensors"
    assert config.key_for("clip", "RN50").weights == "random"
    assert model_config(clip_weights="random").key_for("clip", "ViT-L-14").weights == "random"
    with pytest.raises(ValueError):
        parse_variant_weights("ViT-L-14")


def test_a_variant_without_a_known_tag_is_model_unavailable_naming_the_setting():
    config = model_config()  # cls-tiny-clip: an architecture with no entry in open_clip's pretrained table
    with pytest.raises(PermanentError) as err:
        config.key_for("clip", "cls-tiny-clip")
    assert err.value.code == "model_unavailable"
    assert "CLS_CLIP_VARIANT_WEIGHTS=cls-tiny-clip=" in err.value.message


def test_default_policy_allows_known_architectures_only():
    config = model_config(clip_weights="random")
    with pytest.raises(PermanentError) as err:
        config.key_for("siglip", "someone/any-repo-on-the-hub")  # never handed to from_pretrained
    assert err.value.code == "model_unavailable" and "CLS_ALLOWED_MODEL_VARIANTS" in err.value.message
    assert config.key_for("siglip", "google/siglip-so400m-patch14-384").variant == "google/siglip-so400m-patch14-384"
    with pytest.raises(PermanentError) as err:
        config.key_for("clip", "../../etc/passwd")
    assert err.value.code == "model_unavailable"


def test_an_explicit_allow_list():
    allowed = parse_allowed_variants("clip:ViT-L-14, siglip:acme/siglip-finetune")
    config = model_config(clip_weights="random", allowed_variants=allowed)
    assert config.key_for("clip", "ViT-L-14").variant == "ViT-L-14"
    assert config.key_for("clip", None).variant == "ViT-B-32"  # the configured default is always allowed
    assert config.key_for("siglip", "acme/siglip-finetune").variant == "acme/siglip-finetune"
    for family, variant in (("clip", "RN50"), ("siglip", "google/siglip-so400m-patch14-384")):
        with pytest.raises(PermanentError) as err:
            config.key_for(family, variant)
        assert err.value.code == "model_unavailable" and f"{family}:<variant>" in err.value.message
    assert model_config(allowed_variants=parse_allowed_variants("clip:*")).key_for("clip", "RN50").weights == "openai"
    with pytest.raises(ValueError):
        parse_allowed_variants("ViT-L-14")


@pytest.mark.parametrize("variant", ["ViT-bigG-14", "ViT-H-14", "EVA02-E-14", "ViT-gopt-16-SigLIP2-384"])
def test_the_default_allow_list_refuses_architectures_a_worker_cannot_hold(variant):
    """Multi-GB downloads and up to ~20 GB allocated: only by setting (clip:<variant> or clip:*)."""
    with pytest.raises(PermanentError) as err:
        model_config(clip_weights="random").key_for("clip", variant)
    assert err.value.code == "model_unavailable" and "CLS_ALLOWED_MODEL_VARIANTS=clip:<variant>" in err.value.message
    allowed = model_config(clip_weights="random", allowed_variants=parse_allowed_variants(f"clip:{variant}"))
    assert allowed.key_for("clip", variant).variant == variant


@pytest.mark.parametrize("variant", ["RN50", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "convnext_base_w"])
def test_the_default_allow_list_admits_the_usual_sizes(variant):
    assert model_config(clip_weights="random").key_for("clip", variant).variant == variant
