"""The reference fold, on SQLite and on a real PostgreSQL server (tests/fixtures/postgres.py): idempotent by
message id, never moves a job backwards, parts add up, bad events are recorded instead of crashing it, two
folds at once fold each message once, and both databases end with the same rows."""

from __future__ import annotations

import json
import threading

import pytest

from examples.fold import Fold
from schemas.common import MAX_ID_LENGTH
from schemas.training import TERMINAL_SEQ, running_seq

DATABASES = ["sqlite", "postgresql"]


def target(database: str, tmp_path, request) -> str:
    """A fresh, empty database of the given kind."""
    if database == "sqlite":
        return str(tmp_path / "f.sqlite")
    return request.getfixturevalue("postgres_url")


@pytest.fixture(params=DATABASES)
def fold(request, tmp_path):
    fold = Fold(target(request.param, tmp_path, request))
    assert fold.dialect == request.param
    yield fold
    fold.close()


def status(job: str, status: str, seq: int, mid: str, **extra) -> bytes:
    return json.dumps({"event_type": "training.status", "message_id": mid, "job_id": job, "status": status, "seq": seq,
                       "attempt": 1, "created_at": f"2026-11-27T00:00:{seq % 60:02d}Z", **extra}).encode()


def part(request: str, k: int, parts: int, mid: str) -> bytes:
    return json.dumps({"event_type": "annotation.result", "message_id": mid, "request_id": request, "status": "completed",
                       "model": {"family": "clip", "variant": "ViT-B-32", "weights": "random"}, "part": k, "parts": parts,
                       "created_at": "2026-11-27T00:00:00Z",
                       "results": [{"id": f"img-{k}", "predictions": [{"class": "cat", "confidence": 0.8},
                                                                      {"class": "dog", "confidence": 0.2}], "margin": 0.6}]}).encode()


def test_out_of_order_status_never_moves_a_job_backwards(fold):
    assert fold.apply("s", status("j", "queued", 0, "m0"))
    assert fold.apply("s", status("j", "completed", TERMINAL_SEQ, "m9", metrics={"val_accuracy": 0.9}, model_url="s3://b/m"))
    assert fold.apply("s", status("j", "running", running_seq(2), "m2", progress={"epoch": 2, "epochs": 3}))  # late
    job = fold.job("j")
    assert job["status"] == "completed" and job["metrics"] == {"val_accuracy": 0.9} and job["model_url"] == "s3://b/m"
    assert fold.apply("s", status("j", "running", running_seq(3), "m3")) and fold.job("j")["status"] == "completed"


def test_parts_and_duplicates(fold):
    assert fold.apply("r", part("r1", 1, 2, "p1"))
    assert not fold.request_complete("r1")
    assert not fold.apply("r", part("r1", 1, 2, "p1"))  # a redelivered part: same message id, skipped
    assert not fold.request_complete("r1")
    assert fold.apply("r", part("r1", 0, 2, "p0"))
    assert fold.request_complete("r1")
    assert fold.auto_apply("r1", threshold=0.5) == 2
    assert fold.auto_apply("r1", threshold=0.5) == 2  # re-applying is idempotent too
    rows = fold.query("SELECT image_id, class, confidence, source FROM applied_labels ORDER BY image_id")
    assert rows == [("img-0", "cat", 0.8, "ai"), ("img-1", "cat", 0.8, "ai")]
    assert not fold.apply("r", b"not json") and not fold.apply("r", None)


