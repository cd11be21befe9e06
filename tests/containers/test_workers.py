"""The workers as containers (the local images of ``make images``): the two seed workflows through the
container stack, and the container's own behaviour: non-root user, health only after the model is
loaded, a model cache volume that outlives its container, and ``docker stop`` draining in-flight work."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from examples.fold import Fold, run_fold
from schemas import topics
from testkit.containers import WorkerSpec, WorkerStack
from testkit.pictures import photo_jpeg
from testkit.images import DIGIT_CLASS_NAMES, digits_splits, write_digits_dataset
from testkit.kafka import committed_offsets, end_offsets, produce, read_until, topic_env

pytestmark = pytest.mark.container

CLASSES = ["person", "cat", "coffee", "flower"]


def _upload(stack: WorkerStack, bucket: str, objects: dict[str, bytes]) -> None:
    client = stack.s3.client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: client.put_object(Bucket=bucket, Key=item[0], Body=item[1]), objects.items()))


def _results_for(request_id: str):  # noqa: ANN202
    """A read_until condition: every part of one request's annotation result arrived."""
    def done(records) -> bool:  # noqa: ANN001
        parts = [r.json() for r in records if r.key == request_id.encode()]
        return bool(parts) and len({p["part"] for p in parts}) == parts[0]["parts"]
    return done


def _tiny_clip_weights(path: Path) -> Path:
    """Random tiny-CLIP weights as a safetensors file (what a real weights file looks like to the worker)."""
    from ml.weights import save_state_dict
    from ml.backbones import load_zero_shot_model

    model = load_zero_shot_model("clip", "cls-tiny-clip", "random", device="cpu", seed=7)
    return save_state_dict(model.module, path)


async def test_ai_labeling_workflow_through_containers(stack: WorkerStack, tmp_path):
    """Backend: upload images, send a classify request, fold the results, auto-apply top-1 labels."""
    keys = {f"labeling/{i}.jpg": photo_jpeg(i) for i in range(8)}
    _upload(stack, "datasets", keys)
    images = [{"id": f"img-{i}", "url": f"s3://datasets/{key}"} for i, key in enumerate(keys)]
    request_id = f"label-{uuid.uuid4().hex[:8]}"
    fold = Fold(tmp_path / "fold.sqlite")
    stop = asyncio.Event()
    folding = asyncio.create_task(run_fold(fold, stack.bootstrap_servers, [topics.ANNOTATION_RESULTS], "fold-labeling", stop))
    try:
        await produce(stack.bootstrap_servers, topics.ANNOTATION_REQUESTS,
                      {"task": "classify", "model": "clip", "images": images, "classes": CLASSES, "top_k": 4,
                       "threshold": 0.0}, key=request_id)
        deadline = time.monotonic() + 120
        while not fold.request_complete(request_id):
            assert time.monotonic() < deadline, stack.worker("annotation").logs()[-3000:]
            assert not folding.done(), folding.result()
            await asyncio.sleep(0.25)
    finally:
        stop.set()
        await asyncio.wait_for(folding, 30)
    threshold = 1 / len(CLASSES)  # a softmax over 4 classes always puts its top-1 at >= 0.25
    assert fold.auto_apply(request_id, threshold) == len(images)
    rows = fold.query("SELECT image_id, class, confidence, model FROM applied_labels WHERE request_id = ?",
                      (request_id,))
    assert {r[0] for r in rows} == {image["id"] for image in images}
    for _, cls, confidence, model in rows:
        assert cls in CLASSES and confidence >= threshold and model == "clip/cls-tiny-clip/random"
    labels = fold.query("SELECT COUNT(*) FROM labels WHERE request_id = ?", (request_id,))[0][0]
    assert labels == len(images) * len(CLASSES)


@pytest.fixture(scope="module")
def digits_in_s3(stack: WorkerStack, tmp_path_factory):
    """Digits PNGs in s3://datasets/digits/<class>/<file> (90%), and the held-back 10% in s3://datasets/heldback/."""
    samples, class_names = write_digits_dataset(tmp_path_factory.mktemp("digits"), limit=900)
    _, _, test = digits_splits(samples)
    held_back = set(test)
    train = {f"digits/{class_names[label]}/{Path(p).name}": Path(p).read_bytes() for p, label in samples if (p, label) not in held_back}
    heldback = {f"heldback/{i}.png": Path(p).read_bytes() for i, (p, _) in enumerate(test)}
    _upload(stack, "datasets", {**train, **heldback})
    return sorted(train), [(f"heldback/{i}.png", label) for i, (_, label) in enumerate(test)]


