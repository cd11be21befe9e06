"""The event contract: the backend's seed payloads, validation rules, deterministic ids, JSON Schema."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from schemas import AnnotationRequest, AnnotationResult, CancelRequest, TrainingRequest, TrainingStatus
from schemas.codec import ANNOTATION_ADAPTER, TRAINING_ADAPTER, Invalid, NotAJsonObject, decode, parse_json_object
from schemas.export import export, json_schemas
from schemas.training import running_seq, TERMINAL_SEQ

SEED_ANNOTATION = {
    "task": "classify", "model": "clip",
    "images": [{"id": "a", "url": "https://cdn.example.com/a.jpg"}, {"id": "b", "url": "s3://bucket/b.png"}],
    "classes": ["cat", "dog", "bird"], "top_k": 3, "threshold": 0.1,
}
SEED_TRAINING = {
    "task": "train",
    "config": {"model_name": "convnext_tiny", "num_classes": 2, "epochs": 3, "batch_size": 16,
               "learning_rate": 0.0001, "augmentation": "medium"},
    "dataset": {"train_urls": ["s3://b/cat/1.jpg", {"url": "s3://b/x.jpg", "label": "dog"}], "val_urls": [],
                "class_names": ["cat", "dog"]},
    "output_path": "s3://models/job-1",
}


def test_seed_payloads_without_envelope_take_the_id_from_the_key():
    request = decode(ANNOTATION_ADAPTER, dict(SEED_ANNOTATION), "request_id", b"req-7")
    assert isinstance(request, AnnotationRequest)
    assert request.request_id == "req-7"
    job = decode(TRAINING_ADAPTER, json.loads(json.dumps(SEED_TRAINING)), "job_id", b"job-7")
    assert isinstance(job, TrainingRequest)
    assert job.job_id == "job-7"
    assert job.dataset.train_urls[1].label == "dog"


def test_body_id_wins_over_key_and_unknown_fields_are_ignored():
    body = {**SEED_ANNOTATION, "request_id": "body-id", "future_field": {"x": 1}}
    request = decode(ANNOTATION_ADAPTER, body, "request_id", b"key-id")
    assert request.request_id == "body-id"


@pytest.mark.parametrize(
    "change, loc",
    [
        ({"classes": []}, "classes"),
        ({"classes": ["a", "a"]}, "classes"),
        ({"classes": ["a", " "]}, "classes"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2001}, "top_k"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": -0.1}, "threshold"),
        ({"images": []}, "images"),
        ({"images": [{"id": "a", "url": "https://x/1"}, {"id": "a", "url": "https://x/2"}]}, "images"),
        ({"images": [{"id": "a", "url": "ftp://x/1"}]}, "images.0.url"),
        ({"images": [{"id": "a", "url": "javascript:alert(1)"}]}, "images.0.url"),
        ({"model": "custom"}, "(root)"),
        ({"prompt_templates": ["no placeholder"]}, "prompt_templates"),
        ({"schema_version": "7.0"}, "schema_version"),
    ],
)
def test_annotation_validation_names_the_field(change, loc):
    result = decode(ANNOTATION_ADAPTER, {**SEED_ANNOTATION, **change}, "request_id", b"r")
    assert isinstance(result, Invalid)
    assert result.entity_id == "r"
    assert loc in {d.loc for d in result.details}, result.details


@pytest.mark.parametrize("top_k, expected", [(None, 3), (3, 3), (4, 3), (2, 2)])
def test_top_k_above_the_class_count_is_valid_and_clamps(top_k, expected):
    """The README's request (no top_k, fewer classes than the default) is valid; the worker clamps."""
    body = {**SEED_ANNOTATION}
    body.pop("top_k")
    if top_k is not None:
        body["top_k"] = top_k
    request = decode(ANNOTATION_ADAPTER, body, "request_id", b"r")
    assert isinstance(request, AnnotationRequest), request
    assert request.top_k_for(len(request.classes)) == expected
    two = decode(ANNOTATION_ADAPTER, {**body, "classes": ["cat", "dog"]}, "request_id", b"r")
    assert isinstance(two, AnnotationRequest) and two.top_k_for(2) == min(expected, 2)


def test_bounded_image_list():
    too_many = [{"id": str(i), "url": f"https://x/{i}"} for i in range(10_001)]
    result = decode(ANNOTATION_ADAPTER, {**SEED_ANNOTATION, "images": too_many}, "request_id", b"r")
    assert isinstance(result, Invalid)


def test_previous_major_accepted():
    assert isinstance(decode(ANNOTATION_ADAPTER, {**SEED_ANNOTATION, "schema_version": "0.9"}, "request_id", b"r"), AnnotationRequest)
    assert isinstance(decode(ANNOTATION_ADAPTER, {**SEED_ANNOTATION, "schema_version": "1.3"}, "request_id", b"r"), AnnotationRequest)