def test_auto_apply_by_the_workers_validated_auto_accept(fold):
    results = [
        {"id": "sure", "predictions": [{"class": "cat", "confidence": 0.97}], "margin": 0.95, "auto_accept": True},
        {"id": "high-but-not-validated", "predictions": [{"class": "dog", "confidence": 0.96}], "margin": 0.9,
         "auto_accept": False},
        {"id": "unsure", "predictions": [{"class": "cat", "confidence": 0.5}, {"class": "dog", "confidence": 0.4}],
         "margin": 0.1, "auto_accept": False},
    ]
    event = {"event_type": "annotation.result", "message_id": "a1", "request_id": "r", "status": "completed",
             "model": {"family": "custom", "variant": "resnet10t", "weights": "s3://b/m"}, "part": 0, "parts": 1,
             "created_at": "2026-11-27T00:00:00Z", "results": results}
    assert fold.apply("r", json.dumps(event).encode())
    assert fold.auto_apply("r") == 1  # the flag decides, not a confidence threshold
    assert fold.query("SELECT image_id, class FROM applied_labels") == [("sure", "cat")]
    assert fold.auto_apply("r", threshold=0.9) == 2  # a fixed threshold would also take the unvalidated one

    table = [{"precision": 0.9, "threshold": 0.8, "coverage": 0.9}, {"precision": 0.95, "threshold": 0.93, "coverage": 0.7},
             {"precision": 0.98, "threshold": None, "coverage": 0.0}]
    assert fold.apply("s", status("j", "completed", TERMINAL_SEQ, "m1", metrics={"auto_accept": table}))
    assert fold.auto_accept_threshold("j", 0.9) == 0.8
    assert fold.auto_accept_threshold("j", 0.92) == 0.93  # the next validated target up
    assert fold.auto_accept_threshold("j", 0.98) is None and fold.auto_accept_threshold("j", 0.999) is None


def annotation(request: str, mid: str, results: list[dict], k: int = 0, parts: int = 1) -> bytes:
    return json.dumps({"event_type": "annotation.result", "message_id": mid, "request_id": request,
                       "status": "completed", "model": {"family": "clip", "variant": "ViT-B-32", "weights": "random"},
                       "part": k, "parts": parts, "created_at": "2026-11-27T00:00:00Z", "results": results}).encode()


def test_bad_events_are_recorded_and_roll_back_whole(fold):
    good = {"id": "ok", "predictions": [{"class": "cat", "confidence": 0.5}]}
    bad = {
        "nul-in-id": annotation("r", "nul-in-id", [good, {"id": "a\x00b", "predictions": []}]),
        "nan": b'{"event_type": "annotation.result", "message_id": "nan", "request_id": "r", "status": "completed",'
               b' "created_at": "x", "results": [{"id": "ok", "predictions": [{"class": "c", "confidence": NaN}]}]}',
        "huge-seq": status("j", "running", 2**70, "huge-seq"),
        "no-request-id": b'{"event_type": "annotation.result", "message_id": "no-request-id", "status": "completed"}',
        "results-not-a-list": b'{"event_type": "annotation.result", "message_id": "results-not-a-list", "request_id": "r",'
                              b' "status": "completed", "created_at": "x", "results": 5}',
        "status-null": status("j", None, 1, "status-null"),
        "prediction-not-a-dict": annotation("r", "prediction-not-a-dict", [good, {"id": "p", "predictions": ["cat"]}]),
        # SQLite would store these in its typed columns, PostgreSQL would refuse them: both refuse
        "confidence-text": annotation("r", "confidence-text", [{"id": "c", "predictions": [{"class": "cat",
                                                                                              "confidence": "high"}]}]),
        "id-number": annotation("r", "id-number", [{"id": 7, "predictions": []}]),
        "request-id-list": annotation(["r"], "request-id-list", [good]),
        "seq-text": status("j", "running", 5, "seq-text").replace(b'"seq": 5', b'"seq": "5"'),
    }
    for mid, value in bad.items():
        assert not fold.apply("t", value), mid
        assert not fold.apply("t", value), mid  # replayed: recorded once
    rejected = fold.query("SELECT message_id, reason FROM rejected_messages ORDER BY message_id")
    assert [json.loads(m) for m, _ in rejected] == sorted(bad)
    assert all(reason for _, reason in rejected)
    # nothing of a rejected event was kept (the first, good, result of a bad part was rolled back with it)
    dump = fold.dump()
    assert all(not dump[t] for t in ("annotation_requests", "labels", "image_errors", "training_jobs", "folded_messages"))
    # not events at all: skipped without a record; the fold goes on
    for value in (b"[1]", b"null", b'{"message_id": 5, "event_type": "training.status"}', b"[" * 100_000,
                  b'{"message_id": "m", "event_type": "other"}'):
        assert not fold.apply("t", value)
    assert len(fold.query("SELECT * FROM rejected_messages")) == len(bad)
    assert fold.apply("t", annotation("r", "fine", [good])) and fold.request_complete("r")


