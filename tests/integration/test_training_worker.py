"""``cls-worker training`` as a real process, real Kafka, real S3 API (moto) on loopback."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from pathlib import Path

import pytest

from testkit.worker_processes import final, statuses_of
from testkit.images import DIGIT_CLASS_NAMES, write_digits_dataset
from testkit.kafka import produce, provision, read_until, settings_for
from testkit.worker_processes import start_training_worker

pytestmark = [pytest.mark.kafka, pytest.mark.s3]

_MEMO: dict[str, object] = {}


@pytest.fixture(scope="session")
async def digits_s3(s3_server, tmp_path_factory):
    """All scikit-learn digits as PNG objects s3://<bucket>/digits/<class>/<n>.png (uploaded once)."""
    if "digits_s3" in _MEMO:
        return _MEMO["digits_s3"]
    directory = tmp_path_factory.mktemp("digits-s3")
    samples, class_names = write_digits_dataset(directory)
    bucket = f"digits-{uuid.uuid4().hex[:8]}"
    urls: list[tuple[str, int]] = []
    async with s3_server.client() as client:
        await client.create_bucket(Bucket=bucket)
        semaphore = asyncio.Semaphore(32)

        async def put(path: str, label: int) -> str:
            key = f"digits/{class_names[label]}/{Path(path).name}"
            async with semaphore:
                await client.put_object(Bucket=bucket, Key=key, Body=Path(path).read_bytes(), ContentType="image/png")
            return f"s3://{bucket}/{key}"

        keys = await asyncio.gather(*(put(p, label) for p, label in samples))
        urls = list(zip(keys, (label for _, label in samples), strict=True))
    _MEMO["digits_s3"] = (bucket, urls, class_names, samples)
    return _MEMO["digits_s3"]


def train_request(urls: list[str], output: str, **config) -> dict:
    return {
        "task": "train",
        "config": {"model_name": "resnet10t", "num_classes": 10, "epochs": 4, "batch_size": 64, "learning_rate": 3e-3,
                   "augmentation": "none", "pretrained": False, "image_size": 32, "warmup_epochs": 0.5, **config},
        "dataset": {"train_urls": urls, "val_urls": [], "class_names": list(DIGIT_CLASS_NAMES)},
        "output_path": output,
    }


async def wait_final(bootstrap: str, topic: str, job_id: str, timeout_s: float = 240) -> list[dict]:
    records = await read_until(bootstrap, topic, lambda rs: final(statuses_of(rs, job_id)), timeout_s=timeout_s)
    return statuses_of(records, job_id)


@pytest.mark.slow
async def test_digits_trained_through_kafka_reach_90_percent(tmp_path, kafka_bootstrap, topic_prefix, digits_s3, s3_server):
    bucket, urls, class_names, _ = digits_s3
    settings = settings_for(topic_prefix)
    await provision(settings)
    w = settings.worker
    worker = start_training_worker(tmp_path, topic_prefix)
    output = f"s3://{bucket}/models/digits-{topic_prefix}"
    try:
        await worker.wait_for_log("partitions_assigned", timeout_s=120)
        await produce(kafka_bootstrap, w.training_requests_topic,
                      train_request([u for u, _ in urls], output, export=["onnx"]), key="job-digits")
        events = await wait_final(kafka_bootstrap, w.training_status_topic, "job-digits", timeout_s=240)
    finally:
        worker.close()
    statuses = [e["status"] for e in events if not e.get("heartbeat")]
    assert statuses == ["queued", "running", "running", "running", "running", "completed"], statuses
    running = [e for e in events if e["status"] == "running" and not e.get("heartbeat")]
    assert [e["progress"]["epoch"] for e in running] == [1, 2, 3, 4]
    assert all(e["progress"]["epochs"] == 4 and "val_accuracy" in e["progress"]["metrics"] for e in running)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    done = events[-1]
    assert done["metrics"]["val_accuracy"] >= 0.90, done["metrics"]
    assert 1 <= done["metrics"]["best_epoch"] <= 4
    assert len(done["metrics"]["confusion_matrix"]) == 10
    assert set(done["metrics"]["per_class"]) == set(class_names)
    assert done["model_url"] == output
    metrics = done["metrics"]
    assert metrics["temperature"] > 0 and set(metrics["ece"]) == set(metrics["nll"]) == {"before", "after"}
    assert [row["precision"] for row in metrics["auto_accept"]] == [0.9, 0.95, 0.98, 0.99]
    assert 0 < metrics["macro_f1"] <= 1 and 0 < metrics["balanced_accuracy"] <= 1
    assert metrics["report_url"] == f"{output}/report.html" and metrics["onnx"]["max_abs_diff"] <= 1e-4
    async with s3_server.client() as client:
        listed = await client.list_objects_v2(Bucket=bucket, Prefix=f"models/digits-{topic_prefix}")
        keys = {item["Key"].rsplit("/", 1)[-1] for item in listed.get("Contents", [])}
        assert {"model.safetensors", "config.json", "metrics.json", "model.onnx", "report.html"} <= keys
        assert not any(".checkpoints/" in item["Key"] for item in listed.get("Contents", []))  # removed after success
        config = json.loads(await (await client.get_object(Bucket=bucket, Key=f"models/digits-{topic_prefix}/config.json"))["Body"].read())
    assert config["class_names"] == class_names

    # A redelivered job whose model is complete re-publishes completed with the same ids, no training.
    worker = start_training_worker(tmp_path, topic_prefix, "again")
    try:
        await produce(kafka_bootstrap, w.training_requests_topic, train_request([u for u, _ in urls], output), key="job-digits")
        records = await read_until(kafka_bootstrap, w.training_status_topic,
                                   lambda rs: len([e for e in statuses_of(rs, "job-digits") if e["status"] == "completed"]) >= 2)
    finally:
        worker.close()
    completed = [e for e in statuses_of(records, "job-digits") if e["status"] == "completed"]
    assert completed[0]["message_id"] == completed[1]["message_id"]
    assert completed[1]["metrics"]["val_accuracy"] == completed[0]["metrics"]["val_accuracy"]
    assert completed[1]["metrics"]["report_url"] == completed[0]["metrics"]["report_url"]
    _MEMO["digits_model"] = (output, class_names)