async def test_training_then_inference_through_containers(stack: WorkerStack, digits_in_s3):
    """Backend: a training job on labeled S3 images, its status events, then inference with the trained model."""
    train_keys, heldback = digits_in_s3
    job_id = f"train-{uuid.uuid4().hex[:8]}"
    output = f"s3://models/{job_id}"
    await produce(stack.bootstrap_servers, topics.TRAINING_REQUESTS, {
        "task": "train", "job_id": job_id,
        "config": {"model_name": "resnet10t", "num_classes": 10, "epochs": 3, "batch_size": 64, "learning_rate": 0.003,
                   "augmentation": "none", "image_size": 32, "pretrained": False, "num_workers": 0},
        "dataset": {"train_urls": [f"s3://datasets/{k}" for k in train_keys], "val_urls": [], "class_names": DIGIT_CLASS_NAMES},
        "output_path": output}, key=job_id)

    def finished(records) -> bool:  # noqa: ANN001
        return any(r.key == job_id.encode() and r.json()["status"] in ("completed", "failed") for r in records)

    statuses = [r.json() for r in await read_until(stack.bootstrap_servers, topics.TRAINING_STATUS, finished, 300)
                if r.key == job_id.encode()]
    final = statuses[-1]
    assert final["status"] == "completed", final
    assert [s["progress"]["epoch"] for s in statuses if s["status"] == "running" and s.get("progress")][-1] == 3
    assert final["model_url"] == output and final["metrics"]["val_accuracy"] >= 0.7
    listed = stack.s3.client().list_objects_v2(Bucket="models", Prefix=f"{job_id}/")
    assert {"model.safetensors", "config.json", "metrics.json"} <= {o["Key"].rsplit("/", 1)[1] for o in listed["Contents"]}

    request_id = f"infer-{job_id}"
    images = [{"id": f"digit-{i}", "url": f"s3://datasets/{key}"} for i, (key, _) in enumerate(heldback)]
    await produce(stack.bootstrap_servers, topics.ANNOTATION_REQUESTS,
                  {"task": "classify", "model": "custom", "model_url": output, "images": images, "top_k": 1,
                   "threshold": 0.0}, key=request_id)
    records = await read_until(stack.bootstrap_servers, topics.ANNOTATION_RESULTS, _results_for(request_id), 180)
    predicted = {}
    for part in (r.json() for r in records if r.key == request_id.encode()):
        assert part["status"] == "completed", part
        predicted.update({e["id"]: e["predictions"][0]["class"] for e in part["results"]})
    correct = sum(predicted[f"digit-{i}"] == DIGIT_CLASS_NAMES[label] for i, (_, label) in enumerate(heldback))
    assert correct / len(heldback) >= 0.7, correct / len(heldback)  # chance: 0.1


def test_workers_run_as_a_non_root_user(stack: WorkerStack):
    for kind in ("annotation", "training"):
        worker = stack.worker(kind)
        assert worker.docker.attrs["Config"]["User"] == "cls"
        code, status = worker.exec("cat", "/proc/1/status")  # PID 1 is the worker itself (exec-form ENTRYPOINT)
        assert code == 0
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        assert fields["Name"].strip().startswith("cls-worker") or "python" in fields["Name"]
        assert fields["Uid"].split() == ["10001"] * 4 and fields["Gid"].split() == ["10001"] * 4
        code, _ = worker.exec("touch", "/opt/venv/owned-by-root")
        assert code != 0, "the worker must not be able to change its own code"


def _own_topics(stack: WorkerStack, name: str) -> dict[str, str]:
    env = topic_env(f"{name}-{uuid.uuid4().hex[:6]}")
    stack.provision_topics(env)
    return env


def test_health_reports_ready_only_after_the_model_is_loaded(stack: WorkerStack, tmp_path):
    """Probes from the host while the worker starts: never ready before its log says the model loaded."""
    weights = _tiny_clip_weights(tmp_path / "tiny-clip.safetensors")
    weights.chmod(0o600)
    with pytest.raises(PermissionError, match="uid 10001"):  # the worker's user could not read it
        stack.start_worker(WorkerSpec("annotation", weights_file=weights))
    weights.chmod(0o644)
    spec = WorkerSpec("annotation", env=_own_topics(stack, "health"), weights_file=weights, health_interval_s=0.5)
    worker = stack.start_worker(spec)
    try:
        samples = []
        deadline = time.monotonic() + 180
        while True:
            answer, health = worker.readyz(), worker.health()  # probe first, then read the log
            loaded = "model_loaded" in worker.logs()
            samples.append((answer[0] if answer else None, health, loaded))
            if answer is not None and answer[0] == 200 and health == "healthy":
                break
            assert time.monotonic() < deadline, (samples[-5:], worker.logs()[-3000:])
            time.sleep(0.2)
        not_ready = [s for s in samples if s[0] != 200 and s[1] != "healthy"]
        assert not_ready and not_ready[0][1] == "starting", samples[:5]
        for status, health, loaded in samples:
            if status == 200 or health == "healthy":
                assert loaded, f"ready before the model loaded: {samples}"
        loads = [json.loads(line) for line in worker.logs().splitlines() if '"model_loaded"' in line]
        assert loads[0]["weights"] == f"/weights/{weights.name}"  # the mounted file, read-only
    finally:
        worker.remove()