def test_longest_and_strangest_values_round_trip_exactly(fold):
    image_id = ("é" + "😀" + "\u202e" + "'; DROP TABLE labels; --" + "?" * 40).ljust(MAX_ID_LENGTH, "z")
    class_name = ('"quoted" %s %(x)s ? ' * 10)[:200]
    results = [{"id": f"{image_id[:-6]}{i:06d}", "predictions": [{"class": class_name, "confidence": 5e-324},
                                                                  {"class": "b", "confidence": 1.0}],
                "margin": 0.1 + 0.2} for i in range(300)]
    assert fold.apply("t", annotation("r'1", "m'1", results))
    rows = fold.query("SELECT image_id, class, confidence, margin FROM labels WHERE request_id = ? AND rank = 0"
                      " ORDER BY image_id", ("r'1",))
    assert len(rows) == 300 and rows[0] == (f"{image_id[:-6]}000000", class_name, 5e-324, 0.1 + 0.2)
    assert fold.apply("s", status("j", "completed", TERMINAL_SEQ, "m2", metrics={"x": [1e308, -0.0]}))
    job = fold.job("j")
    assert job["seq"] == TERMINAL_SEQ and job["metrics"] == {"x": [1e308, -0.0]}


def stream() -> list[tuple[str, bytes]]:
    """Records as a results/status topic holds them: parts out of order, redeliveries, late heartbeats."""
    records = [("s", status("j", "queued", 0, "q")), ("s", status("j", "running", running_seq(1), "e1"))]
    for k in (2, 0, 1):
        records.append(("r", annotation("req", f"part-{k}", [
            {"id": f"img-{k}-{i}", "predictions": [{"class": "cat", "confidence": 0.5 + i / 100},
                                                    {"class": "dog", "confidence": 0.1}], "margin": 0.4}
            for i in range(5)] + [{"id": f"bad-{k}", "predictions": [], "error": {"code": "http_status",
                                                                                  "message": "HTTP 404"}}], k, 3)))
    records += [("s", status("j", "completed", TERMINAL_SEQ, "done", metrics={"val_accuracy": 0.9})),
                ("s", status("j", "running", running_seq(2), "e2"))]
    return records + records[1:4]  # redelivered


def test_both_databases_fold_a_stream_to_the_same_rows(tmp_path, postgres_url):
    sqlite, postgres = Fold(tmp_path / "f.sqlite"), Fold(postgres_url)
    for fold in (sqlite, postgres):
        folded = [fold.apply(topic, value) for topic, value in stream()]
        assert sum(folded) == 7 and fold.request_complete("req") and fold.job("j")["status"] == "completed"
        assert fold.auto_apply("req", threshold=0.52) == 9
    assert sqlite.dump() == postgres.dump()
    before = postgres.dump()
    assert not any(postgres.apply(topic, value) for topic, value in stream())  # a full replay changes nothing
    assert postgres.dump() == before
    sqlite.close(), postgres.close()


