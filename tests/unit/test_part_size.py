"""Result parts fit their byte budget whatever each image's outcome (events always fit)."""

from __future__ import annotations

import pytest

from handlers.parts import part_size_for
from schemas.annotation import (
    MAX_IMAGE_ERROR_CHARS,
    AnnotationRequest,
    AnnotationResult,
    ImageResult,
    ModelDescriptor,
    Prediction,
)
from schemas.common import ErrorInfo

BUDGET = 512 * 1024


def worst_part(request: AnnotationRequest, n: int, classes: list[str], outcome: str) -> AnnotationResult:
    top_k = min(request.top_k, len(classes))
    results = []
    for image in request.images[:n]:
        if outcome == "error":  # an image host's 8 KB reason phrase of characters JSON must escape
            results.append(ImageResult(id=image.id, error=ErrorInfo(code="http_status", message='"\\' * 4096)))
        else:
            results.append(ImageResult(id=image.id, margin=-0.123456789012345,
                                       predictions=[Prediction(class_name=c, confidence=0.123456789012345)
                                                    for c in classes[:top_k]]))
    return AnnotationResult(message_id="m" * 36, request_id=request.request_id or "r", status="completed",
                            model=ModelDescriptor(family="clip", variant="ViT-B-32", weights="laion2b_s34b_b79k"),
                            results=results, part=0, parts=1)


@pytest.mark.parametrize("outcome", ["error", "predictions"])
@pytest.mark.parametrize("id_char,class_char", [("x", "c"), ("\x02", "\u00e9"), ("\U0001f600", "\x03")])
def test_worst_case_part_fits_the_budget(outcome, id_char, class_char):
    classes = [class_char * 150 + str(i) for i in range(40)]
    request = AnnotationRequest.model_validate({
        "task": "classify", "model": "clip", "request_id": "r", "classes": classes, "top_k": 40,
        "images": [{"id": id_char * 200 + str(i), "url": f"https://example.com/{i}.jpg"} for i in range(2000)],
    })
    n = part_size_for(request, 500, classes, BUDGET)
    assert 1 <= n < 500
    size = len(worst_part(request, n, classes, outcome).to_json_bytes())
    assert size <= BUDGET, (n, size)


def test_small_requests_keep_the_configured_part_size():
    request = AnnotationRequest.model_validate({
        "task": "classify", "model": "clip", "request_id": "r", "classes": ["cat", "dog"], "top_k": 2,
        "images": [{"id": f"img-{i}", "url": f"https://example.com/{i}.jpg"} for i in range(600)],
    })
    assert part_size_for(request, 500, ["cat", "dog"], BUDGET) == 500
    part = worst_part(request, 500, ["cat", "dog"], "error")
    assert len(part.to_json_bytes()) <= BUDGET


def test_a_long_image_error_message_is_cut_when_stored():
    result = ImageResult(id="a", error=ErrorInfo(code="http_status", message="R" * 8192))
    assert len(result.error.message) == MAX_IMAGE_ERROR_CHARS
    assert result.error.message.endswith("...")
    odd = ImageResult(id="c", error=ErrorInfo(code="http_status", message="bad\x01\u00e9\"\\"))
    assert odd.error.message == 'bad??"\\'
    short = ImageResult(id="b", error=ErrorInfo(code="fetch_failed", message="connection refused"))
    assert short.error.message == "connection refused"


@pytest.mark.parametrize("class_char", ["c", "\x03", "\U0001f600"])
def test_worst_case_few_shot_part_fits_the_budget(class_char):
    """The few-shot summary is in every part: part_size_for counts it, from the classes, so a part still fits."""
    from handlers.fewshot import summary_bytes
    from schemas.annotation import FewShotSummary

    classes = [class_char * 190 + str(i) for i in range(300)]
    request = AnnotationRequest.model_validate({
        "task": "classify", "model": "custom", "model_url": "s3://b/m", "request_id": "r", "classes": classes,
        "top_k": 5, "examples": [{"url": "https://example.com/e.jpg", "label": c} for c in classes],
        "images": [{"id": "\x02" * 200 + str(i), "url": f"https://example.com/{i}.jpg"} for i in range(2000)]})
    n = part_size_for(request, 500, classes, BUDGET, extra_envelope_bytes=summary_bytes(classes))
    assert 1 <= n < part_size_for(request, 500, classes, BUDGET)
    summary = FewShotSummary(method="logistic_regression", examples_per_class=dict.fromkeys(classes, 10_000),
                             examples_failed=10_000, cv_accuracy=0.123456789012345, fitted=False)
    for outcome in ("error", "predictions"):
        part = worst_part(request, n, classes, outcome).model_copy(update={"few_shot": summary})
        assert len(part.to_json_bytes()) <= BUDGET, (n, outcome)
