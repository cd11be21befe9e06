"""The reference fold: idempotent by message id, never moves a job backwards, parts add up."""

from __future__ import annotations

import json

from examples.fold import Fold
from schemas.training import TERMINAL_SEQ, running_seq


def status(job: str, status: str, seq: int, mid: str, **extra) -> bytes:
    return json.dumps({"event_type": "training.status", "message_id": mid, "job_id": job, "status": status, "seq": seq,
                       "attempt": 1, "created_at": f"2026-11-27T00:00:{seq % 60:02d}Z", **extra}).encode()


def part(request: str, k: int, parts: int, mid: str) -> bytes:
    return json.dumps({"event_type": "annotation.result", "message_id": mid, "request_id": request, "status": "completed",
                       "model": {"family": "clip", "variant": "ViT-B-32", "weights": "random"}, "part": k, "parts": parts,
                       "created_at": "2026-11-27T00:00:00Z",
                       "results": [{"id": f"img-{k}", "predictions": [{"class": "cat", "confidence": 0.8},
                                                                      {"class": "dog", "confidence": 0.2}], "margin": 0.6}]}).encode()


def test_out_of_order_status_never_moves_a_job_backwards(tmp_path):
    fold = Fold(tmp_path / "f.sqlite")
    assert fold.apply("s", status("j", "queued", 0, "m0"))
    assert fold.apply("s", status("j", "completed", TERMINAL_SEQ, "m9", metrics={"val_accuracy": 0.9}, model_url="s3://b/m"))
    assert fold.apply("s", status("j", "running", running_seq(2), "m2", progress={"epoch": 2, "epochs": 3}))  # late
    job = fold.job("j")
    assert job["status"] == "completed" and job["metrics"] == {"val_accuracy": 0.9} and job["model_url"] == "s3://b/m"
    assert fold.apply("s", status("j", "running", running_seq(3), "m3")) and fold.job("j")["status"] == "completed"


def test_parts_and_duplicates(tmp_path):
    fold = Fold(tmp_path / "f.sqlite")
    assert fold.apply("r", part("r1", 1, 2, "p1"))
    assert not fold.request_complete("r1")
    assert not fold.apply("r", part("r1", 1, 2, "p1"))  # a redelivered part: same message id, skipped
    assert not fold.request_complete("r1")
    assert fold.apply("r", part("r1", 0, 2, "p0"))
    assert fold.request_complete("r1")
    assert fold.auto_apply("r1", threshold=0.5) == 2
    assert fold.auto_apply("r1", threshold=0.5) == 2  # re-applying is idempotent too
    rows = fold.db.execute("SELECT image_id, class, confidence, source FROM applied_labels ORDER BY image_id").fetchall()
    assert rows == [("img-0", "cat", 0.8, "ai"), ("img-1", "cat", 0.8, "ai")]
    assert not fold.apply("r", b"not json") and not fold.apply("r", None)


def test_auto_apply_by_the_workers_validated_auto_accept(tmp_path):
    fold = Fold(tmp_path / "f.sqlite")
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
    assert fold.db.execute("SELECT image_id, class FROM applied_labels").fetchall() == [("sure", "cat")]
    assert fold.auto_apply("r", threshold=0.9) == 2  # a fixed threshold would also take the unvalidated one

    table = [{"precision": 0.9, "threshold": 0.8, "coverage": 0.9}, {"precision": 0.95, "threshold": 0.93, "coverage": 0.7},
             {"precision": 0.98, "threshold": None, "coverage": 0.0}]
    assert fold.apply("s", status("j", "completed", TERMINAL_SEQ, "m1", metrics={"auto_accept": table}))
    assert fold.auto_accept_threshold("j", 0.9) == 0.8
    assert fold.auto_accept_threshold("j", 0.92) == 0.93  # the next validated target up
    assert fold.auto_accept_threshold("j", 0.98) is None and fold.auto_accept_threshold("j", 0.999) is None
