"""The ``completed`` event always fits: headline metrics kept, large ones left in metrics.json above the budget."""

from __future__ import annotations

import json

from consumers.settings import WorkerSettings
from consumers.training_worker import training_settings
from handlers.training import completed_event
from schemas.training import TrainingStatus

HEADLINE = {"train_loss": 0.41, "val_loss": 0.52, "val_accuracy": 0.8125, "best_epoch": 7, "epochs_run": 9,
            "stopped_early": True}


def full_metrics(num_classes: int) -> dict:
    classes = [f"a_rather_long_class_name_{i:04d}" for i in range(num_classes)]
    return {
        **HEADLINE,
        "per_class": {name: {"precision": 0.8571428571428571, "recall": 0.7272727272727273, "f1": 0.7868852459016393,
                             "support": 11} for name in classes},
        "confusion_matrix": [[(i * 31 + j * 17) % 23 for j in range(num_classes)] for i in range(num_classes)],
        "epochs": [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "val_accuracy": e / 10} for e in range(1, 10)],
        "job_id": "job-600",
    }


def test_600_classes_fit_the_record_size_the_worker_is_configured_for():
    worker = WorkerSettings()
    budget = training_settings(worker).max_metrics_bytes
    assert budget == worker.max_record_bytes // 8
    metrics = full_metrics(600)
    assert len(json.dumps(metrics)) > worker.max_record_bytes // 4  # the confusion matrix alone is too large
    event = completed_event("job-600", metrics, "s3://bucket/models/m600", budget)
    raw = event.to_json_bytes()
    assert len(raw) <= budget + 1024 < worker.max_record_bytes
    body = json.loads(raw)
    for name, value in HEADLINE.items():
        assert body["metrics"][name] == value
    assert "confusion_matrix" not in body["metrics"] and body["metrics"]["omitted"] == ["confusion_matrix"]
    assert len(body["metrics"]["per_class"]) == 600  # the per-class table fits once the matrix is out
    assert body["metrics"]["metrics_url"] == "s3://bucket/models/m600/metrics.json"
    assert "job_id" not in body["metrics"]  # the package's owner is not a metric
    assert body["model_url"] == "s3://bucket/models/m600" and body["status"] == "completed"
    assert TrainingStatus.model_validate_json(raw).message_id == event.message_id


def test_a_small_budget_keeps_only_the_headline_and_small_metrics():
    event = completed_event("job-600", full_metrics(600), "s3://bucket/m", max_metrics_bytes=4096)
    body = json.loads(event.to_json_bytes())
    assert body["metrics"]["omitted"] == ["confusion_matrix", "per_class"]
    assert len(body["metrics"]["epochs"]) == 9  # small enough to stay
    assert {k: body["metrics"][k] for k in HEADLINE} == HEADLINE


def test_metrics_under_the_budget_go_whole_with_no_pointer():
    metrics = full_metrics(10)
    event = completed_event("job-10", metrics, "s3://bucket/m", max_metrics_bytes=512 * 1024)
    body = json.loads(event.to_json_bytes())
    assert len(body["metrics"]["confusion_matrix"]) == 10 and len(body["metrics"]["per_class"]) == 10
    assert "metrics_url" not in body["metrics"] and "omitted" not in body["metrics"]
    # the same metrics give the same event (a re-publish repeats the first completion)
    again = completed_event("job-10", metrics, "s3://bucket/m", max_metrics_bytes=512 * 1024)
    assert again.model_dump(exclude={"created_at"}) == event.model_dump(exclude={"created_at"})
