"""cls_client: requests built and validated as the workers validate them, records as the workers expect them,
events read as the reference fold reads them."""

from __future__ import annotations

import json
import uuid

import pytest

from cls_client import (
    EventProgress,
    InvalidEvent,
    InvalidRequest,
    UnfoldableEvent,
    build_request,
    check_storable,
    encode_request,
    parse_event,
    read_event,
)
from schemas import AnnotationResult, TrainingStatus
from schemas.annotation import ImageResult, ModelDescriptor, Prediction

README_REQUEST = {"task": "classify", "model": "clip", "images": [{"id": "a", "url": "s3://datasets/a.jpg"}],
                  "classes": ["cat", "dog"]}


def test_the_readme_request_is_valid_and_gets_an_id_and_its_record():
    request = build_request(README_REQUEST)
    uuid.UUID(request.request_id)  # a new UUID: the key to follow
    assert request.top_k_for(2) == 2  # default 3, clamped to the 2 classes
    record = encode_request({**README_REQUEST, "request_id": "req-1"})
    assert record.topic == "cls.annotation.requests" and record.key == b"req-1"
    assert dict(record.headers) == {"content-type": b"application/json", "request-id": b"req-1"}
    body = json.loads(record.value)
    assert body == {**README_REQUEST, "request_id": "req-1"}  # what the caller set, nothing invented


def test_training_and_cancel_go_to_their_topics_keyed_by_job_id():
    train = {"task": "train", "job_id": "job-1", "output_path": "s3://models/job-1",
             "config": {"model_name": "resnet10t", "num_classes": 2},
             "dataset": {"train_urls": ["s3://d/cat/1.jpg", "s3://d/dog/1.jpg"], "class_names": ["cat", "dog"]}}
    record = encode_request(train)
    assert (record.topic, record.key, dict(record.headers)["job-id"]) == ("cls.training.requests", b"job-1", b"job-1")
    cancel = encode_request({"task": "cancel", "job_id": "job-1"})
    assert cancel.topic == "cls.training.control" and cancel.key == b"job-1"
    assert encode_request(train, topic="other.topic").topic == "other.topic"


@pytest.mark.parametrize("change, loc", [({"classes": []}, "classes"), ({"top_k": 0}, "top_k"),
                                         ({"images": [{"id": "a", "url": "ftp://x/1"}]}, "images.0.url")])
def test_an_invalid_request_names_its_fields(change, loc):
    with pytest.raises(InvalidRequest) as err:
        build_request({**README_REQUEST, **change})
    assert loc in {d.loc for d in err.value.details} and loc in str(err.value)


def test_an_unknown_task_is_refused():
    with pytest.raises(InvalidRequest, match="unknown task"):
        build_request({**README_REQUEST, "task": "paint"})


def result_part(part: int, parts: int, status: str = "completed") -> AnnotationResult:
    if status == "failed":
        return AnnotationResult.model_validate({"request_id": "r", "message_id": "m-f", "status": "failed", "part": part, "parts": parts,
                                                "error": {"code": "invalid_request", "message": "no"}})
    return AnnotationResult.completed_part(
        "r", part, parts, model=ModelDescriptor(family="clip", variant="v", weights="random"),
        results=[ImageResult(id=f"i{part}", predictions=[Prediction.model_validate({"class": "cat", "confidence": 0.9})])])


def test_events_parse_and_progress_ends_at_the_last_part():
    progress = EventProgress()
    assert not progress.add(parse_event(result_part(1, 2).to_json_bytes()))
    assert not progress.add(parse_event(result_part(1, 2).to_json_bytes()))  # a redelivered part counts once
    assert progress.add(parse_event(result_part(0, 2).to_json_bytes()))
    assert [p.part for p in progress.events] == [0, 1]
    assert EventProgress().add(parse_event(result_part(0, 3, "failed").to_json_bytes()))
    status = TrainingStatus.model_validate({"job_id": "j", "message_id": "m-1", "status": "running", "seq": 1, "attempt": 1})
    final = TrainingStatus.model_validate({"job_id": "j", "message_id": "m-9", "status": "completed", "seq": 9, "attempt": 1,
                                           "model_url": "s3://m/j"})
    training = EventProgress()
    assert not training.add(parse_event(status.to_json_bytes()))
    assert training.add(parse_event(final.to_json_bytes())) and len(training.events) == 2


@pytest.mark.parametrize("value", [None, b"", b"\xff", b"[1]", b'{"event_type": "annotation.result"}',
                                   b'{"message_id": "m", "event_type": "other"}', b"[" * 100_000])
def test_what_is_no_event_is_skipped_not_raised(value):
    assert read_event(value) is None
    with pytest.raises(InvalidEvent):
        parse_event(value)


def test_a_known_event_with_wrong_fields_is_an_invalid_event():
    with pytest.raises(InvalidEvent, match="annotation.result"):
        parse_event(json.dumps({"message_id": "m", "event_type": "annotation.result", "status": "maybe"}).encode())


@pytest.mark.parametrize("value", ["a\x00b", float("nan"), float("inf"), 2**63, -(2**63) - 1,
                                   {"k": [{"deep": "\x00"}]}, json.loads("[" * 70 + "]" * 70)])
def test_check_storable_rejects_what_sql_would_store_differently(value):
    with pytest.raises(UnfoldableEvent):
        check_storable(value)


def test_check_storable_accepts_ordinary_events():
    check_storable(json.loads(result_part(0, 1).to_json_bytes()))
    check_storable({"n": 2**63 - 1, "x": -1.5, "flag": True, "none": None})