@pytest.mark.parametrize(
    "mutate, loc",
    [
        (lambda b: b["config"].update(num_classes=3), "(root)"),
        (lambda b: b["dataset"].update(class_names=["cat", "cat"]), "dataset.class_names"),
        (lambda b: b.update(output_path="https://x/y"), "output_path"),
        (lambda b: b["config"].update(augmentation="extreme"), "config.augmentation"),
        (lambda b: b["dataset"].update(train_urls=[]), "dataset"),
        (lambda b: b["config"].update(epochs=0), "config.epochs"),
    ],
)
def test_training_validation(mutate, loc):
    body = json.loads(json.dumps(SEED_TRAINING))
    mutate(body)
    result = decode(TRAINING_ADAPTER, body, "job_id", None)
    assert isinstance(result, Invalid)
    assert result.entity_id is None
    assert loc in {d.loc for d in result.details}, result.details


def test_not_json_object():
    for raw in (b"\xff\x00", b"[1]", b"42", b"null", None, b"{bad"):
        with pytest.raises(NotAJsonObject):
            parse_json_object(raw)


def test_result_serialisation_uses_backend_names_and_deterministic_ids():
    a = AnnotationResult.message_id_for("r1", 0)
    assert a == AnnotationResult.message_id_for("r1", 0)
    assert a != AnnotationResult.message_id_for("r1", 1)
    result = AnnotationResult.model_validate({
        "message_id": a, "request_id": "r1", "status": "completed",
        "model": {"family": "clip", "variant": "ViT-B-32", "weights": "random"},
        "results": [{"id": "x", "predictions": [{"class": "cat", "confidence": 0.9}]}],
    })
    body = json.loads(result.to_json_bytes())
    assert body["results"][0]["predictions"][0] == {"class": "cat", "confidence": 0.9}
    assert body["schema_version"] == "1.0" and body["event_type"] == "annotation.result"
    s1 = TrainingStatus.message_id_for("j", "running", 2)
    assert s1 == TrainingStatus.message_id_for("j", "running", 2) != TrainingStatus.message_id_for("j", "running", 3)
    assert running_seq(1) < running_seq(2, 0) < running_seq(2, 5) < running_seq(2) < TERMINAL_SEQ


def test_cancel_shape():
    cancel = CancelRequest.model_validate({"task": "cancel", "job_id": "j1"})
    assert cancel.job_id == "j1"
    with pytest.raises(ValidationError):
        CancelRequest.model_validate({"task": "train", "job_id": "j1"})


def test_json_schema_export(tmp_path):
    paths = export(tmp_path)
    assert {p.name for p in paths} == {f"{n}.json" for n in json_schemas()}
    schema = json.loads((tmp_path / "annotation-result.json").read_text())
    prediction = schema["$defs"]["Prediction"]
    assert "class" in prediction["properties"]


# -- prompt volume: invalid_request naming the limit, counted without rendering ----------------


@pytest.mark.parametrize(
    ("change", "limit"),
    [
        ({"prompt_templates": ["{} " * 5]}, "MAX_PLACEHOLDERS_PER_TEMPLATE"),
        ({"classes": [f"class {i}" for i in range(2000)], "prompt_templates": [f"t{i} {{}}" for i in range(81)]},
         "MAX_PROMPTS"),
        ({"classes": ["x" * 190 + f"{i:04d}" for i in range(2000)], "prompt_templates": ["{} {} {} {}"] * 11},
         "MAX_PROMPT_CHARS"),
    ],
    ids=["placeholders", "prompts", "characters"],
)
def test_prompt_volume_over_a_limit_is_invalid_and_names_it(change, limit):
    result = decode(ANNOTATION_ADAPTER, {**SEED_ANNOTATION, **change}, "request_id", b"r")
    assert isinstance(result, Invalid), result
    assert limit in result.message, result.message


def test_prompt_volume_at_the_limits_is_valid():
    from schemas.annotation import MAX_PROMPT_CHARS, MAX_PROMPTS, prompt_volume_problem, rendered_prompt_chars

    classes = [f"c{i:04d}" for i in range(2000)]  # 5 characters each
    templates = [f"{{}} {i:02d} {{}} {{}} {{}}" for i in range(MAX_PROMPTS // 2000)]  # 4 placeholders, 80 templates
    body = {**SEED_ANNOTATION, "classes": classes, "prompt_templates": templates, "top_k": 3}
    assert isinstance(decode(ANNOTATION_ADAPTER, body, "request_id", b"r"), AnnotationRequest)
    assert prompt_volume_problem(classes, templates) is None
    assert "MAX_PROMPTS" in prompt_volume_problem(classes, templates + ["{}"])  # 162,000 prompts
    assert rendered_prompt_chars(classes, templates) <= MAX_PROMPT_CHARS


def test_prompt_characters_are_counted_exactly_without_rendering():
    from ml.zeroshot import render_prompts
    from schemas.annotation import rendered_prompt_chars

    classes = ["cat", "große Katze", "x" * 57, "{}"]
    templates = ["a {}.", "{c} and {c}, not {}", "{}{}{}{}", "plain {c}"]
    assert rendered_prompt_chars(classes, templates) == sum(len(p) for p in render_prompts(classes, templates))
