"""Garbage on the control topic, against a real ``cls-worker training`` process, real Kafka and S3 API:
the worker starts, dead-letters each bad record once (also across a restart), applies the cancels behind
it in the same batch, and trains; a package at output_path is re-published only for the job that wrote it."""

from __future__ import annotations

import asyncio
import io
import json
import time

import pytest
from aiokafka import AIOKafkaProducer
from PIL import Image

from testkit.worker_processes import final, statuses_of
from testkit.kafka import provision, read_until, settings_for
from testkit.local import WorkerProcess
from testkit.worker_processes import start_training_worker

pytestmark = [pytest.mark.kafka, pytest.mark.s3]

STARTUP_GARBAGE = [
    ("g-bytes", b"\x00\x01\x02 not json at all", "not_json_object"),
    ("g-utf8", b'{"task": "cancel", "job_id": "\xff\xfe"}', "not_json_object"),
    ("g-nested", b"[" * 100_000, "not_json_object"),
    ("g-object-nested", b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "not_json_object"),
    ("g-types", json.dumps({"task": "cancel", "job_id": 5, "reason": ["not", "a", "string"]}).encode(), "invalid_cancel"),
    ("g-task", json.dumps({"task": "train", "job_id": "g-task"}).encode(), "invalid_cancel"),
    ("g-array", json.dumps([{"task": "cancel", "job_id": "g-array"}]).encode(), "not_json_object"),
    ("g-huge", b"x" * 900_000, "not_json_object"),
]
FOLLOW_GARBAGE = [
    ("f-nested", b"[" * 100_000, "not_json_object"),
    ("f-bytes", b"\xfe\xff", "not_json_object"),
]


def png(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (value, 255 - value, 128)).save(out, "PNG")
    return out.getvalue()


def small_job(http_server, output: str) -> dict:
    urls = [http_server.add(f"ctl/{'dark' if i % 2 else 'light'}/{i}.png", png(20 if i % 2 else 230), content_type="image/png")
            for i in range(12)]
    return {"task": "train",
            "config": {"model_name": "test_resnet", "num_classes": 2, "epochs": 1, "batch_size": 4, "learning_rate": 1e-3,
                       "augmentation": "none", "pretrained": False, "image_size": 16},
            "dataset": {"train_urls": urls, "class_names": ["dark", "light"]},
            "output_path": output}


async def send_batch(bootstrap: str, topic: str, records: list[tuple[str, bytes | None]]) -> None:
    """All records in one go (one producer, sent together, then flushed): they arrive in one fetch."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=50)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=value, key=key.encode(), partition=0) for key, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def wait_log(worker: WorkerProcess, event: str, timeout_s: float = 60, **fields) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in worker.log_events():
            if entry.get("event") == event and all(entry.get(k) == v for k, v in fields.items()):
                return entry
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited ({worker.proc.returncode}):\n{worker.log_text()[-4000:]}")
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {event} {fields} within {timeout_s}s:\n{worker.log_text()[-4000:]}")


@pytest.mark.slow
async def test_control_topic_garbage_is_dead_lettered_once_and_never_stops_cancels_or_training(
        tmp_path, kafka_bootstrap, topic_prefix, http_server, s3_bucket):
    settings = settings_for(topic_prefix)
    await provision(settings)
    w = settings.worker
    control, dlq = w.training_control_topic, w.training_control_topic + ".dlq"
    # before any worker runs: garbage of every kind, a tombstone, and a valid cancel last in the same batch
    await send_batch(kafka_bootstrap, control, [(key, value) for key, value, _ in STARTUP_GARBAGE]
                     + [("g-tombstone", None), ("cancel-early", json.dumps({"task": "cancel"}).encode())])
    output = f"s3://{s3_bucket}/ctl/{topic_prefix}/good"
    first = start_training_worker(tmp_path, topic_prefix, "first")
    try:
        await wait_log(first, "control_topic_caught_up", timeout_s=120)
        await send_batch(kafka_bootstrap, w.training_requests_topic, [
            ("good", json.dumps(small_job(http_server, output)).encode()),
            ("cancel-early", json.dumps(small_job(http_server, f"s3://{s3_bucket}/ctl/{topic_prefix}/early")).encode())])
        # follow mode: garbage then a valid cancel, one batch
        await send_batch(kafka_bootstrap, control, [(key, value) for key, value, _ in FOLLOW_GARBAGE]
                         + [("cancel-late", json.dumps({"task": "cancel", "job_id": "cancel-late"}).encode())])
        await wait_log(first, "cancel_received", job_id="cancel-late")
        await send_batch(kafka_bootstrap, w.training_requests_topic, [
            ("cancel-late", json.dumps(small_job(http_server, f"s3://{s3_bucket}/ctl/{topic_prefix}/late")).encode())])
        statuses = await read_until(kafka_bootstrap, w.training_status_topic,
                                    lambda rs: all(final(statuses_of(rs, k)) for k in ("good", "cancel-early", "cancel-late")),
                                    timeout_s=180)
        assert first.proc.poll() is None  # still running
    finally:
        first.close()
    good = statuses_of(statuses, "good")
    assert [e["status"] for e in good if not e.get("heartbeat")] == ["queued", "running", "completed"], good
    assert [e["status"] for e in statuses_of(statuses, "cancel-early")] == ["cancelled"]
    assert [e["status"] for e in statuses_of(statuses, "cancel-late")] == ["cancelled"]
    expected = {key: code for key, _, code in STARTUP_GARBAGE + FOLLOW_GARBAGE}
    dead = await read_until(kafka_bootstrap, dlq, lambda rs: len(rs) >= len(expected), timeout_s=30)
    assert {r.key.decode(): r.headers["dlq-error-code"].decode() for r in dead} == expected
    assert len(dead) == len(expected)  # once each; the tombstone is a retraction, not garbage
    assert next(r for r in dead if r.key == b"g-huge").value == b"x" * 900_000  # the original bytes

    # a restart reads the same garbage again (compacted topic) and dead-letters none of it a second time;
    # it still handles jobs: the owner's redelivery re-publishes completed, another job is refused the output
    second = start_training_worker(tmp_path, topic_prefix, "second")
    try:
        caught_up = await wait_log(second, "control_topic_caught_up", timeout_s=120)
        await send_batch(kafka_bootstrap, w.training_requests_topic, [
            ("good", json.dumps(small_job(http_server, output)).encode()),
            ("thief", json.dumps(small_job(http_server, output)).encode())])
        statuses = await read_until(kafka_bootstrap, w.training_status_topic,
                                    lambda rs: len([e for e in statuses_of(rs, "good") if e["status"] == "completed"]) == 2
                                    and final(statuses_of(rs, "thief")), timeout_s=120)
        skipped = [e for e in second.log_events() if e.get("event") == "control_record_already_dead_lettered"]
    finally:
        second.close()
    assert caught_up["cancelled"] == 2
    assert len(skipped) == len(expected)
    again = await read_until(kafka_bootstrap, dlq, lambda rs: len(rs) >= len(expected), timeout_s=30)
    assert len(again) == len(expected)
    completed = [e for e in statuses_of(statuses, "good") if e["status"] == "completed"]
    assert completed[0]["message_id"] == completed[1]["message_id"] and completed[1]["model_url"] == output
    thief = statuses_of(statuses, "thief")
    assert [e["status"] for e in thief] == ["failed"] and thief[0]["error"]["code"] == "output_exists", thief
    assert "'good'" in thief[0]["error"]["message"]
