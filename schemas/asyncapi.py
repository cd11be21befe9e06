"""The AsyncAPI 3.0 document of the contract, generated from the pydantic models.

``cls-worker schemas export DIR --asyncapi docs/asyncapi.yaml`` writes it. The document describes the
workers as one application: it *receives* requests and cancels and *sends* results, status events and
dead letters. Channels are the default topic names (each is configurable in the workers' settings);
payload schemas are the JSON Schemas of ``schemas.export.json_schemas()`` (their ``$defs`` moved to
``components/schemas``); every example is built from a model instance, so it is what a worker emits
or accepts.

The YAML writer is PyYAML, imported only when the file is written (it is a dependency of timm and
transformers, and of the test extras); building the document needs pydantic only.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from schemas import topics
from schemas.annotation import (
    AnnotationRequest,
    AnnotationResult,
    AuditEntry,
    AuditRequest,
    AuditSummary,
    DuplicateGroup,
    DuplicateSignals,
    EmbedRequest,
    FewShotSpec,
    FewShotSummary,
    ImageRef,
    ImageResult,
    LabelConflict,
    LabeledExample,
    ModelDescriptor,
    Prediction,
    SelectEntry,
    SelectRequest,
    SelectSummary,
)
from schemas.codec import ANNOTATION_ADAPTER, TRAINING_ADAPTER, NotAJsonObject, decode, parse_json_object
from schemas.common import SCHEMA_VERSION, ErrorInfo
from schemas.defaults import DEFAULT_CLIP_VARIANT, DEFAULT_CLIP_WEIGHTS, DEFAULT_SIGLIP_VARIANT, DEFAULT_SIGLIP_WEIGHTS
from schemas.export import MESSAGES, json_schemas
from schemas.topics import CONTENT_TYPE_JSON, Headers
from schemas.topology import TOPOLOGY, dlq_channels
from schemas.training import (
    CancelRequest,
    Progress,
    TrainingMetrics,
    TrainingRequest,
    TrainingStatus,
    status_seq,
)

ASYNCAPI_VERSION = "3.0.0"
KAFKA_BINDING_VERSION = "0.5.0"

DLQ_ERROR_CODES = {
    "not_json_object": "the value is not a UTF-8 JSON object (or is a tombstone on a request topic)",
    "invalid_no_id": "a JSON object that fails validation and names no request/job (no id in the body, no key)",
    "invalid_cancel": "a JSON object on the control topic that is not a valid cancel (wrong types, another task, no job)",
    "invalid_id": "the id in the body is not valid Unicode text (an unpaired surrogate): it cannot be a key or header",
    "event_too_large": "the record's failed event would not fit CLS_MAX_RECORD_BYTES either",
    "attempts_exhausted": "handling failed unexpectedly CLS_MAX_ATTEMPTS times and no failed event could be published",
    "crash_loop": "the worker process died CLS_MAX_ATTEMPTS times while handling this record (OOM kill, native crash); "
                  "after a death, records that were in flight run one at a time, alone, so only the record that "
                  "kills the worker is counted",
}
"""``dlq-error-code`` values the workers write (documented in the DLQ message's headers schema)."""

_EXAMPLE_TIME = datetime(2025, 1, 15, 9, 30, tzinfo=UTC)

HEADER_PATTERN_VERSION = r"^[0-9]+\.[0-9]+$"

INVALID_ANNOTATION_REQUEST = {
    "task": "classify",
    "model": "clip",
    "images": [{"id": "img-1", "url": "https://images.example.com/1.jpg"}],
}
"""An invalid request that names itself by its key (clip without classes): the failed-result example."""


# --------------------------------------------------------------------------------------------------
# payload schemas


def _rewrite_refs(node: Any) -> Any:
    """``#/$defs/X`` -> ``#/components/schemas/X`` (AsyncAPI resolves refs against the document root); pydantic's
    OpenAPI-style ``discriminator`` object -> AsyncAPI's property name."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                out[key] = "#/components/schemas/" + value[len("#/$defs/"):]
            elif key == "discriminator" and isinstance(value, dict) and "propertyName" in value:
                out[key] = value["propertyName"]  # AsyncAPI's discriminator is the property name (OpenAPI's is an object)
            else:
                out[key] = _rewrite_refs(value)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(item) for item in node]
    return node


def component_schemas() -> tuple[dict[str, dict], dict[str, str]]:
    """``components/schemas`` (every model and nested definition) and message name -> schema name."""
    schemas: dict[str, dict] = {}
    payload_of: dict[str, str] = {}
    for message_name, schema in json_schemas().items():
        schema = copy.deepcopy(schema)
        defs = schema.pop("$defs", {})
        schema.pop("$schema", None)
        schema.pop("$id", None)
        top_name = MESSAGES[message_name].__name__
        for name, definition in [*defs.items(), (top_name, schema)]:
            definition = _rewrite_refs(definition)
            if name in schemas and schemas[name] != definition:
                raise ValueError(f"schema name {name!r} differs between messages; rename one of the models")
            schemas[name] = definition
        payload_of[message_name] = top_name
    return dict(sorted(schemas.items())), payload_of


# --------------------------------------------------------------------------------------------------
# headers


def _string(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


def output_headers_schema(event_type: str, id_header: str) -> dict[str, Any]:
    """Headers on every produced event (DESIGN.md: event-type, schema-version, content-type, id)."""
    id_what = "request id" if id_header == Headers.REQUEST_ID else "job id"
    return {
        "type": "object",
        "description": "Set by the workers on every record they produce (values are UTF-8).",
        "required": [Headers.EVENT_TYPE, Headers.SCHEMA_VERSION, Headers.CONTENT_TYPE, id_header],
        "properties": {
            Headers.EVENT_TYPE: _string("The event type; equals the payload's event_type.", const=event_type),
            Headers.SCHEMA_VERSION: _string("MAJOR.MINOR of the contract; equals the payload's schema_version.",
                                            pattern=HEADER_PATTERN_VERSION, examples=[SCHEMA_VERSION]),
            Headers.CONTENT_TYPE: _string("Always application/json.", const=CONTENT_TYPE_JSON),
            id_header: _string(f"The {id_what}; equals the record key.", minLength=1),
        },
    }


def input_headers_schema(id_header: str) -> dict[str, Any]:
    """Headers a producer of requests may set; the workers read the key and the body, never headers."""
    id_what = "request id" if id_header == Headers.REQUEST_ID else "job id"
    return {
        "type": "object",
        "description": "Optional and informational: the workers read the record key and the JSON body only.",
        "properties": {
            Headers.CONTENT_TYPE: _string("application/json when set.", const=CONTENT_TYPE_JSON),
            Headers.SCHEMA_VERSION: _string("MAJOR.MINOR the producer speaks (the body's schema_version decides).",
                                            pattern=HEADER_PATTERN_VERSION),
            id_header: _string(f"The {id_what} (the record key is what counts).", minLength=1),
        },
    }


def dlq_headers_schema() -> dict[str, Any]:
    codes = "; ".join(f"`{code}`: {why}" for code, why in DLQ_ERROR_CODES.items())
    return {
        "type": "object",
        "description": ("The original record's headers (any dlq-* header it carried dropped), plus these five "
                        "(values are UTF-8). A dead-lettered record whose request or job id can be read (body, else "
                        "key) is also answered with a failed result/status event whose error code is the "
                        "dlq-error-code. A record too large for the DLQ topic is cut to fit: its value's head "
                        "(dlq-value-truncated: the full size), its key's head (dlq-key-truncated), the heads of its "
                        "header names and values, then as many headers as fit (dlq-headers-dropped: how many not)."),
        "required": [Headers.DLQ_ERROR_CODE, Headers.DLQ_ERROR_MESSAGE, Headers.DLQ_SOURCE_TOPIC,
                     Headers.DLQ_SOURCE_PARTITION, Headers.DLQ_SOURCE_OFFSET],
        "properties": {
            Headers.DLQ_ERROR_CODE: _string(f"Why the record was dead-lettered. {codes}.",
                                            enum=sorted(DLQ_ERROR_CODES)),
            Headers.DLQ_ERROR_MESSAGE: _string("Human-readable detail (at most 1000 characters).", maxLength=1000),
            Headers.DLQ_SOURCE_TOPIC: _string("The topic the record was read from.", minLength=1),
            Headers.DLQ_SOURCE_PARTITION: _string("Its partition (decimal).", pattern="^[0-9]+$"),
            Headers.DLQ_SOURCE_OFFSET: _string("Its offset (decimal).", pattern="^[0-9]+$"),
        },
        "additionalProperties": {"type": "string"},
    }


# --------------------------------------------------------------------------------------------------
# examples (model instances, dumped exactly as a worker would write or read them)


def _out(event: BaseModel) -> dict[str, Any]:
    return json.loads(event.to_json_bytes())  # type: ignore[attr-defined]


def _output_headers(event: AnnotationResult | TrainingStatus) -> dict[str, str]:
    id_header, entity_id = (
        (Headers.REQUEST_ID, event.request_id) if isinstance(event, AnnotationResult) else (Headers.JOB_ID, event.job_id)
    )
    return {
        Headers.EVENT_TYPE: event.event_type,
        Headers.SCHEMA_VERSION: event.schema_version,
        Headers.CONTENT_TYPE: CONTENT_TYPE_JSON,
        id_header: entity_id,
    }


def _example(name: str, summary: str, payload: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
    example: dict[str, Any] = {"name": name, "summary": summary}
    if headers:
        example["headers"] = headers
    example["payload"] = payload
    return example


def annotation_request_examples() -> list[dict[str, Any]]:
    seed = {
        "task": "classify",
        "model": "clip",
        "images": [
            {"id": "img-1", "url": "https://images.example.com/cats/1.jpg"},
            {"id": "img-2", "url": "s3://uploads/project-7/2.png"},
        ],
        "classes": ["cat", "dog", "bird"],
        "top_k": 3,
        "threshold": 0.1,
    }
    full = AnnotationRequest(
        task="classify",
        schema_version=SCHEMA_VERSION,
        message_id="backend-msg-8812",
        request_id="req-2025-0001",
        created_at=_EXAMPLE_TIME,
        model="siglip",
        model_variant=DEFAULT_SIGLIP_VARIANT,
        images=[ImageRef(id="img-1", url="https://images.example.com/cats/1.jpg"),
                ImageRef(id="img-2", url="https://images.example.com/cats/2.jpg")],
        classes=["cat", "dog", "bird"],
        top_k=2,
        threshold=0.05,
        prompt_templates=["a photo of a {}.", "a close-up photo of a {}."],
    )
    custom = AnnotationRequest(
        task="classify",
        request_id="req-2025-0002",
        model="custom",
        model_url="s3://models/job-42/",
        images=[ImageRef(id="img-9", url="https://images.example.com/9.jpg")],
        classes=["cat", "dog"],
        top_k=1,
        threshold=0.0,
    )
    return [
        _example("seed", "The backend's shape: no envelope; the record key (request id) names the request.", seed,
                 {Headers.CONTENT_TYPE: CONTENT_TYPE_JSON}),
        _example("zeroShotFull", "SigLIP zero-shot with the full envelope and custom prompt templates.",
                 full.model_dump(mode="json", by_alias=True, exclude_none=True),
                 {Headers.CONTENT_TYPE: CONTENT_TYPE_JSON, Headers.SCHEMA_VERSION: SCHEMA_VERSION,
                  Headers.REQUEST_ID: "req-2025-0001"}),
        _example("customModel", "A model trained here (its package at model_url), over a subset of its classes.",
                 custom.model_dump(mode="json", by_alias=True, exclude_none=True)),
        _example("embed", "Embeddings with a timm backbone, stored under output_path, with near-duplicates.",
                 EmbedRequest(task="embed", request_id="req-2025-0003", model="timm", model_variant="convnext_tiny",
                              images=[ImageRef(id="img-1", url="https://images.example.com/cats/1.jpg"),
                                      ImageRef(id="img-2", url="https://images.example.com/cats/1-copy.jpg")],
                              output_path="s3://embeddings/project-7", duplicates={"threshold": 0.95},
                              ).model_dump(mode="json", by_alias=True, exclude_none=True)),
        _example("fewShot", "Few-shot CLIP: the team's labeled examples adapt the zero-shot classifier (auto picks "
                            "the method by cross-validation on them).",
                 AnnotationRequest(task="classify", request_id="req-2025-0006", model="clip",
                                   images=[ImageRef(id="img-20", url="https://images.example.com/20.jpg")],
                                   classes=["cat", "dog"], top_k=2, threshold=0.0,
                                   examples=[LabeledExample(url="https://images.example.com/cats/1.jpg", label="cat"),
                                             LabeledExample(url="https://images.example.com/cats/2.jpg", label="cat"),
                                             LabeledExample(url="https://images.example.com/dogs/1.jpg", label="dog"),
                                             LabeledExample(url="https://images.example.com/dogs/2.jpg", label="dog")],
                                   few_shot=FewShotSpec(method="auto"),
                                   ).model_dump(mode="json", by_alias=True, exclude_none=True)),
        _example("fewShotManifest", "Few-shot on a timm backbone with a large support set in a JSON Lines manifest "
                                    "of {url, label}; the labels are the classes.",
                 AnnotationRequest(task="classify", request_id="req-2025-0007", model="timm",
                                   model_variant="convnext_tiny",
                                   images=[ImageRef(id="img-21", url="https://images.example.com/21.jpg")],
                                   examples_url="s3://labels/project-7/support.jsonl", top_k=1,
                                   ).model_dump(mode="json", by_alias=True, exclude_none=True)),
        _example("audit", "A label audit of a labeled set listed in a JSON Lines manifest ({id, url, label} per line).",
                 AuditRequest(task="audit", request_id="req-2025-0008", model="clip",
                              manifest_url="s3://datasets/pets/labels.jsonl", output_path="s3://audits/project-7",
                              ).model_dump(mode="json", by_alias=True, exclude_none=True)),
        _example("select", "Which 200 images of an unlabeled pool (a JSON Lines manifest of {id, url}) to label next, "
                           "given the labels so far ({id, url, label} per line); auto picks the strategy.",
                 SelectRequest(task="select", request_id="req-2025-0009", model="clip",
                               manifest_url="s3://datasets/pets/unlabeled.jsonl",
                               labeled_url="s3://datasets/pets/labels.jsonl", budget=200, strategy="auto",
                               output_path="s3://selections/project-7",
                               ).model_dump(mode="json", by_alias=True, exclude_none=True)),
    ]


def annotation_result_examples() -> list[AnnotationResult]:
    clip = ModelDescriptor(family="clip", variant=DEFAULT_CLIP_VARIANT, weights=DEFAULT_CLIP_WEIGHTS)
    completed = AnnotationResult(
        message_id=AnnotationResult.message_id_for("req-2025-0001", 0),
        request_id="req-2025-0001",
        created_at=_EXAMPLE_TIME,
        status="completed",
        model=clip,
        results=[
            ImageResult(id="img-1", margin=0.83,
                        predictions=[Prediction(class_name="cat", confidence=0.9), Prediction(class_name="dog", confidence=0.07)]),
            ImageResult(id="img-2", predictions=[],
                        error=ErrorInfo(code="fetch_failed", message="HTTP 404 for https://images.example.com/cats/2.jpg",
                                        retryable=False)),
        ],
    )
    part = AnnotationResult(
        message_id=AnnotationResult.message_id_for("req-2025-0003", 1),
        request_id="req-2025-0003",
        created_at=_EXAMPLE_TIME,
        status="completed",
        model=ModelDescriptor(family="siglip", variant=DEFAULT_SIGLIP_VARIANT, weights=DEFAULT_SIGLIP_WEIGHTS),
        results=[ImageResult(id="img-501", margin=0.41,
                             predictions=[Prediction(class_name="bird", confidence=0.62),
                                          Prediction(class_name="cat", confidence=0.21)])],
        part=1,
        parts=3,
    )
    # What the runtime publishes for a JSON object that names a request (here by its key) but is invalid.
    invalid = decode(ANNOTATION_ADAPTER, INVALID_ANNOTATION_REQUEST, "request_id", b"req-2025-0004")
    failed = AnnotationResult(
        message_id=AnnotationResult.message_id_for("req-2025-0004", "failed"),
        request_id="req-2025-0004",
        created_at=_EXAMPLE_TIME,
        status="failed",
        error=ErrorInfo(code="invalid_request", message=invalid.message, details=invalid.details, retryable=False),
    )
    embedded = AnnotationResult(
        message_id=AnnotationResult.message_id_for("req-2025-0005", 0),
        request_id="req-2025-0005",
        created_at=_EXAMPLE_TIME,
        status="completed",
        task="embed",
        model=ModelDescriptor(family="timm", variant="convnext_tiny", weights="pretrained"),
        results=[ImageResult(id="img-1"), ImageResult(id="img-2"),
                 ImageResult(id="img-3", error=ErrorInfo(code="http_status", message="HTTP 404 from https://images.example.com/3.jpg"))],
        embeddings_url="s3://embeddings/project-7/req-2025-0005/part-00000.npz",
        dim=768,
        duplicates=[DuplicateGroup(ids=["img-1", "img-2"], kind="near", similarity=0.981,
                                   signals=DuplicateSignals(hash_distance=4, cosine=0.981))],
    )
    few_shot = AnnotationResult(
        message_id=AnnotationResult.message_id_for("req-2025-0006", 0),
        request_id="req-2025-0006",
        created_at=_EXAMPLE_TIME,
        status="completed",
        model=clip,
        results=[ImageResult(id="img-20", margin=0.64,
                             predictions=[Prediction(class_name="dog", confidence=0.82),
                                          Prediction(class_name="cat", confidence=0.18)])],
        few_shot=FewShotSummary(method="linear_probe", examples_per_class={"cat": 2, "dog": 2}, examples_failed=0,
                                cv_accuracy=1.0, fitted=True),
    )
    audited = AnnotationResult(
        message_id=AnnotationResult.message_id_for("req-2025-0008", 0),
        request_id="req-2025-0008",
        created_at=_EXAMPLE_TIME,
        status="completed",
        task="audit",
        model=clip,
        results=[ImageResult(id="img-7", audit=AuditEntry(label="cat", label_probability=0.031, label_issue=True,
                                                          suggested_label="dog", suggested_probability=0.952,
                                                          issue_score=0.969, outlier_score=0.212, rank=0)),
                 ImageResult(id="img-3", audit=AuditEntry(label="dog", label_probability=0.88, label_issue=False,
                                                          suggested_label="dog", suggested_probability=0.88,
                                                          issue_score=0.12, outlier_score=0.18, rank=1)),
                 ImageResult(id="img-9", error=ErrorInfo(code="http_status", message="HTTP 404 from https://images.example.com/9.jpg"))],
        embeddings_url="s3://audits/project-7/req-2025-0008/embeddings.npz",
        dim=512,
        audit_url="s3://audits/project-7/req-2025-0008/audit.csv",
        audit_summary=AuditSummary(images=3, audited=2, label_issues=1, label_conflicts=1, classes=2, folds=2,
                                   cv_accuracy=0.5),
        label_conflicts=[LabelConflict(ids=["img-7", "img-3"], labels=["cat", "dog"], similarity=0.991)],
    )
    selected = AnnotationResult(
        message_id=AnnotationResult.message_id_for("req-2025-0009", 0),
        request_id="req-2025-0009",
        created_at=_EXAMPLE_TIME,
        status="completed",
        task="select",
        model=clip,
        selection=[SelectEntry(id="img-412", rank=0, score=0.962, reason="uncertain",
                               predicted=Prediction(class_name="cat", confidence=0.51)),
                   SelectEntry(id="img-77", rank=1, score=0.948, reason="uncertain",
                               predicted=Prediction(class_name="dog", confidence=0.49))],
        results=[ImageResult(id="img-5", error=ErrorInfo(code="http_status", message="HTTP 404 from https://images.example.com/5.jpg"))],
        selection_url="s3://selections/project-7/req-2025-0009/selection.csv",
        dim=512,
        select_summary=SelectSummary(strategy="diverse_margin", requested_strategy="auto", pool=3, embedded=2,
                                     candidates=2, labeled=120, labeled_failed=0, classes=2, selected=2,
                                     cv_accuracy=0.917),
    )
    return [completed, part, failed, embedded, few_shot, audited, selected]


def training_request_examples() -> list[dict[str, Any]]:
    seed = {
        "task": "train",
        "config": {"model_name": "convnext_tiny", "num_classes": 2, "epochs": 10, "batch_size": 32,
                   "learning_rate": 0.0001, "augmentation": "light"},
        "dataset": {
            "train_urls": ["s3://datasets/pets/train/cat/0001.jpg", "s3://datasets/pets/train/dog/0001.jpg"],
            "val_urls": ["s3://datasets/pets/val/cat/0101.jpg", "s3://datasets/pets/val/dog/0101.jpg"],
            "class_names": ["cat", "dog"],
        },
        "output_path": "s3://models/job-42",
    }
    full = TrainingRequest.model_validate({
        "task": "train",
        "schema_version": SCHEMA_VERSION,
        "job_id": "job-43",
        "created_at": _EXAMPLE_TIME.isoformat(),
        "config": {"model_name": "resnet18", "num_classes": 3, "epochs": 20, "batch_size": 64, "learning_rate": 0.0003,
                   "augmentation": "medium", "pretrained": True, "image_size": 224, "early_stopping_patience": 4,
                   "seed": 7},
        "dataset": {
            "train_urls": [{"url": "https://data.example.com/a.jpg", "label": "cat"},
                           {"url": "https://data.example.com/b.jpg", "label": "dog"},
                           {"url": "https://data.example.com/c.jpg", "label": "bird"}],
            "class_names": ["cat", "dog", "bird"],
        },
        "output_path": "s3://models/job-43",
    })
    return [
        _example("seed", "The backend's shape: no envelope; the record key (job id) names the job.", seed),
        _example("labeledUrls", "Labeled URLs, validation split taken from train, envelope fields set.",
                 full.model_dump(mode="json", by_alias=True, exclude_none=True),
                 {Headers.CONTENT_TYPE: CONTENT_TYPE_JSON, Headers.JOB_ID: "job-43"}),
    ]


def _status(job_id: str, status: str, *, epoch: int = 0, step: int | None = None, **fields: Any) -> TrainingStatus:
    return TrainingStatus(message_id=TrainingStatus.message_id_for(job_id, status, epoch, step), job_id=job_id,
                          status=status, seq=status_seq(status, epoch, step), created_at=_EXAMPLE_TIME, **fields)  # type: ignore[arg-type]


def training_status_examples() -> list[TrainingStatus]:
    return [
        _status("job-42", "queued"),
        _status("job-42", "running", epoch=3, step=120, heartbeat=True,
                progress=Progress(epoch=3, epochs=10, step=120, steps=400,
                                  metrics={"train_loss": 0.412, "lr": 0.0001, "images_per_s": 812.5})),
        _status("job-42", "running", epoch=3,
                progress=Progress(epoch=3, epochs=10,
                                  metrics={"train_loss": 0.388, "val_loss": 0.301, "val_accuracy": 0.912})),
        _status("job-42", "completed", metrics=TrainingMetrics(train_loss=0.12, val_accuracy=0.964, best_epoch=8),
                model_url="s3://models/job-42"),
        _status("job-44", "failed", attempt=2,
                error=ErrorInfo(code="dataset_unusable", message="41 of 500 images could not be used (max 5%)",
                                retryable=False)),
        _status("job-45", "cancelled", error=ErrorInfo(code="cancelled", message="cancelled by the user")),
    ]


def cancel_examples() -> list[dict[str, Any]]:
    full = CancelRequest(task="cancel", job_id="job-42", reason="user stopped the job", created_at=_EXAMPLE_TIME)
    return [
        _example("seed", "Cancel a job (compacted topic, keyed by job id).", {"task": "cancel", "job_id": "job-42"}),
        _example("withReason", "With a reason and envelope fields.",
                 full.model_dump(mode="json", by_alias=True, exclude_none=True)),
    ]


def dead_letter_examples() -> list[dict[str, Any]]:
    not_json = b"classify img-1 please"
    try:
        parse_json_object(not_json)
    except NotAJsonObject as exc:
        not_json_message = str(exc)
    no_id = {"task": "train", "config": {}}
    no_id_message = decode(TRAINING_ADAPTER, no_id, "job_id", None).message
    return [
        _example(
            "notJson",
            "A record on cls.annotation.requests whose value was not JSON: original bytes and headers kept.",
            not_json.decode(),
            {Headers.DLQ_ERROR_CODE: "not_json_object",
             Headers.DLQ_ERROR_MESSAGE: not_json_message,
             Headers.DLQ_SOURCE_TOPIC: topics.ANNOTATION_REQUESTS,
             Headers.DLQ_SOURCE_PARTITION: "3",
             Headers.DLQ_SOURCE_OFFSET: "1187"},
        ),
        _example(
            "noId",
            "A JSON object without an id and without a key: nobody to tell, so it is dead-lettered.",
            no_id,
            {Headers.DLQ_ERROR_CODE: "invalid_no_id",
             Headers.DLQ_ERROR_MESSAGE: no_id_message,
             Headers.DLQ_SOURCE_TOPIC: topics.TRAINING_REQUESTS,
             Headers.DLQ_SOURCE_PARTITION: "0",
             Headers.DLQ_SOURCE_OFFSET: "12"},
        ),
    ]


def _output_examples(events: list[AnnotationResult] | list[TrainingStatus], summaries: list[str]) -> list[dict]:
    return [
        _example(f"{e.status}{'Heartbeat' if getattr(e, 'heartbeat', None) else ''}"
                 f"{'Part' + str(e.part) if isinstance(e, AnnotationResult) and e.parts > 1 else ''}",
                 summary, _out(e), _output_headers(e))
        for e, summary in zip(events, summaries, strict=True)
    ]


# --------------------------------------------------------------------------------------------------
# the document


def _kafka_key(what: str) -> dict[str, Any]:
    return {"kafka": {"key": {"type": "string", "description": what}, "bindingVersion": KAFKA_BINDING_VERSION}}


def _messages(payload_of: dict[str, str]) -> dict[str, dict[str, Any]]:
    def ref(message_name: str) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{payload_of[message_name]}"}

    annotation_results = _output_examples(annotation_result_examples(), [
        "Part 0 of 1: one image classified (CLIP softmax over the classes), one image failed alone.",
        "Part 1 of 3 of a large request: images at request positions [N, 2N).",
        "The whole request could not run: invalid_request with the validation errors.",
        "An embed result: the part's vectors at embeddings_url (ids + float16 embeddings), duplicate groups in the last part.",
        "A few-shot result: which method ran, the examples per class it learned from, its cross-validated accuracy.",
        "An audit result (its only part): entries in review order (highest issue_score first, failed images last), "
        "the whole table at audit_url, label conflicts in the last part.",
        "A selection (its only part): the images to label next in rank order, the head's guess for each, the failed "
        "pool image last; the whole selection at selection_url.",
    ])
    training_statuses = _output_examples(training_status_examples(), [
        "The job was accepted (seq 0).",
        "In-epoch heartbeat: progress only, may be folded loosely.",
        "End of an epoch: its checkpoint is stored beside output_path.",
        "Done: metrics and the model package's URL.",
        "Failed on a redelivery (attempt 2).",
        "Cancelled on the control topic.",
    ])
    return {
        "annotationRequest": {
            "name": "annotation-request",
            "title": "Annotation request",
            "summary": "Classify images by URL (task classify: clip, siglip, custom; few-shot with labeled examples, also "
                       "timm), embed them (task embed: clip, siglip, custom, timm), audit their labels (task audit: "
                       "the embed backbones) or pick the ones to label next (task select: the embed backbones).",
            "description": (AnnotationRequest.__doc__ or "").strip() + "\n\n" + _module_doc(AnnotationRequest)
                           + "\n\n" + (EmbedRequest.__doc__ or "").strip()
                           + "\n\n" + (AuditRequest.__doc__ or "").strip()
                           + "\n\n" + (SelectRequest.__doc__ or "").strip(),
            "contentType": CONTENT_TYPE_JSON,
            "headers": input_headers_schema(Headers.REQUEST_ID),
            "payload": ref("annotation-request"),
            "bindings": _kafka_key("The request id (UTF-8); used when the body has no request_id."),
            "examples": annotation_request_examples(),
        },
        "annotationResult": {
            "name": "annotation-result",
            "title": "Annotation result",
            "summary": "Predictions per image, in one or more parts; or the whole request's failure.",
            "description": (AnnotationResult.__doc__ or "").strip(),
            "contentType": CONTENT_TYPE_JSON,
            "headers": output_headers_schema("annotation.result", Headers.REQUEST_ID),
            "payload": ref("annotation-result"),
            "correlationId": {"$ref": "#/components/correlationIds/requestId"},
            "bindings": _kafka_key("The request id (UTF-8)."),
            "examples": annotation_results,
        },
        "trainingRequest": {
            "name": "training-request",
            "title": "Training request",
            "summary": "Fine-tune a timm classifier on labeled image URLs; the package goes to output_path.",
            "description": (TrainingRequest.__doc__ or "").strip() + "\n\n" + _module_doc(TrainingRequest),
            "contentType": CONTENT_TYPE_JSON,
            "headers": input_headers_schema(Headers.JOB_ID),
            "payload": ref("training-request"),
            "bindings": _kafka_key("The job id (UTF-8); used when the body has no job_id."),
            "examples": training_request_examples(),
        },
        "trainingStatus": {
            "name": "training-status",
            "title": "Training status",
            "summary": "queued -> running (progress, heartbeats) -> completed | failed | cancelled.",
            "description": (TrainingStatus.__doc__ or "").strip() + "\n\n" + _module_doc(TrainingStatus),
            "contentType": CONTENT_TYPE_JSON,
            "headers": output_headers_schema("training.status", Headers.JOB_ID),
            "payload": ref("training-status"),
            "correlationId": {"$ref": "#/components/correlationIds/jobId"},
            "bindings": _kafka_key("The job id (UTF-8)."),
            "examples": training_statuses,
        },
        "trainingCancel": {
            "name": "training-cancel",
            "title": "Cancel a training job",
            "summary": "Cancel by job id; applies even when it arrives before the job or before a restart.",
            "description": (
                (CancelRequest.__doc__ or "").strip()
                + "\n\nEvery training worker reads all partitions of this compacted topic from the beginning, "
                "outside the consumer group. A tombstone (null value) for a job id retracts its cancel."
            ),
            "contentType": CONTENT_TYPE_JSON,
            "headers": input_headers_schema(Headers.JOB_ID),
            "payload": ref("training-cancel"),
            "bindings": _kafka_key("The job id (UTF-8); compaction keeps the latest record per job."),
            "examples": cancel_examples(),
        },
        "deadLetter": {
            "name": "dead-letter",
            "title": "Dead-lettered record",
            "summary": "A consumed record the workers could not attribute to any request: kept for operators.",
            "description": (
                "The original value bytes, key and headers, unchanged unless too large (so the value may not be "
                "JSON), plus the dlq-* headers saying why and where from. A JSON object that names a request but fails "
                "validation is not dead-lettered: it gets a failed result/status event with code "
                "invalid_request instead."
            ),
            "contentType": "application/octet-stream",
            "headers": dlq_headers_schema(),
            "payload": {"description": "The original record value (bytes; any content)."},
            "bindings": _kafka_key("The original record key, unchanged (may be absent)."),
            "examples": dead_letter_examples(),
        },
    }


def _module_doc(model: type) -> str:
    import sys

    return (sys.modules[model.__module__].__doc__ or "").strip()


def _channels() -> list[tuple[str, str, str, str, list[str]]]:
    """(channel id, default address, message id, description, cleanup.policy), from the topology."""
    channels = [(d.channel_id, d.default, d.message, d.description, [d.cleanup]) for d in TOPOLOGY]
    channels += [(cid, address, "deadLetter", description, ["delete"]) for cid, address, description, _ in dlq_channels()]
    return channels


def _operations() -> list[tuple[str, str, str, str]]:
    """(operation id, action, channel id, summary), from the topology."""
    operations = [(d.action + d.channel_id[0].upper() + d.channel_id[1:], d.action, d.channel_id, d.operation_summary)
                  for d in TOPOLOGY]
    operations += [("send" + cid[0].upper() + cid[1:], "send", cid, summary) for cid, _, _, summary in dlq_channels()]
    return operations


def build_asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of every topic, message, header and example of the contract."""
    schemas, payload_of = component_schemas()
    messages = _messages(payload_of)
    channels: dict[str, Any] = {}
    channel_message: dict[str, str] = {}
    for channel_id, address, message_id, description, cleanup in _channels():
        channel_message[channel_id] = message_id
        channels[channel_id] = {
            "address": address,
            "title": address,
            "description": description + " The address is the default topic name; partitions and retention "
                                         "are set by `cls-worker topics create`.",
            "messages": {message_id: {"$ref": f"#/components/messages/{message_id}"}},
            "bindings": {"kafka": {"topic": address, "topicConfiguration": {"cleanup.policy": cleanup},
                                   "bindingVersion": KAFKA_BINDING_VERSION}},
        }
    operations = {
        operation_id: {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "summary": summary,
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{channel_message[channel_id]}"}],
        }
        for operation_id, action, channel_id, summary in _operations()
    }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "cls-workers",
            "version": SCHEMA_VERSION,
            "description": (
                "Kafka GPU workers for image classification: annotation (zero-shot CLIP/SigLIP, models "
                "trained here) and training (timm fine-tuning). Every value is UTF-8 JSON, keyed by the "
                "request or job id, with headers. Delivery is at least once and message ids are "
                "deterministic (UUIDv5 of the id and the message's position), so a consumer deduplicates "
                "on message_id. Unknown input fields are ignored; the workers accept the current and the "
                "previous schema major version. Generated from the pydantic models in schemas/ "
                "(`cls-worker schemas export schemas/json --asyncapi docs/asyncapi.yaml`)."
            ),
        },
        "defaultContentType": CONTENT_TYPE_JSON,
        "servers": {
            "local": {
                "host": "127.0.0.1:19092",
                "protocol": "kafka",
                "description": "The single-node broker of deploy/local (KAFKA_BOOTSTRAP_SERVERS default).",
            },
            "production": {
                "host": "kafka.example.internal:9093",
                "protocol": "kafka-secure",
                "description": "Any cluster: KAFKA_BOOTSTRAP_SERVERS, KAFKA_SECURITY_PROTOCOL=SASL_SSL and "
                               "KAFKA_SASL_MECHANISM / _USERNAME / _PASSWORD.",
                "security": [{"$ref": "#/components/securitySchemes/saslScram512"},
                             {"$ref": "#/components/securitySchemes/saslScram256"},
                             {"$ref": "#/components/securitySchemes/saslPlain"}],
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": schemas,
            "messages": messages,
            "correlationIds": {
                "requestId": {"description": "The request id of the annotation request.",
                              "location": "$message.payload#/request_id"},
                "jobId": {"description": "The job id of the training request.",
                          "location": "$message.payload#/job_id"},
            },
            "securitySchemes": {
                "saslScram512": {"type": "scramSha512", "description": "KAFKA_SASL_MECHANISM=SCRAM-SHA-512"},
                "saslScram256": {"type": "scramSha256", "description": "KAFKA_SASL_MECHANISM=SCRAM-SHA-256"},
                "saslPlain": {"type": "plain", "description": "KAFKA_SASL_MECHANISM=PLAIN"},
            },
        },
    }


def to_yaml(document: dict[str, Any]) -> str:
    """The document as YAML, keys in document order (stable output for the committed file)."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:  # no &anchors: repeated schemas are written out
            return True

    def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
        style = "|" if "\n" in data else None  # docstrings stay readable as literal blocks
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    _Dumper.add_representer(str, _str)

    header = ("# Generated from the pydantic models in schemas/ by\n"
              "#   cls-worker schemas export schemas/json --asyncapi docs/asyncapi.yaml\n"
              "# Do not edit by hand; tests/unit/test_contract_published.py checks it is current.\n")
    return header + yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=110,
                              default_flow_style=False)


def write_asyncapi(path: str | Path) -> str:
    """Write the AsyncAPI YAML to ``path`` (parents created); returns the path written."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(to_yaml(build_asyncapi()))
    return str(target)
