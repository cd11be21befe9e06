"""The backend's two AI workflows end to end: workers as subprocesses, real Kafka, real S3 API, the
reference fold into SQLite; each also with a worker killed (SIGKILL) and restarted in the middle."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from examples.fold import Fold, run_fold
from testkit.images import DIGIT_CLASS_NAMES, digits_splits, write_digits_dataset
from testkit.kafka import produce, provision, settings_for, topic_env
from testkit.local import REPO, WorkerProcess

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.slow]

ANNOTATION_ENV = {
    "CLS_CLIP_VARIANT": "cls-tiny-clip", "CLS_CLIP_WEIGHTS": "random", "CLS_PRELOAD_MODELS": "clip",
    "CLS_DEFAULT_PROMPT_TEMPLATES": "a photo of a {}.", "CLS_ALLOW_PRIVATE_NETWORKS": "true",
    "CLS_TORCH_THREADS": "1", "CLS_LOG_FORMAT": "json", "CLS_DEVICE": "cpu", "CLS_RESULT_PART_SIZE": "4",
    # a killed worker holds its partitions until its session times out: 10 s instead of 30 s
    "CLS_SESSION_TIMEOUT_MS": "10000", "CLS_HEARTBEAT_INTERVAL_MS": "1000",
}
TRAINING_ENV = {"CLS_TORCH_THREADS": "2", "CLS_LOG_FORMAT": "json", "CLS_DEVICE": "cpu", "CLS_ALLOW_PRIVATE_NETWORKS": "true",
                "CLS_SESSION_TIMEOUT_MS": "10000", "CLS_HEARTBEAT_INTERVAL_MS": "1000"}
SAMPLE_NAMES = ["astronaut_jpg", "chelsea_png", "coffee_jpg", "camera_png", "china_jpg", "flower_jpg", "cmyk_jpg",
                "gray16_png", "rgba_png", "exif_rotated_jpg"]


class Stack:
    """Both workers and the fold, for one test's topics."""

    def __init__(self, tmp: Path, prefix: str, bootstrap: str) -> None:
        self.tmp, self.prefix, self.bootstrap = tmp, prefix, bootstrap
        self.settings = settings_for(prefix)
        self.fold = Fold(tmp / "fold.sqlite")
        self.stop = asyncio.Event()
        self.fold_task: asyncio.Task | None = None
        self.workers: dict[str, WorkerProcess] = {}
        self.starts = 0

    def start_worker(self, kind: str, **extra: str) -> WorkerProcess:
        self.starts += 1
        env = {**topic_env(self.prefix), **(ANNOTATION_ENV if kind == "annotation" else TRAINING_ENV), **extra,
               "CLS_TRAINING_WORK_DIR": str(self.tmp / f"work-{self.starts}"),
               "CLS_DATASET_CACHE_DIR": str(self.tmp / "images"), "CLS_MODEL_DIR": str(self.tmp / f"models-{self.starts}")}
        worker = WorkerProcess("consumers.cli", [kind], env, self.tmp / f"{kind}-{self.starts}.log")
        self.workers[kind] = worker
        return worker

    async def start(self) -> None:
        await provision(self.settings)
        for kind in ("annotation", "training"):
            self.start_worker(kind)
        for worker in self.workers.values():
            await worker.wait_for_log("partitions_assigned", timeout_s=120)
        w = self.settings.worker
        self.fold_task = asyncio.create_task(run_fold(self.fold, self.bootstrap,
                                                      [w.annotation_results_topic, w.training_status_topic],
                                                      f"{self.prefix}-fold", self.stop))

    async def restart(self, kind: str, **extra: str) -> WorkerProcess:
        worker = self.workers[kind]
        worker.proc.send_signal(signal.SIGKILL)
        await worker.wait_exit(30)
        worker.close()
        return self.start_worker(kind, **extra)

    async def close(self) -> None:
        self.stop.set()
        if self.fold_task is not None:
            await asyncio.wait_for(self.fold_task, 30)
        for worker in self.workers.values():
            worker.close()

    async def wait(self, condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.fold_task is not None and self.fold_task.done():
                self.fold_task.result()
            if time.monotonic() > deadline:
                logs = "\n".join(w.log_text()[-3000:] for w in self.workers.values())
                raise AssertionError(f"timed out waiting for {what}\n{logs}")
            await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
async def stack(tmp_path_factory, kafka_bootstrap, s3_server):
    """One stack (topics, both workers, the fold) for the module's four runs: each run has its own request
    and job ids, and a run that kills a worker leaves its restarted replacement to the next."""
    stack = Stack(tmp_path_factory.mktemp("workflows"), f"t{uuid.uuid4().hex[:10]}", kafka_bootstrap)
    await stack.start()
    try:
        yield stack
    finally:
        await stack.close()


@pytest.mark.parametrize("kill", [False, True], ids=["steady", "worker-killed"])
async def test_ai_labeling_workflow(stack: Stack, http_server, kill, tmp_path):
    # 1. a dataset with 4 unique classes; 2. ten real images served on 127.0.0.1
    classes = ["person", "cat", "coffee", "flower"]
    images = [{"id": f"img-{i}", "url": http_server.urls[name]} for i, name in enumerate(SAMPLE_NAMES)]
    request_id = f"label-{uuid.uuid4().hex[:8]}"
    body = {"task": "classify", "model": "clip", "images": images, "classes": classes, "top_k": 4, "threshold": 0.0}
    w = stack.settings.worker
    # 3. produce the annotation request; with kill, the worker dies (SIGKILL-like os._exit) after its
    #    results are acknowledged and before its commit, and a restarted worker handles it again
    if kill:
        crashing = await stack.restart("annotation", CLS_FAULT_CRASH_AFTER_PUBLISH="1")
        await crashing.wait_for_log("partitions_assigned", timeout_s=120)
    await produce(stack.bootstrap, w.annotation_requests_topic, body, key=request_id)
    if kill:
        assert await crashing.wait_exit(120) == 137
        crashing.close()
        stack.start_worker("annotation")
    # 4. wait for the folded predictions
    await stack.wait(lambda: stack.fold.request_complete(request_id), 180, "folded predictions")
    # 5. auto-apply top-1 labels above a threshold
    threshold = 1 / len(classes)  # top-1 of a softmax over 4 classes is always >= 0.25
    applied = stack.fold.auto_apply(request_id, threshold)
    # 6. one label per image, with the model and its confidence
    rows = stack.fold.query("SELECT image_id, class, confidence, source, model, request_id FROM applied_labels"
                            " WHERE request_id = ? ORDER BY image_id", (request_id,))
    assert applied == len(images) == len(rows)
    assert {r[0] for r in rows} == {img["id"] for img in images}
    for image_id, cls, confidence, source, model, rid in rows:
        assert cls in classes and confidence >= threshold and source == "ai" and rid == request_id
        assert model == "clip/cls-tiny-clip/random"
    labels = stack.fold.query("SELECT COUNT(*) FROM labels WHERE request_id = ?", (request_id,))[0][0]
    assert labels == len(images) * len(classes)
    _RESULTS.setdefault("labeling", {})[kill] = {r[0]: (r[1], r[2]) for r in rows}
    if len(_RESULTS["labeling"]) == 2:  # killed run folds to the same labels as the steady one
        steady, killed = _RESULTS["labeling"][False], _RESULTS["labeling"][True]
        assert steady.keys() == killed.keys()
        for image_id in steady:
            assert steady[image_id][0] == killed[image_id][0]
            assert abs(steady[image_id][1] - killed[image_id][1]) < 1e-4

    # The fold is idempotent: replaying both topics from offset 0, twice, changes nothing.
    before = stack.fold.dump()
    db_bytes = Path(stack.fold.target).read_bytes()
    for replay in range(2):
        folded = await replay_into(stack.fold, stack.bootstrap, [w.annotation_results_topic, w.training_status_topic],
                                   f"{stack.prefix}-replay-{request_id}-{replay}")
        assert folded == 0
    assert stack.fold.dump() == before
    assert Path(stack.fold.target).read_bytes() == db_bytes


_RESULTS: dict[str, dict] = {}


async def replay_into(fold: Fold, bootstrap: str, topics: list[str], group: str) -> int:
    """Read the topics from offset 0 to their current end into ``fold``; returns events folded."""
    from testkit.kafka import end_offsets

    ends: dict = {}
    for topic in topics:
        ends.update(await end_offsets(bootstrap, topic))
    stop = asyncio.Event()
    task = asyncio.create_task(run_fold(fold, bootstrap, topics, group, stop))
    from testkit.kafka import committed_offsets

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        committed = await committed_offsets(bootstrap, group)
        if all(committed.get(tp, 0) >= end for tp, end in ends.items() if end):
            break
        await asyncio.sleep(0.3)
    stop.set()
    return await asyncio.wait_for(task, 30)


@pytest.fixture(scope="module")
async def digits_prefix(s3_server, tmp_path_factory):
    """Digits PNGs in S3 under <class>/<file> (90% of them), and the held-back 10% as local files."""
    directory = tmp_path_factory.mktemp("e2e-digits")
    samples, class_names = write_digits_dataset(directory)
    _, _, test = digits_splits(samples)
    held_back = set(test)
    rest = [s for s in samples if s not in held_back]
    bucket = f"e2e-{uuid.uuid4().hex[:8]}"
    async with s3_server.client() as client:
        await client.create_bucket(Bucket=bucket)
        semaphore = asyncio.Semaphore(32)

        async def put(path: str, label: int) -> None:
            async with semaphore:
                await client.put_object(Bucket=bucket, Key=f"digits/{class_names[label]}/{Path(path).name}",
                                        Body=Path(path).read_bytes())

        await asyncio.gather(*(put(p, label) for p, label in rest))
    return bucket, f"s3://{bucket}/digits/", test


@pytest.mark.parametrize("kill", [False, True], ids=["steady", "worker-killed"])
async def test_training_workflow(stack: Stack, digits_prefix, http_server, kill):
    bucket, prefix, test = digits_prefix
    job_id = f"train-{uuid.uuid4().hex[:8]}"
    output = f"s3://{bucket}/models/{job_id}"
    # 2. start a training job with the people's CLI (lists <class>/<file> keys under the prefix)
    env = {**os.environ, **topic_env(stack.prefix)}
    cmd = [sys.executable, "-m", "consumers.cli", "send", "train", "--dataset", prefix, "--model-name", "resnet10t",
           "--output", output, "--epochs", "4", "--batch-size", "64", "--learning-rate", "0.003",
           "--augmentation", "none", "--image-size", "32", "--no-pretrained", "--id", job_id, "--no-follow"]
    sent = await asyncio.to_thread(subprocess.run, cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr
    if kill:
        await stack.wait(lambda: (stack.fold.job(job_id) or {}).get("status") == "running", 240, "first epoch")
        await stack.restart("training")
    # 3. poll the folded job row until completed (bounded)
    await stack.wait(lambda: (stack.fold.job(job_id) or {}).get("status") in ("completed", "failed"), 300, "job done")
    job = stack.fold.job(job_id)
    assert job["status"] == "completed", job
    assert job["metrics"]["val_accuracy"] >= 0.9
    if kill:
        assert job["attempt"] == 2
    # 4. the model package is in S3
    assert job["model_url"] == output
    # 5. inference with the trained model through the annotation worker, on held-back digits
    images = [{"id": f"digit-{i}", "url": http_server.add(f"e2e/{job_id}/{i}.png", Path(p).read_bytes(), content_type="image/png")}
              for i, (p, _) in enumerate(test)]
    request_id = f"infer-{job_id}"
    await produce(stack.bootstrap, stack.settings.worker.annotation_requests_topic,
                  {"task": "classify", "model": "custom", "model_url": output, "images": images, "top_k": 1,
                   "threshold": 0.0}, key=request_id)
    await stack.wait(lambda: stack.fold.request_complete(request_id), 180, "custom inference")
    rows = dict(stack.fold.query("SELECT image_id, class FROM labels WHERE request_id = ? AND rank = 0",
                                 (request_id,)))
    correct = sum(rows[f"digit-{i}"] == DIGIT_CLASS_NAMES[label] for i, (_, label) in enumerate(test))
    assert correct / len(test) >= 0.9, correct / len(test)