def four_family_request(model_name: str, urls: list[str], output: str) -> dict:
    return {
        "task": "train",
        "config": {"model_name": model_name, "num_classes": 10, "epochs": 1, "batch_size": 4, "learning_rate": 1e-3,
                   "augmentation": "light", "pretrained": False, "image_size": 32},
        "dataset": {"train_urls": urls[:8], "val_urls": urls[8:12], "class_names": list(DIGIT_CLASS_NAMES)},
        "output_path": output,
    }


@pytest.mark.slow
async def test_four_families_and_bad_requests_in_one_worker(tmp_path, kafka_bootstrap, topic_prefix, digits_s3, http_server):
    bucket, urls, _, _ = digits_s3
    settings = settings_for(topic_prefix)
    await provision(settings)
    w = settings.worker
    plain = [u for u, _ in urls]
    families = ["vit_base_patch16_224", "convnext_tiny", "efficientnet_b0", "swin_tiny_patch4_window7_224"]
    worker = start_training_worker(tmp_path, topic_prefix)
    try:
        await worker.wait_for_log("partitions_assigned", timeout_s=120)
        for name in families:
            await produce(kafka_bootstrap, w.training_requests_topic,
                          four_family_request(name, plain[::97], f"s3://{bucket}/fam/{topic_prefix}/{name}"),
                          key=f"fam-{name}", partition=0)
        bad_label = train_request([{"url": plain[0], "label": "eleven"}, plain[1]], f"s3://{bucket}/bad/1")
        unknown = train_request(plain[:20], f"s3://{bucket}/bad/2", model_name="not_a_model")
        mismatch = train_request(plain[:20], f"s3://{bucket}/bad/3", num_classes=3)
        unreachable = train_request(plain[:20] + [f"http://127.0.0.1:1/{c}/x{i}.png" for i, c in enumerate(DIGIT_CLASS_NAMES)],
                                    f"s3://{bucket}/bad/4")
        unwritable = train_request(plain[:20], "s3://no-such-bucket-here/out")
        for key, body in [("bad-label", bad_label), ("bad-model", unknown), ("bad-classes", mismatch),
                          ("bad-images", unreachable), ("bad-output", unwritable)]:
            await produce(kafka_bootstrap, w.training_requests_topic, body, key=key, partition=0)
        keys = [f"fam-{n}" for n in families] + ["bad-label", "bad-model", "bad-classes", "bad-images", "bad-output"]
        records = await read_until(kafka_bootstrap, w.training_status_topic,
                                   lambda rs: all(final(statuses_of(rs, k)) for k in keys), timeout_s=400)
    finally:
        worker.close()
    for name in families:
        events = statuses_of(records, f"fam-{name}")
        assert events[-1]["status"] == "completed", events[-1]
        assert events[-1]["model_url"].endswith(name)
    codes = {k: statuses_of(records, k)[-1].get("error", {}).get("code") for k in keys[4:]}
    assert codes == {"bad-label": "invalid_dataset", "bad-model": "unknown_model", "bad-classes": "invalid_request",
                     "bad-images": "too_many_bad_images", "bad-output": "storage_unwritable"}, codes
    assert "http://127.0.0.1:1/" in statuses_of(records, "bad-images")[-1]["error"]["message"]
    assert worker.proc.returncode is not None


