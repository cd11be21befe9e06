"""``"model": "custom"``: a package trained here, loaded from S3 by the annotation handler, predicts
exactly what the in-memory model did; a class subset renormalises; unknown classes are a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from consumers.annotation_worker import annotation_context
from consumers.settings import KafkaSettings, Settings, WorkerSettings
from examples.fold import Fold
from handlers.annotation import AnnotationHandler
from handlers.errors import PermanentError
from ml.trained import TrainedModel
from schemas.annotation import AnnotationRequest
from testkit.handler_calls import upload_package

pytestmark = pytest.mark.s3


async def test_custom_model_matches_in_memory_predictions(trained_digits, s3_server, s3_bucket, http_server, tmp_path):
    model_url = await upload_package(s3_server, s3_bucket, trained_digits.package_dir, "models/digits")
    test = trained_digits.test[:40]
    urls = [(f"d{i}", http_server.add(f"digits/{i}.png", Path(p).read_bytes(), content_type="image/png"))
            for i, (p, _) in enumerate(test)]
    settings = Settings(kafka=KafkaSettings(), worker=WorkerSettings(
        allow_private_networks=True, model_dir=str(tmp_path / "models"), clip_weights="random",
        clip_variant="cls-tiny-clip", s3_endpoint_url=s3_server.endpoint_url))
    reference = TrainedModel.load(trained_digits.package_dir, device="cpu")
    from PIL import Image

    pixels = torch.stack([reference.preprocess(Image.open(p).convert("RGB")) for p, _ in test])
    expected = reference.predict(pixels)
    names = trained_digits.class_names
    async with annotation_context(settings) as ctx:
        handler = AnnotationHandler(ctx)
        request = AnnotationRequest.model_validate({
            "task": "classify", "model": "custom", "model_url": model_url, "request_id": "custom-1",
            "images": [{"id": i, "url": u} for i, u in urls], "top_k": 10, "threshold": 0.0})
        parts = [p async for p in handler.handle(request)]
        assert parts[0].model.family == "custom" and parts[0].model.variant == "resnet10t"
        assert all(result.auto_accept is None for result in parts[0].results)  # not asked: not said
        correct = 0
        for (path, label), result, probs in zip(test, parts[0].results, expected, strict=True):
            got = {p.class_name: p.confidence for p in result.predictions}
            for c, name in enumerate(names):
                assert got[name] == pytest.approx(float(probs[c]), abs=1e-5)
            correct += result.predictions[0].class_name == names[label]
        assert correct / len(test) >= 0.9

        # auto-accept at a stated precision: the package's validated thresholds decide; the fold applies by them
        accepting = request.model_copy(update={"auto_accept_precision": 0.95, "request_id": "custom-accept"})
        parts = [p async for p in handler.handle(accepting)]
        decisions = [result.auto_accept for result in parts[0].results]
        assert decisions == reference.auto_accept(expected, 0.95) and any(decisions)
        right = [result.predictions[0].class_name == names[label] for (_, label), result in zip(test, parts[0].results)]
        assert sum(r for r, d in zip(right, decisions) if d) / sum(decisions) >= 0.95
        fold = Fold(tmp_path / "fold.sqlite")
        assert fold.apply("results", parts[0].to_json_bytes())
        assert fold.auto_apply("custom-accept") == sum(decisions)
        applied = dict(fold.query("SELECT image_id, class FROM applied_labels"))
        assert applied == {result.id: result.predictions[0].class_name
                           for result, d in zip(parts[0].results, decisions) if d}

        subset = ["three", "eight"]
        request = request.model_copy(update={"classes": subset, "top_k": 2, "request_id": "custom-2"})
        parts = [p async for p in handler.handle(request)]
        expected_subset = reference.predict(pixels, subset=subset)
        for result, renorm in zip(parts[0].results, expected_subset, strict=True):
            got = {p.class_name: p.confidence for p in result.predictions}
            assert got["three"] == pytest.approx(float(renorm[0]), abs=1e-5)
            assert got["eight"] == pytest.approx(float(renorm[1]), abs=1e-5)

        # top_k against the model's 10 classes (no classes in the request): unset 3, equal, larger, smaller
        for top_k, expected in ((None, 3), (10, 10), (25, 10), (2, 2)):
            body = {"task": "classify", "model": "custom", "model_url": model_url, "request_id": f"custom-topk-{top_k}",
                    "images": [{"id": i, "url": u} for i, u in urls[:2]], "threshold": 0.0}
            if top_k is not None:
                body["top_k"] = top_k
            parts = [p async for p in handler.handle(AnnotationRequest.model_validate(body))]
            assert [len(r.predictions) for r in parts[0].results] == [expected, expected], top_k
        # with a subset of 2 classes, top_k 5 means both
        parts = [p async for p in handler.handle(request.model_copy(update={"top_k": 5, "request_id": "custom-topk-s"}))]
        assert all(len(r.predictions) == 2 for r in parts[0].results)

        bad = request.model_copy(update={"classes": ["three", "cat"], "request_id": "custom-3"})
        with pytest.raises(PermanentError) as err:
            [p async for p in handler.handle(bad)]
        assert err.value.code == "invalid_request" and "cat" in err.value.message

        missing = request.model_copy(update={"model_url": f"s3://{s3_bucket}/nothing-here", "classes": None,
                                             "request_id": "custom-4"})
        with pytest.raises(PermanentError) as err:
            [p async for p in handler.handle(missing)]
        assert err.value.code == "model_unavailable"