@pytest.mark.parametrize("database", DATABASES)
def test_two_folds_at_once_fold_each_message_once(database, tmp_path, request):
    where = target(database, tmp_path, request)
    parts = 200
    records = [annotation(f"req-{k % 4}", f"m-{k}", [{"id": f"i-{k}", "predictions": [
        {"class": "cat", "confidence": 0.9}]}], k // 4, parts // 4) for k in range(parts)]
    Fold(where).close()  # the schema, before two folds race to write
    counts = [0, 0]
    errors: list[BaseException] = []
    start = threading.Barrier(2, timeout=30)

    def run(i: int) -> None:  # one Fold per thread, as a Fold is thread-confined
        try:
            fold = Fold(where)
            start.wait()
            for value in (records if i == 0 else records[::-1]):
                counts[i] += fold.apply("r", value)
            fold.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert sum(counts) == parts  # each message folded exactly once, by one of the two (which one: timing)
    fold = Fold(where)
    assert sorted(fold.query("SELECT request_id, parts, parts_received FROM annotation_requests")) == [
        (f"req-{r}", parts // 4, parts // 4) for r in range(4)]
    assert len(fold.query("SELECT * FROM labels")) == len(fold.query("SELECT * FROM folded_messages")) == parts
    fold.close()


def embed_part(request: str, k: int, parts: int, mid: str, duplicates=None) -> bytes:
    results = [{"id": f"img-{k}-{i}", "predictions": []} for i in range(3)]
    results.append({"id": f"bad-{k}", "predictions": [], "error": {"code": "decode_failed", "message": "not an image"}})
    event = {"event_type": "annotation.result", "message_id": mid, "request_id": request, "status": "completed",
             "task": "embed", "model": {"family": "timm", "variant": "resnet10t", "weights": "random"}, "part": k,
             "parts": parts, "created_at": "2026-11-27T00:00:00Z", "results": results,
             "embeddings_url": f"s3://b/e/{request}/part-{k}.npz", "dim": 512}
    if duplicates is not None:
        event["duplicates"] = duplicates
    return json.dumps(event).encode()


def test_embed_results_fold_their_vectors_and_duplicate_groups(fold):
    groups = [{"ids": ["img-0-0", "img-1-2"], "kind": "exact", "similarity": 1.0},
              {"ids": ["img-0-0", "img-1-2", "img-0-1", "s3://b/old/part-0.npz#x"], "kind": "near",
               "similarity": 0.9612}]
    assert fold.apply("r", embed_part("e1", 1, 2, "e1-1", duplicates=groups))  # the last part first
    assert not fold.request_complete("e1")
    assert fold.apply("r", embed_part("e1", 0, 2, "e1-0")) and fold.request_complete("e1")
    assert not fold.apply("r", embed_part("e1", 1, 2, "e1-1", duplicates=groups))  # redelivered: skipped
    assert fold.query("SELECT part, embeddings_url, dim, images, model FROM embedding_parts WHERE request_id = ?"
                      " ORDER BY part", ("e1",)) == [
        (0, "s3://b/e/e1/part-0.npz", 512, 3, "timm/resnet10t/random"),
        (1, "s3://b/e/e1/part-1.npz", 512, 3, "timm/resnet10t/random")]
    assert fold.duplicates("e1") == [
        {"kind": "exact", "similarity": 1.0, "ids": ["img-0-0", "img-1-2"]},
        {"kind": "near", "similarity": 0.9612, "ids": sorted(groups[1]["ids"])}]
    # "which duplicate groups hold this image?" is one indexed lookup
    assert fold.query("SELECT g.kind FROM duplicate_members m JOIN duplicate_groups g ON g.request_id = m.request_id"
                      " AND g.position = m.position WHERE m.image_id = ? ORDER BY g.position", ("img-1-2",)) == [
        ("exact",), ("near",)]
    assert fold.query("SELECT image_id, code FROM image_errors WHERE request_id = ? ORDER BY image_id", ("e1",)) == [
        ("bad-0", "decode_failed"), ("bad-1", "decode_failed")]
    assert fold.query("SELECT COUNT(*) FROM labels")[0][0] == 0  # embed results carry no labels
    # a group with a malformed member is rejected whole, the earlier groups stay
    bad = [{"ids": ["a", 5], "kind": "near", "similarity": "x"}]
    assert not fold.apply("r", embed_part("e1", 1, 2, "e1-bad", duplicates=bad))
    assert len(fold.duplicates("e1")) == 2


def test_embed_folds_to_the_same_rows_on_both_databases(tmp_path, postgres_url):
    groups = [{"ids": ["img-0-0", "img-0-1"], "kind": "near", "similarity": 0.97}]
    records = [embed_part("e", 0, 1, "e-0", duplicates=groups), embed_part("f", 0, 1, "f-0", duplicates=[])]
    folds = [Fold(tmp_path / "f.sqlite"), Fold(postgres_url)]
    for fold in folds:
        assert all(fold.apply("r", value) for value in records)
    assert folds[0].dump() == folds[1].dump() and folds[0].duplicates("e") == folds[1].duplicates("e")
    for fold in folds:
        fold.close()


def test_few_shot_summaries_fold_once_per_request(fold):
    summary = {"method": "linear_probe", "examples_per_class": {"cat": 3, "dog": 2}, "examples_failed": 1,
               "cv_accuracy": 0.8, "fitted": True}
    for k in (1, 0):  # every part carries the same summary; parts in any order
        value = json.loads(part("fs", k, 2, f"fs-{k}"))
        assert fold.apply("r", json.dumps({**value, "few_shot": summary}).encode())
    assert fold.request_complete("fs")
    assert fold.query("SELECT method, examples, examples_failed, examples_per_class, cv_accuracy, fitted"
                      " FROM few_shot_requests") == [("linear_probe", 5, 1, '{"cat":3,"dog":2}', 0.8, 1)]
    value = json.loads(part("fs2", 0, 1, "fs2-0"))
    assert fold.apply("r", json.dumps({**value, "few_shot": {**summary, "cv_accuracy": None, "fitted": False}}).encode())
    assert fold.query("SELECT cv_accuracy, fitted FROM few_shot_requests WHERE request_id = 'fs2'") == [(None, 0)]
    bad = {**summary, "examples_per_class": {"cat": "many"}}  # not a count: rejected whole, labels too
    assert not fold.apply("r", json.dumps({**json.loads(part("fs3", 0, 1, "fs3-0")), "few_shot": bad}).encode())
    assert fold.query("SELECT COUNT(*) FROM labels WHERE request_id = 'fs3'") == [(0,)]


def audit_part(request: str, k: int, parts: int, mid: str, entries: list[tuple[str, str, bool, str, float, int]],
               conflicts=None, error_ids: tuple[str, ...] = ()) -> bytes:
    """An audit part: ``entries`` are (id, label, label_issue, suggested_label, issue_score, rank)."""
    results = [{"id": i, "predictions": [], "audit": {
        "label": label, "label_probability": round(1 - score, 6), "label_issue": issue, "suggested_label": suggested,
        "suggested_probability": 0.9 if issue else round(1 - score, 6), "issue_score": score, "outlier_score": 0.25,
        "rank": rank}} for i, label, issue, suggested, score, rank in entries]
    results += [{"id": i, "predictions": [], "error": {"code": "http_status", "message": "HTTP 404"}} for i in error_ids]
    event = {"event_type": "annotation.result", "message_id": mid, "request_id": request, "status": "completed",
             "task": "audit", "model": {"family": "clip", "variant": "ViT-B-32", "weights": "random"}, "part": k,
             "parts": parts, "created_at": "2026-11-30T00:00:00Z", "results": results,
             "embeddings_url": f"s3://b/a/{request}/embeddings.npz", "dim": 512, "audit_url": f"s3://b/a/{request}/audit.csv",
             "audit_summary": {"images": 5, "audited": 4, "label_issues": 1, "label_conflicts": 1, "classes": 2,
                               "folds": 2, "cv_accuracy": 0.75}}
    if conflicts is not None:
        event["label_conflicts"] = conflicts
    return json.dumps(event).encode()


AUDIT_STREAM = [
    audit_part("a1", 1, 2, "a1-1", [("cat-3", "cat", False, "cat", 0.2, 2), ("dog-1", "dog", False, "dog", 0.1, 3)],
               conflicts=[{"ids": ["cat-7", "dog-1"], "labels": ["cat", "dog"], "similarity": 0.991}], error_ids=("gone",)),
    audit_part("a1", 0, 2, "a1-0", [("cat-7", "cat", True, "dog", 0.93, 0), ("dog-4", "dog", False, "dog", 0.41, 1)]),
]


def test_audit_results_fold_into_a_review_queue(fold):
    assert fold.apply("r", AUDIT_STREAM[0])  # the last part first
    assert not fold.request_complete("a1")
    assert fold.apply("r", AUDIT_STREAM[1]) and fold.request_complete("a1")
    assert not fold.apply("r", AUDIT_STREAM[0])  # redelivered: skipped
    queue = fold.review_queue("a1")
    assert [row["image_id"] for row in queue] == ["cat-7", "dog-4", "cat-3", "dog-1"]  # by rank, whatever the parts' order
    assert queue[0] == {"image_id": "cat-7", "rank": 0, "label": "cat", "label_probability": 0.07, "label_issue": True,
                        "suggested_label": "dog", "suggested_probability": 0.9, "issue_score": 0.93, "outlier_score": 0.25}
    assert [row["image_id"] for row in fold.review_queue("a1", issues_only=True)] == ["cat-7"]
    assert fold.query("SELECT image_id, code FROM image_errors WHERE request_id = ?", ("a1",)) == [("gone", "http_status")]
    assert fold.query("SELECT image_a, image_b, label_a, label_b, similarity FROM label_conflicts WHERE request_id = ?",
                      ("a1",)) == [("cat-7", "dog-1", "cat", "dog", 0.991)]
    assert fold.query("SELECT audit_url, audited, label_issues, cv_accuracy, model FROM audit_requests") == [
        ("s3://b/a/a1/audit.csv", 4, 1, 0.75, "clip/ViT-B-32/random")]
    assert fold.query("SELECT COUNT(*) FROM labels")[0][0] == 0  # an audit proposes no labels by itself
    # a malformed entry (label_issue as text) is rejected with its whole part
    bad = audit_part("a2", 0, 1, "a2-0", [("x", "cat", False, "cat", 0.5, 0)]).replace(b'"label_issue": false',
                                                                                           b'"label_issue": "no"')
    assert not fold.apply("r", bad)
    assert fold.review_queue("a2") == [] and fold.query("SELECT reason FROM rejected_messages")[0][0].startswith("TypeError")


def test_audit_folds_to_the_same_rows_on_both_databases(tmp_path, postgres_url):
    folds = [Fold(tmp_path / "f.sqlite"), Fold(postgres_url)]
    for fold in folds:
        assert all(fold.apply("r", value) for value in AUDIT_STREAM)
    assert folds[0].dump() == folds[1].dump() and folds[0].review_queue("a1") == folds[1].review_queue("a1")
    for fold in folds:
        fold.close()


def select_part(request: str, k: int, parts: int, entries: list[tuple[str, int, str | None]],
                error_ids: tuple[str, ...] = ()) -> bytes:
    """A select part built by the worker's own model: ``entries`` are (id, rank, predicted class or None)."""
    from schemas.annotation import (AnnotationResult, ErrorInfo, ImageResult, ModelDescriptor, Prediction, SelectEntry,
                                    SelectSummary)

    selection = [SelectEntry(id=i, rank=rank, score=round(1 - rank / 10, 6), reason="uncertain" if guess else "typical",
                             predicted=Prediction(class_name=guess, confidence=0.55) if guess else None)
                 for i, rank, guess in entries]
    summary = SelectSummary(strategy="diverse_margin", requested_strategy="auto", pool=6, embedded=5, candidates=5,
                            labeled=20, labeled_failed=0, classes=2, selected=4, cv_accuracy=0.9)
    return AnnotationResult.completed_part(
        request, k, parts, task="select", model=ModelDescriptor(family="clip", variant="ViT-B-32", weights="random"),
        selection=selection, results=[ImageResult(id=i, error=ErrorInfo(code="http_status", message="HTTP 404"))
                                      for i in error_ids],
        selection_url=f"s3://b/s/{request}/selection.csv", select_summary=summary, dim=512).to_json_bytes()


def test_select_results_fold_into_a_labeling_queue(fold):
    stream = [select_part("s1", 1, 2, [("img-9", 2, "dog"), ("img-1", 3, "cat")], error_ids=("gone",)),
              select_part("s1", 0, 2, [("img-4", 0, "cat"), ("img-7", 1, None)])]
    assert fold.apply("r", stream[0]) and not fold.request_complete("s1")  # the last part first
    assert fold.apply("r", stream[1]) and fold.request_complete("s1")
    assert not fold.apply("r", stream[0])  # redelivered: skipped
    queue = fold.labeling_queue("s1")
    assert [row["image_id"] for row in queue] == ["img-4", "img-7", "img-9", "img-1"]  # by rank
    assert queue[0] == {"image_id": "img-4", "rank": 0, "score": 1.0, "reason": "uncertain", "predicted": "cat",
                        "predicted_confidence": 0.55}
    assert queue[1]["predicted"] is None and queue[1]["predicted_confidence"] is None
    assert fold.query("SELECT selection_url, strategy, requested_strategy, pool, labeled, selected, cv_accuracy"
                      " FROM select_requests") == [("s3://b/s/s1/selection.csv", "diverse_margin", "auto", 6, 20, 4, 0.9)]
    assert fold.query("SELECT image_id, code FROM image_errors WHERE request_id = ?", ("s1",)) == [("gone", "http_status")]
    assert fold.query("SELECT COUNT(*) FROM labels")[0][0] == 0  # a selection proposes no labels by itself