async def test_cancel_while_running_and_before_start(tmp_path, kafka_bootstrap, topic_prefix, digits_s3):
    bucket, urls, _, _ = digits_s3
    settings = settings_for(topic_prefix)
    await provision(settings)
    w = settings.worker
    plain = [u for u, _ in urls][:600]
    # cancelled before its job exists (and before the worker starts): the job ends cancelled on arrival
    await produce(kafka_bootstrap, w.training_control_topic, {"task": "cancel", "job_id": "early"}, key="early")
    worker = start_training_worker(tmp_path, topic_prefix)
    try:
        await worker.wait_for_log("partitions_assigned", timeout_s=120)
        await produce(kafka_bootstrap, w.training_requests_topic,
                      train_request(plain, f"s3://{bucket}/cancel/{topic_prefix}/long", model_name="test_resnet", epochs=500),
                      key="long", partition=0)
        await read_until(kafka_bootstrap, w.training_status_topic,
                         lambda rs: any(e["status"] == "running" for e in statuses_of(rs, "long")), timeout_s=120)
        await produce(kafka_bootstrap, w.training_control_topic, {"task": "cancel", "job_id": "long"}, key="long")
        long_events = await wait_final(kafka_bootstrap, w.training_status_topic, "long", timeout_s=60)
        await produce(kafka_bootstrap, w.training_requests_topic,
                      train_request(plain, f"s3://{bucket}/cancel/{topic_prefix}/early"), key="early", partition=0)
        early_events = await wait_final(kafka_bootstrap, w.training_status_topic, "early", timeout_s=60)
    finally:
        worker.close()
    assert long_events[-1]["status"] == "cancelled"
    assert max(e["progress"]["epoch"] for e in long_events if e["status"] == "running") < 500
    assert [e["status"] for e in early_events] == ["cancelled"]


@pytest.mark.slow
async def test_sigkill_mid_training_resumes_from_checkpoint(tmp_path, kafka_bootstrap, topic_prefix, digits_s3):
    bucket, urls, _, _ = digits_s3
    settings = settings_for(topic_prefix)
    await provision(settings)
    w = settings.worker
    plain = [u for u, _ in urls][::3]  # 599 digits: epochs of about 1 s on an idle 2-core CPU
    body = train_request(plain, f"s3://{bucket}/resume/{topic_prefix}", model_name="test_resnet", epochs=10,
                         image_size=48, batch_size=16)
    first = start_training_worker(tmp_path, topic_prefix, "first")
    try:
        await first.wait_for_log("partitions_assigned", timeout_s=120)
        await produce(kafka_bootstrap, w.training_requests_topic, body, key="resume-me")
        await read_until(kafka_bootstrap, w.training_status_topic,
                         lambda rs: any(e["status"] == "running" for e in statuses_of(rs, "resume-me")), timeout_s=180)
        first.proc.send_signal(signal.SIGKILL)
        await first.wait_exit(30)
    finally:
        first.close()
    second = start_training_worker(tmp_path, topic_prefix, "second")  # fresh local work dir: resumes from S3
    try:
        events = await wait_final(kafka_bootstrap, w.training_status_topic, "resume-me", timeout_s=240)
        restored = await second.wait_for_log("checkpoint_restored", timeout_s=5)
    finally:
        second.close()
    assert restored
    assert events[-1]["status"] == "completed"
    running = [e for e in events if e["status"] == "running" and not e.get("heartbeat")]
    first_run = [e for e in running if e["attempt"] == 1]
    resumed = [e for e in running if e["attempt"] == 2]
    assert first_run and resumed
    # the resumed attempt starts after the checkpointed epoch instead of starting over
    assert min(e["progress"]["epoch"] for e in resumed) > min(e["progress"]["epoch"] for e in first_run)
    assert sorted({e["progress"]["epoch"] for e in running}) == list(range(1, 11))
    queued = [e for e in events if e["status"] == "queued"]
    assert [e["attempt"] for e in queued] == [1, 2] and queued[0]["message_id"] == queued[1]["message_id"]