def test_health_never_ready_when_the_model_cannot_load(stack: WorkerStack):
    """Weights that do not exist: the worker runs (and would answer with failed events) but is never ready."""
    env = {**_own_topics(stack, "nomodel"), "CLS_CLIP_WEIGHTS": "/weights/missing.safetensors"}
    worker = stack.start_worker(WorkerSpec("annotation", env=env, health_interval_s=0.5))
    try:
        worker.wait_for_log("health_server_started", timeout_s=180)
        assert "preload_failed" in worker.logs()
        deadline = time.monotonic() + 6  # a dozen health-check intervals
        while time.monotonic() < deadline:
            answer = worker.readyz()
            assert answer is not None and answer[0] == 503 and answer[1]["ready"] is False, answer
            assert worker.health() != "healthy"
            time.sleep(0.5)
    finally:
        worker.remove()


def test_model_cache_volume_survives_the_container(stack: WorkerStack, tmp_path):
    """s3:// weights land in the /cache volume; a new container on that volume starts without S3 having them."""
    import docker

    weights = _tiny_clip_weights(tmp_path / "cached-clip.safetensors")
    key = f"weights/{uuid.uuid4().hex[:8]}/tiny-clip.safetensors"
    stack.s3.client().put_object(Bucket="models", Key=key, Body=weights.read_bytes())
    volume = f"cls-cache-{uuid.uuid4().hex[:8]}"
    env = {**_own_topics(stack, "cache"), "CLS_CLIP_WEIGHTS": f"s3://models/{key}"}
    client = docker.from_env()
    try:
        first = stack.start_worker(WorkerSpec("annotation", env=env, cache_volume=volume)).wait_ready()
        code, listing = first.exec("find", "/cache/cls-workers/models", "-name", "tiny-clip.safetensors")
        assert code == 0 and listing.strip(), listing
        assert first.stop_gracefully(30) == 0
        first.remove()
        stack.s3.client().delete_object(Bucket="models", Key=key)  # only the volume has them now
        second = stack.start_worker(WorkerSpec("annotation", env=env, cache_volume=volume)).wait_ready()
        logs = second.logs()
        assert '"model_loaded"' in logs and f"s3://models/{key}" in logs and "preload_failed" not in logs
        second.remove()
    finally:
        client.volumes.get(volume).remove(force=True)
        client.close()


def _metric(worker, name: str) -> float:  # noqa: ANN001
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


async def test_docker_stop_drains_in_flight_work_and_leaves_no_lag(stack: WorkerStack):
    """SIGTERM with requests in flight: they finish and are committed within the grace period; lag 0."""
    env = _own_topics(stack, "drain")
    env.update({"CLS_DRAIN_TIMEOUT_S": "60", "CLS_MAX_IN_FLIGHT": "8"})
    worker = stack.start_worker(WorkerSpec("annotation", env=env)).wait_ready()
    try:
        big = photo_jpeg(0, size=(1600, 1200))
        _upload(stack, "datasets", {f"drain/{i}.jpg": big for i in range(48)})
        images = [{"id": f"img-{i}", "url": f"s3://datasets/drain/{i}.jpg"} for i in range(48)]
        request_ids = [f"drain-{uuid.uuid4().hex[:8]}" for _ in range(4)]
        for request_id in request_ids:
            await produce(stack.bootstrap_servers, env["CLS_ANNOTATION_REQUESTS_TOPIC"],
                          {"task": "classify", "model": "clip", "images": images, "classes": CLASSES}, key=request_id)
        deadline = time.monotonic() + 60
        while _metric(worker, "cls_in_flight_records") < len(request_ids):
            assert time.monotonic() < deadline, worker.logs()[-3000:]
            await asyncio.sleep(0.1)
        in_flight = _metric(worker, "cls_in_flight_records")
        started = time.monotonic()
        exit_code = await asyncio.to_thread(worker.stop_gracefully, 90)
        stopped_in = time.monotonic() - started
        assert in_flight >= 1, "nothing was in flight when the worker was stopped"
        assert exit_code == 0 and stopped_in < 60, (exit_code, stopped_in, worker.logs()[-3000:])
        assert "signal_received" in worker.logs()
        results = env["CLS_ANNOTATION_RESULTS_TOPIC"]
        for request_id in request_ids:
            records = await read_until(stack.bootstrap_servers, results, _results_for(request_id), 30)
            parts = [r.json() for r in records if r.key == request_id.encode()]
            assert all(p["status"] == "completed" for p in parts)
            assert sum(len(p["results"]) for p in parts) == len(images)
        ends = await end_offsets(stack.bootstrap_servers, env["CLS_ANNOTATION_REQUESTS_TOPIC"])
        committed = await committed_offsets(stack.bootstrap_servers, env["CLS_ANNOTATION_GROUP_ID"])
        lag = sum(end - committed.get(tp, 0) for tp, end in ends.items())
        assert lag == 0, (ends, committed)
    finally:
        worker.remove()
