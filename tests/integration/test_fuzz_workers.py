"""10,000 generated records (random bytes, random JSON, deep nesting, near-valid requests, huge lists,
unpaired surrogates, tombstones) across both request topics and the control topic, against the real
``cls-worker annotation`` and ``cls-worker training`` processes: no worker exits, every record is
accounted for (handled + failed + dead-lettered = sent), and both groups end with lag 0.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter

import pytest
from aiokafka import AIOKafkaProducer

from testkit.kafka import committed_offsets, end_offsets, provision, read_until, settings_for
from testkit.worker_processes import start_annotation_worker, start_training_worker

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

SEED = 20261129
N_ANNOTATION, N_TRAINING, N_CONTROL = 7_500, 1_500, 1_000  # the training worker takes one record at a time
BLOCKED = "http://127.0.0.1:9/never.jpg"  # loopback, refused by the private-network rule before any connection


def _json_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 4 else 4)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 2**70, 1.5, 1e308, rng.randrange(-1000, 1000)])
    if kind == 3:
        return "".join(rng.choice("ab {}\\\"\u00e9\U0001f600\x00") for _ in range(rng.randrange(12)))
    if kind == 4:
        return [_json_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["task", "images", "classes", "request_id", "job_id", "x"]): _json_value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def _annotation_near_valid(rng: random.Random, i: int) -> dict:
    body = {"task": "classify", "model": rng.choice(["clip", "clip", "siglip", "custom", "other"]),
            "request_id": f"fz-a-{i}",
            "images": [{"id": f"i{j}", "url": rng.choice([BLOCKED, "ftp://x/y", "nota url", "file:///etc/passwd"])}
                       for j in range(rng.randrange(1, 4))],
            "classes": rng.choice([["cat", "dog"], [], ["a", "a"], ["x"] * 3, "cat"]),
            "top_k": rng.choice([1, 2, 0, -1, "3", 10_000]), "threshold": rng.choice([0.1, -1, 2, None])}
    for key in rng.sample(list(body), rng.randrange(3)):
        if key != "request_id":
            del body[key]
    return body


def _training_near_valid(rng: random.Random, i: int) -> dict:
    body = {"task": "train", "job_id": f"fz-t-{i}",
            "config": {"model_name": rng.choice(["resnet10t", "no_such_model", ""]),
                       "num_classes": rng.choice([2, 0, -3, "two"]), "epochs": rng.choice([1, 0, 10**9]),
                       "batch_size": rng.choice([2, 0, "x"]), "augmentation": rng.choice(["none", "extreme"])},
            "dataset": {"train_urls": rng.choice([[BLOCKED], [], "nope", [1, 2]]),
                        "class_names": rng.choice([["a", "b"], [], None])},
            "output_path": rng.choice(["s3://bucket/key", "ftp://nope", "", None])}
    # Keep the rare valid one from training for minutes: every job names a model that does not exist.
    body["config"]["model_name"] = rng.choice(["no_such_model", "", 7])
    return body


def _record(rng: random.Random, topic_kind: str, i: int) -> tuple[bytes | None, bytes | None]:
    kind = rng.randrange(10)
    key = rng.choice([None, f"k{i}".encode(), b"\xff\xfe", "\u00e9".encode()])
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(64))), key
    if kind == 1:
        return json.dumps(_json_value(rng)).encode(), key
    if kind == 2:
        depth = rng.choice([50, 999, 5_000, 100_000])
        return b"[" * depth + b"]" * depth, key
    if kind == 3:
        return None, key or f"tomb{i}".encode()
    if kind == 4:
        return b'{"request_id": "\\ud800", "job_id": "\\udfff", "task": "cancel"}', key
    if kind == 5:  # long lists: one in ten huge (past every limit), the rest just past the part and class bounds
        n = rng.choice([5_000, 30_000]) if rng.random() < 0.1 else rng.choice([501, 2_001])
        return json.dumps({"request_id": f"big-{i}", "job_id": f"big-{i}", "task": "classify",
                           "images": [{"id": str(j), "url": "x"} for j in range(n)], "classes": ["a"] * 100}).encode(), key
    if topic_kind == "annotation":
        body = _annotation_near_valid(rng, i)
    elif topic_kind == "training":
        body = _training_near_valid(rng, i)
    else:
        body = {"task": rng.choice(["cancel", "cancel", "stop", 3]), "job_id": rng.choice([f"fz-t-{i}", "", None, 5])}
    return json.dumps(body).encode(), key


async def test_ten_thousand_generated_records_all_end(tmp_path, kafka_bootstrap, topic_prefix, s3_server):
    settings = settings_for(topic_prefix, request_topic_partitions=3)
    await provision(settings)
    w = settings.worker
    rng = random.Random(SEED)
    plan = ([(w.annotation_requests_topic, "annotation")] * N_ANNOTATION
            + [(w.training_requests_topic, "training")] * N_TRAINING
            + [(w.training_control_topic, "control")] * N_CONTROL)
    rng.shuffle(plan)
    common = {"CLS_RETRY_BACKOFF_S": "0.01", "CLS_RETRY_BACKOFF_MAX_S": "0.05", "CLS_LOG_LEVEL": "INFO"}
    annotation = start_annotation_worker(tmp_path, topic_prefix, "fuzz-annotation", CLS_ALLOW_PRIVATE_NETWORKS="false",
                                         CLS_MAX_IN_FLIGHT="16", CLS_INTERACTIVE_MAX_IN_FLIGHT="16", **common)
    training = start_training_worker(tmp_path, topic_prefix, "fuzz-training", CLS_ALLOW_PRIVATE_NETWORKS="false",
                                     **common)
    started = time.monotonic()
    sent = Counter()
    try:
        await annotation.wait_for_log("partitions_assigned", timeout_s=120)
        await training.wait_for_log("partitions_assigned", timeout_s=120)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=8 * 1024 * 1024,
                                    linger_ms=20)
        await producer.start()
        try:
            futures = []
            for i, (topic, kind) in enumerate(plan):
                value, key = _record(rng, kind, i)
                if kind == "control" and key is None:
                    key = f"c{i}".encode()  # a compacted topic refuses records without a key
                futures.append(await producer.send(topic, value=value, key=key))
                sent[topic] += 1
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

        ends = {**await end_offsets(kafka_bootstrap, w.annotation_requests_topic),
                **await end_offsets(kafka_bootstrap, w.training_requests_topic)}
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            committed = {**await committed_offsets(kafka_bootstrap, w.annotation_group_id),
                         **await committed_offsets(kafka_bootstrap, w.training_group_id)}
            if all(committed.get(tp, 0) == end for tp, end in ends.items()):
                break
            assert annotation.proc.poll() is None and training.proc.poll() is None, "a worker exited"
            await asyncio.sleep(1)
        assert all(committed.get(tp, 0) == end for tp, end in ends.items()), (committed, ends)
        control_events = {"cancel_received", "cancel_retracted", "control_record_dead_lettered"}
        for _ in range(120):  # bounded: every control record is applied or dead-lettered
            control = Counter(e["event"] for e in training.log_events() if e["event"] in control_events)
            if sum(control.values()) >= sent[w.training_control_topic]:
                break
            await asyncio.sleep(0.5)
        assert sum(control.values()) == sent[w.training_control_topic], control
        assert not any(e["event"] == "control_record_skipped" for e in training.log_events())
        control_dlq = await read_until(kafka_bootstrap, w.training_control_topic + ".dlq",
                                       lambda rs: len(rs) >= control["control_record_dead_lettered"], timeout_s=60)
        assert len(control_dlq) == control["control_record_dead_lettered"]
        assert annotation.proc.poll() is None and training.proc.poll() is None, "a worker exited"
        elapsed = time.monotonic() - started
    finally:
        annotation.close()
        training.close()

    for worker, topic in ((annotation, w.annotation_requests_topic), (training, w.training_requests_topic)):
        done = Counter(e["outcome"] for e in worker.log_events() if e["event"] == "record_done")
        assert sum(done.values()) == sent[topic], (topic, done, sent[topic])
        assert set(done) <= {"handled", "invalid", "failed", "dlq"}, done
        dlq = await read_until(kafka_bootstrap, topic + ".dlq", lambda rs: len(rs) >= done["dlq"], timeout_s=60)
        assert len(dlq) == done["dlq"]
        print(f"{topic}: sent {sent[topic]}, outcomes {dict(done)}")
    print(f"{w.training_control_topic}: sent {sent[w.training_control_topic]}, {dict(control)}")
    assert elapsed < 180, f"fuzz run took {elapsed:.0f} s"
    print(f"10,000 records ended in {elapsed:.0f} s")
