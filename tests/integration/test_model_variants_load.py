"""A message may ask for another CLIP variant: ViT-L-14 loads and answers (random weights here, no hub), its
weights resolved per variant; a SigLIP hub id off the allow-list never reaches from_pretrained."""

from __future__ import annotations

import pytest

from consumers.annotation_worker import annotation_context
from consumers.settings import KafkaSettings, Settings, WorkerSettings
from handlers.annotation import AnnotationHandler
from handlers.errors import PermanentError
from schemas.annotation import AnnotationRequest

pytestmark = pytest.mark.slow


def settings(**overrides) -> Settings:
    values = {"clip_variant": "cls-tiny-clip", "clip_weights": "random", "default_prompt_templates": "a photo of a {}.",
              "allow_private_networks": True, "preload_models": "", "device": "cpu", **overrides}
    return Settings(kafka=KafkaSettings(), worker=WorkerSettings(**values))


def request(url: str, **extra) -> AnnotationRequest:
    return AnnotationRequest.model_validate({"task": "classify", "request_id": "variants", "classes": ["cat", "dog"],
                                             "images": [{"id": "a", "url": url}], "top_k": 2, **extra})


async def test_vit_l_14_loads_and_answers(http_server):
    async with annotation_context(settings()) as ctx:
        key = ctx.model_config.key_for("clip", "ViT-L-14")
        assert (key.variant, key.weights) == ("ViT-L-14", "random")
        parts = [p async for p in AnnotationHandler(ctx).handle(
            request(http_server.urls["astronaut_jpg"], model="clip", model_variant="ViT-L-14"))]
        model = await ctx.models.get(key)
        assert model.model.module.visual.output_dim == 768  # really the large architecture
    assert parts[0].model.variant == "ViT-L-14" and parts[0].model.weights == "random"
    result = parts[0].results[0]
    assert result.error is None and len(result.predictions) == 2
    assert sum(p.confidence for p in result.predictions) == pytest.approx(1.0, abs=1e-5)


async def test_siglip_hub_id_off_the_allow_list_is_refused(http_server):
    async with annotation_context(settings(allowed_model_variants="siglip:cls-tiny-siglip")) as ctx:
        with pytest.raises(PermanentError) as err:
            [p async for p in AnnotationHandler(ctx).handle(
                request(http_server.urls["astronaut_jpg"], model="siglip", model_variant="attacker/any-repo"))]
        assert err.value.code == "model_unavailable" and "CLS_ALLOWED_MODEL_VARIANTS" in err.value.message
        assert not ctx.models._loading and not ctx.models._loaded  # nothing was loaded or fetched
