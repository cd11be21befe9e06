"""Fences and limits as the backend sees them: ``cls-worker training`` as a real process on real Kafka
and a real S3 API answers hostile requests with a ``failed`` status naming the fence or the limit, and goes on."""

from __future__ import annotations

import re

import pytest

from testkit.kafka import produce, provision, read_until, settings_for, topic_env
from testkit.local import WorkerProcess

pytestmark = [pytest.mark.kafka, pytest.mark.s3]


def request(output: str, **config) -> dict:
    return {"task": "train",
            "config": {"model_name": "test_resnet", "num_classes": 2, "epochs": 1, "batch_size": 4,
                       "pretrained": False, "image_size": 16, **config},
            "dataset": {"train_urls": ["s3://anything/a/1.png", "s3://anything/b/2.png"], "class_names": ["a", "b"]},
            "output_path": output}


async def test_training_worker_answers_hostile_requests_with_failed_events(tmp_path, kafka_bootstrap, topic_prefix,
                                                                           s3_bucket):
    settings = settings_for(topic_prefix)
    await provision(settings)
    w = settings.worker
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    env = {**topic_env(topic_prefix), "CLS_TRAINING_WORK_DIR": str(tmp_path / "work"), "CLS_DEVICE": "cpu",
           "CLS_LOG_FORMAT": "json", "CLS_TORCH_THREADS": "1", "CLS_ALLOW_FILE_URLS": "true",
           "CLS_FILE_ROOT": str(root), "CLS_S3_ALLOWED_BUCKETS": s3_bucket, "CLS_TRAINING_MEMORY_BUDGET_MB": "512",
           "CLS_ALLOWED_TRAINING_MODELS": "test_*,vit_*"}
    jobs = {
        "other-bucket": request("s3://not-on-the-list/out"),
        "file-outside": request(f"file://{outside}/model"),
        "file-symlink": request(f"file://{root}/escape/model"),
        "pretrained-outside": request(f"s3://{s3_bucket}/ok", pretrained=True, pretrained_url="file:///etc/passwd"),
        "too-big": request(f"s3://{s3_bucket}/big", batch_size=4096, image_size=1024),
        # 1.8 B parameters: weights + AdamW state alone are ~40 GiB, whatever the batch size
        "giant": request(f"s3://{s3_bucket}/giant", model_name="vit_gigantic_patch14_clip_224", batch_size=1,
                         image_size=None),
        "not-allowed": request(f"s3://{s3_bucket}/r18", model_name="resnet18"),
    }
    worker = WorkerProcess("consumers.cli", ["training"], env, tmp_path / "training.log")
    try:
        await worker.wait_for_log("partitions_assigned", timeout_s=120)
        for key, body in jobs.items():
            await produce(kafka_bootstrap, w.training_requests_topic, body, key=key, partition=0)
        records = await read_until(kafka_bootstrap, w.training_status_topic,
                                   lambda rs: {r.key.decode() for r in rs} >= set(jobs), timeout_s=120)
    finally:
        worker.close()
    events = {key: [r.json() for r in records if r.key == key.encode()] for key in jobs}
    for key, got in events.items():
        assert [e["status"] for e in got] == ["failed"], (key, got)  # refused before queued: nothing downloaded
    codes = {key: got[0]["error"]["code"] for key, got in events.items()}
    assert codes == {"other-bucket": "blocked_url", "file-outside": "blocked_url", "file-symlink": "blocked_url",
                     "pretrained-outside": "blocked_url", "too-big": "invalid_request", "giant": "invalid_request",
                     "not-allowed": "invalid_request"}, codes
    budget = r"estimated ([\d,]+) MiB > budget 512 MiB \(CLS_TRAINING_MEMORY_BUDGET_MB\)"
    found = re.search(budget, events["too-big"][0]["error"]["message"])
    assert found and int(found[1].replace(",", "")) >= 1_671_168  # 4096 x 3 x 1024^2 x 4 B x (32 + 2)
    found = re.search(budget, events["giant"][0]["error"]["message"])
    assert found and int(found[1].replace(",", "")) > 40_000, events["giant"]  # 1,843 M parameters x 24 B
    assert "1,842.8 M parameters" in events["giant"][0]["error"]["message"]
    assert "CLS_ALLOWED_TRAINING_MODELS" in events["not-allowed"][0]["error"]["message"]
    assert list(outside.iterdir()) == []