@pytest.mark.slow
async def test_sigterm_checkpoints_then_resumes_and_max_jobs_exits(tmp_path, kafka_bootstrap, topic_prefix, digits_s3):
    bucket, urls, _, _ = digits_s3
    settings = settings_for(topic_prefix)
    await provision(settings)
    w = settings.worker
    plain = [u for u, _ in urls][::3]
    # long enough epochs (599 digits: about 1 s each on an idle 2-core CPU) for heartbeats every 0.5 s inside them
    body = train_request(plain, f"s3://{bucket}/term/{topic_prefix}", model_name="test_resnet", epochs=10, image_size=48,
                         batch_size=16)
    first = start_training_worker(tmp_path, topic_prefix, "first", CLS_HEARTBEAT_S="0.5")
    try:
        await first.wait_for_log("partitions_assigned", timeout_s=120)
        await produce(kafka_bootstrap, w.training_requests_topic, body, key="term-me")
        records = await read_until(kafka_bootstrap, w.training_status_topic,
                                   lambda rs: any(e.get("heartbeat") for e in statuses_of(rs, "term-me")), timeout_s=180)
        first.proc.send_signal(signal.SIGTERM)  # checkpoint at the next step, no final status, exit 0
        assert await first.wait_exit(60) == 0
        assert "record_left_for_redelivery" in first.log_text()
    finally:
        first.close()
    heartbeat = next(e for e in statuses_of(records, "term-me") if e.get("heartbeat"))
    assert heartbeat["status"] == "running" and heartbeat["progress"]["step"] is not None
    assert heartbeat["progress"]["steps"] >= heartbeat["progress"]["step"]
    events = statuses_of(await read_until(kafka_bootstrap, w.training_status_topic, lambda rs: True), "term-me")
    assert not final(events)
    # a worker that takes one job and exits (Kubernetes job-per-request): it resumes and completes
    second = start_training_worker(tmp_path, topic_prefix, "second", args=["--max-jobs", "1"])
    try:
        assert await second.wait_exit(300) == 0
    finally:
        second.close()
    events = await wait_final(kafka_bootstrap, w.training_status_topic, "term-me", timeout_s=30)
    assert events[-1]["status"] == "completed"
    assert {e["attempt"] for e in events if e["status"] == "completed"} == {2}
    assert "checkpoint_restored" in second.log_text()


@pytest.mark.slow
async def test_scale_out_rebalance_checkpoints_and_the_job_resumes(tmp_path, kafka_bootstrap, topic_prefix, digits_s3):
    bucket, urls, _, _ = digits_s3
    settings = settings_for(topic_prefix)
    await provision(settings)
    w = settings.worker
    # about 24 s of training on an idle 2-core CPU (599 digits, 20 epochs of ~1.2 s): the second worker starts
    # after the first epoch and joins about 7 s later, well before the end
    body = train_request([u for u, _ in urls][::3], f"s3://{bucket}/scale/{topic_prefix}", model_name="test_resnet",
                         epochs=20, image_size=48, batch_size=16)
    first = start_training_worker(tmp_path, topic_prefix, "first")
    second = None
    try:
        await first.wait_for_log("partitions_assigned", timeout_s=120)
        await produce(kafka_bootstrap, w.training_requests_topic, body, key="scale-me")
        await read_until(kafka_bootstrap, w.training_status_topic,
                         lambda rs: any(e["status"] == "running" for e in statuses_of(rs, "scale-me")), timeout_s=180)
        # a second worker joins the group: the partitions are revoked (eager rebalance), the running job
        # checkpoints and stops without a final status, and the partition's (new) owner resumes it
        second = start_training_worker(tmp_path, topic_prefix, "second")
        events = await wait_final(kafka_bootstrap, w.training_status_topic, "scale-me", timeout_s=480)
        assert "record_left_for_redelivery" in first.log_text()
    finally:
        first.close()
        if second is not None:
            second.close()
    assert events[-1]["status"] == "completed"
    assert len([e for e in events if e["status"] == "completed"]) == 1
    assert {e["attempt"] for e in events if e["status"] == "completed"} == {2}
    running = [e for e in events if e["status"] == "running" and not e.get("heartbeat")]
    assert sorted({e["progress"]["epoch"] for e in running}) == list(range(1, 21))
    first_attempt = max(e["progress"]["epoch"] for e in running if e["attempt"] == 1)
    assert first_attempt < 20
