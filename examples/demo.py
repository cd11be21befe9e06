"""``make run``: the whole product on one machine, with a demo of the backend's two AI workflows.

Starts a local Kafka broker (deploy/local/kafka.sh), a local S3 API (moto's server on 127.0.0.1),
provisions the topics, starts the annotation and the training worker as separate processes, and the
reference fold (examples/fold.py) into SQLite (``.state/demo/fold.sqlite``; ``--database postgresql://...``
or DEMO_DATABASE_URL folds into a PostgreSQL database instead). Then:

1. AI labeling: 10 real sample photos served on 127.0.0.1, zero-shot classified against 4 classes,
   folded, top-1 labels above a threshold applied;
2. duplicates: an ``embed`` request with ``duplicates`` over the photos plus injected copies
   (testkit.image_copies: JPEG quality 10, half size, 5% cropped, PNG; and a byte-identical re-upload),
   the vectors stored in S3, the duplicate groups folded and printed (``<photo>~<kind>`` is a copy of
   ``<photo>``);
3. few-shot: crops of the photos of step 1's classes, a few per class sent as labeled ``examples``, the
   others classified with and without them (zero-shot), both accuracies printed;
4. training: scikit-learn's digits as PNG files in S3 under <class>/<file>, a resnet10t fine-tuned
   through Kafka with per-epoch progress, the model package in S3;
5. inference with the trained model (``"model": "custom"``) on held-back digits;
6. label audit: the held-back digits with 10% of their labels deliberately wrong, audited (``"task": "audit"``)
   on the trained model's embeddings; the review queue folded, precision and recall of ``label_issue``
   against the injected wrong labels printed.

``--once`` (or DEMO_ONCE=1; automatic without a terminal) exits after the demo; otherwise the stack
keeps running for ``cls-worker send ...`` until Ctrl-C. Every process it started is stopped on exit.
Zero-shot weights are random unless CLS_CLIP_WEIGHTS names real ones (a pretrained tag in the hub
cache, a file, or an s3:// URL): the demo says so loudly.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from testkit.local import REPO, LocalBroker, LocalS3, WorkerProcess, worker_env

if TYPE_CHECKING:
    import aioboto3

    from examples.fold import Fold

CLASSES = ["person", "cat", "coffee cup", "flower"]
BUCKET = "cls-demo"
EMBEDDINGS_PREFIX = f"s3://{BUCKET}/embeddings"
AUDITS_PREFIX = f"s3://{BUCKET}/audits"
AUDIT_WRONG_FRACTION = 0.1
COPIED_PHOTOS = ("astronaut.jpg", "coffee.jpg", "camera-man.png")
"""The photos step 2 injects copies of (every kind in testkit.image_copies.COPY_KINDS)."""
REUPLOADED_PHOTO = "chelsea-the-cat.jpg"
"""Uploaded a second time with the same bytes (an exact duplicate)."""
COPY_SEPARATOR = "~"
FEW_SHOT_PHOTOS = {"person": ("astronaut.jpg", "camera-man.png"), "cat": ("chelsea-the-cat.jpg", "cat-detail.png"),
                   "coffee cup": ("coffee.jpg",), "flower": ("flower.jpg",)}
"""Step 3: the photos of each of step 1's classes that crops are cut from."""
FEW_SHOT_CROPS, FEW_SHOT_SHOTS = 8, 3
"""Step 3: crops per class, of which the first ones are the labeled examples and the rest are classified."""


def bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


def say(text: str = "") -> None:
    print(text, flush=True)


class Demo:
    """The stack the demo runs (all of it from ``testkit.local`` and ``testkit.images``), stopped by ``stop``."""

    def __init__(self, state: Path) -> None:
        self.state = state
        port = int(os.environ["DEMO_KAFKA_PORT"]) if os.environ.get("DEMO_KAFKA_PORT") else None
        self.broker = LocalBroker(state / "kafka", port=port)
        self.bootstrap = self.broker.bootstrap
        self.s3 = LocalS3()
        self.images = None
        self.workers: list[WorkerProcess] = []

    def start_kafka(self) -> None:
        say(f"• starting Kafka (KRaft, jars from Maven Central) on {self.bootstrap} ...")
        self.bootstrap = self.broker.start()

    def start_s3(self) -> str:
        endpoint = self.s3.start()
        os.environ.update({"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL": endpoint})
        say(f"• local S3 API (moto) on {endpoint}")
        return endpoint

    def start_images(self, photos: dict[str, bytes]):
        """The image server on 127.0.0.1 with ``photos`` at ``/custom/<name>`` (``add`` serves more)."""
        from testkit.images import content_type, start_image_server

        self.images = start_image_server()
        for name, body in photos.items():
            self.images.add(name, body, content_type=content_type(name))
        return self.images

    def worker_env(self) -> dict[str, str]:
        return {
            **os.environ,
            **worker_env(self.bootstrap, self.state),
            "CLS_DEFAULT_PROMPT_TEMPLATES": os.environ.get("CLS_DEFAULT_PROMPT_TEMPLATES", "a photo of a {}.|a picture of a {}."),
            "CLS_TORCH_THREADS": os.environ.get("CLS_TORCH_THREADS", "1"),
            "CLS_EMBED_OUTPUT_PATH": EMBEDDINGS_PREFIX,
        }

    def start_worker(self, kind: str) -> WorkerProcess:
        worker = WorkerProcess.cli(kind, self.worker_env(), self.state / f"{kind}.log", die_with_parent=True)
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            worker.stop(timeout_s=40)
        if self.images is not None:
            self.images.stop()
        self.s3.stop()
        self.broker.stop()
        say("• stopped workers, S3 API and Kafka")


def injected_copies(photos: dict[str, bytes]) -> dict[str, bytes]:
    """Copies of some of ``photos``, named ``<photo>~<kind>``: each kind of testkit.image_copies for
    COPIED_PHOTOS, and REUPLOADED_PHOTO's own bytes again (``~reupload``)."""
    from PIL import Image

    from testkit.image_copies import image_copies

    out = {}
    for name in COPIED_PHOTOS:
        with Image.open(io.BytesIO(photos[name])) as image:
            image.load()
            for kind, data in image_copies(image).items():
                out[f"{name}{COPY_SEPARATOR}{kind}"] = data
    out[f"{REUPLOADED_PHOTO}{COPY_SEPARATOR}reupload"] = photos[REUPLOADED_PHOTO]
    return out


def original_of(image_id: str) -> str:
    """The photo an image id of step 2 is a copy of (itself for an original)."""
    return image_id.split(COPY_SEPARATOR, 1)[0]


async def produce(bootstrap: str, topic: str, key: str, body: dict) -> None:
    from testkit.kafka import produce as produce_record

    await produce_record(bootstrap, topic, body, key=key)


async def run(demo: Demo, once: bool, database: str | None = None) -> None:
    from examples.fold import Fold, run_fold
    from schemas import topics

    weights = os.environ.get("CLS_CLIP_WEIGHTS", "random")
    if weights == "random":
        say("!" * 100)
        say("! ZERO-SHOT WEIGHTS ARE RANDOM: the machine has no model hub, so CLIP runs with random weights and its")
        say("! predictions are meaningless. Point the worker at real weights with CLS_CLIP_WEIGHTS=<pretrained tag in")
        say("! the hub cache, e.g. laion2b_s34b_b79k> or a file / s3:// URL (see `cls-worker prefetch`).")
        say("!" * 100)
    demo.start_kafka()
    endpoint = demo.start_s3()
    import aioboto3

    session = aioboto3.Session()
    async with session.client("s3", endpoint_url=endpoint) as s3:
        await s3.create_bucket(Bucket=BUCKET)  # embedding files (step 2), digits and the model package (step 4)
    subprocess.run([sys.executable, "-m", "consumers.cli", "topics", "create"], cwd=REPO, env=demo.worker_env(),
                   check=True, capture_output=True, timeout=120)
    say("• topics created (12 partitions per request topic, compacted control topic)")
    for kind in ("annotation", "training"):
        demo.start_worker(kind)
    for worker in demo.workers:
        await worker.wait_for_log("partitions_assigned", timeout_s=180)
    say("• annotation and training workers are up (pids " + " ".join(str(p.pid) for p in demo.workers)
        + "; logs: " + str(demo.state) + "/*.log)")

    fold_target = database or str(demo.state / "fold.sqlite")
    fold = Fold(fold_target)
    stop_fold = asyncio.Event()
    fold_task = asyncio.create_task(run_fold(fold, demo.bootstrap, [topics.ANNOTATION_RESULTS, topics.TRAINING_STATUS],
                                             f"demo-fold-{uuid.uuid4().hex[:6]}", stop_fold))

    async def until(condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if fold_task.done():
                fold_task.result()
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            await asyncio.sleep(0.3)

    # ---------------------------------------------------------------- 1. AI labeling workflow
    say("\n== 1. AI labeling workflow ==")
    from testkit.images import sample_photos

    photos = sample_photos()
    server = demo.start_images(photos)
    base = server.url("custom")  # every file the demo serves is under it (server.add)
    request_id = f"demo-label-{uuid.uuid4().hex[:6]}"
    images = [{"id": name, "url": f"{base}/{name}"} for name in photos]
    await produce(demo.bootstrap, topics.ANNOTATION_REQUESTS, request_id,
                  {"task": "classify", "model": "clip", "images": images, "classes": CLASSES, "top_k": 2, "threshold": 0.0})
    say(f"   sent {len(images)} images, classes {CLASSES}")
    await until(lambda: fold.request_complete(request_id), 300, "annotation results")
    applied = fold.auto_apply(request_id, threshold=0.3)
    say(f"   folded {len(images)} predictions; auto-applied {applied} top-1 labels with confidence >= 0.3")
    rows = fold.query("SELECT image_id, class, confidence, model FROM labels WHERE request_id = ? AND rank = 0"
                      " ORDER BY image_id", (request_id,))
    for image_id, cls, confidence, model in rows[:6]:
        say(f"   {image_id:28s} -> {cls:12s} {confidence:.3f}   ({model})")

    # ---------------------------------------------------------------- 2. duplicates in the photo set
    say("\n== 2. Duplicates in the photo set (embed) ==")
    await find_duplicates(demo, fold, session, endpoint, photos, base, weights, until)

    # ---------------------------------------------------------------- 3. few-shot on its own photos
    say("\n== 3. Few-shot on its own photos (examples) ==")
    await few_shot_on_photos(demo, fold, photos, base, weights, until)

    # ---------------------------------------------------------------- 4. training workflow
    say("\n== 4. Training workflow ==")
    from testkit.images import DIGIT_CLASS_NAMES, digits_splits, write_digits_dataset

    digits_dir = Path(tempfile.mkdtemp(prefix="demo-digits-"))
    samples, class_names = write_digits_dataset(digits_dir)
    _, _, held_back = digits_splits(samples)
    held = set(held_back)
    bucket = BUCKET
    async with session.client("s3", endpoint_url=endpoint) as s3:
        semaphore = asyncio.Semaphore(32)

        async def put(path: str, label: int) -> None:
            async with semaphore:
                await s3.put_object(Bucket=bucket, Key=f"digits/{class_names[label]}/{Path(path).name}",
                                    Body=Path(path).read_bytes())

        await asyncio.gather(*(put(p, label) for p, label in samples if (p, label) not in held))
    say(f"   uploaded {len(samples) - len(held_back)} digit images to s3://{bucket}/digits/<class>/<file>")
    job_id = f"demo-train-{uuid.uuid4().hex[:6]}"
    output = f"s3://{bucket}/models/{job_id}"
    send = subprocess.run([sys.executable, "-m", "consumers.cli", "send", "train", "--dataset", f"s3://{bucket}/digits/",
                           "--model-name", "resnet10t", "--output", output, "--epochs", "4", "--batch-size", "64",
                           "--learning-rate", "0.003", "--augmentation", "none", "--image-size", "32", "--no-pretrained",
                           "--id", job_id, "--no-follow"], cwd=REPO, env=demo.worker_env(), capture_output=True,
                          text=True, timeout=120)
    if send.returncode != 0:
        raise RuntimeError(send.stderr)
    say(f"   job {job_id}: resnet10t, 4 epochs (sent with `cls-worker send train`)")
    last_epoch = -1
    deadline = time.monotonic() + 600
    while True:
        job = fold.job(job_id)
        if job and job["progress"] and job["progress"].get("epoch", 0) != last_epoch and job["status"] == "running":
            last_epoch = job["progress"]["epoch"]
            m = job["progress"]["metrics"]
            say(f"   {bar(last_epoch, job['progress']['epochs'])}  train_loss={m.get('train_loss', 0):.3f}"
                f"  val_accuracy={m.get('val_accuracy', 0):.3f}")
        if job and job["status"] in ("completed", "failed", "cancelled"):
            break
        if time.monotonic() > deadline:
            raise RuntimeError("training did not finish in 10 minutes")
        await asyncio.sleep(0.3)
    if job["status"] != "completed":
        raise RuntimeError(f"training {job['status']}: {job['error']}")
    history = job["metrics"].get("epochs") or []
    say("   training curve:")
    say("     epoch  train_loss  val_loss  val_accuracy")
    for row in history:
        say(f"     {row.get('epoch'):>5}  {row.get('train_loss', 0):>10.4f}  {row.get('val_loss', 0):>8.4f}  {row.get('val_accuracy', 0):>12.4f}")
    say(f"   final val_accuracy {job['metrics']['val_accuracy']:.4f} (best epoch {job['metrics']['best_epoch']}); "
        f"model package at {job['model_url']}")
    m = job["metrics"]
    if m.get("report_url"):
        bucket_name, _, key = m["report_url"].removeprefix("s3://").partition("/")
        async with session.client("s3", endpoint_url=endpoint) as s3:
            body = await (await s3.get_object(Bucket=bucket_name, Key=key))["Body"].read()
        (demo.state / "report.html").write_bytes(body)
        say(f"   report: {m['report_url']} (local copy: {demo.state / 'report.html'})")
    if m.get("temperature"):
        say(f"   calibration: temperature {m['temperature']:.3f}, ECE {m['ece']['before']:.4f} -> {m['ece']['after']:.4f},"
            f" NLL {m['nll']['before']:.4f} -> {m['nll']['after']:.4f}")
        for row in m.get("auto_accept") or []:
            threshold = "never" if row["threshold"] is None else f">= {row['threshold']:.4f}"
            say(f"   auto-accept at precision {row['precision']:.2f}: confidence {threshold}, coverage {row['coverage']:.3f}")

    # ---------------------------------------------------------------- 4. inference with the trained model
    say("\n== 5. Inference with the trained model (\"model\": \"custom\") on held-back digits ==")
    files = {f"held/{i}.png": Path(p).read_bytes() for i, (p, _) in enumerate(held_back)}
    for path, body in files.items():
        server.add(path, body, content_type="image/png")
    infer_id = f"demo-infer-{uuid.uuid4().hex[:6]}"
    await produce(demo.bootstrap, topics.ANNOTATION_REQUESTS, infer_id,
                  {"task": "classify", "model": "custom", "model_url": output, "top_k": 1, "threshold": 0.0,
                   "auto_accept_precision": 0.95,
                   "images": [{"id": f"digit-{i}", "url": f"{base}/held/{i}.png"} for i in range(len(held_back))]})
    await until(lambda: fold.request_complete(infer_id), 300, "custom inference")
    predicted = dict(fold.query("SELECT image_id, class FROM labels WHERE request_id = ? AND rank = 0", (infer_id,)))
    correct = sum(predicted.get(f"digit-{i}") == DIGIT_CLASS_NAMES[label] for i, (_, label) in enumerate(held_back))
    say(f"   {bar(correct, len(held_back))} correct: accuracy {correct / len(held_back):.3f}")
    for i, (_, label) in list(enumerate(held_back))[:5]:
        say(f"   digit-{i}: true {DIGIT_CLASS_NAMES[label]:6s} predicted {predicted.get(f'digit-{i}')}")
    accepted = fold.auto_apply(infer_id)  # the labels the model's validated thresholds accept at precision 0.95
    applied_rows = fold.query("SELECT image_id, class FROM applied_labels WHERE request_id = ?", (infer_id,))
    truth = {f"digit-{i}": DIGIT_CLASS_NAMES[label] for i, (_, label) in enumerate(held_back)}
    right = sum(truth[image_id] == cls for image_id, cls in applied_rows)
    say(f"   auto-applied {accepted} of {len(held_back)} labels at precision 0.95: {right} right"
        f" ({right / max(1, accepted):.3f})")

    # ---------------------------------------------------------------- 6. label audit
    say("\n== 6. Label audit (\"task\": \"audit\"): injected wrong labels found ==")
    await audit_labels(demo, fold, output, base, held_back, until)
    shutil.rmtree(digits_dir, ignore_errors=True)

    say("\nDone. The folded tables are in " + fold_target)
    if not once:
        say(f"The stack keeps running: try `KAFKA_BOOTSTRAP_SERVERS={demo.bootstrap} AWS_ENDPOINT_URL={endpoint} "
            f".venv/bin/cls-worker send annotate --classes cat,dog {base}/chelsea-the-cat.jpg`, or `... send embed"
            f" --duplicates 0.95 {base}/coffee.jpg {base}/chelsea-the-cat.jpg` (vectors under {EMBEDDINGS_PREFIX};"
            " Ctrl-C stops everything)")
        while True:
            await asyncio.sleep(3600)
    stop_fold.set()
    await asyncio.wait_for(fold_task, 30)


async def audit_labels(demo: Demo, fold: Fold, model_url: str, base: str, held_back: list[tuple[str, int]],
                       until: Callable[[Callable[[], bool], float, str], Awaitable[None]]) -> None:
    """Step 6: the held-back digits (served by step 5) with some labels made wrong on purpose, audited with the
    trained model as the backbone; the review queue from the fold, scored against the injected errors."""
    import random

    from schemas import topics
    from testkit.images import DIGIT_CLASS_NAMES

    rng = random.Random(0)
    wrong = set(rng.sample(range(len(held_back)), int(len(held_back) * AUDIT_WRONG_FRACTION)))
    images = []
    for i, (_, label) in enumerate(held_back):
        given = (label + rng.randrange(1, len(DIGIT_CLASS_NAMES))) % len(DIGIT_CLASS_NAMES) if i in wrong else label
        images.append({"id": f"digit-{i}", "url": f"{base}/held/{i}.png", "label": DIGIT_CLASS_NAMES[given]})
    request_id = f"demo-audit-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    await produce(demo.bootstrap, topics.ANNOTATION_REQUESTS, request_id,
                  {"task": "audit", "model": "custom", "model_url": model_url, "images": images,
                   "output_path": AUDITS_PREFIX})
    say(f"   sent {len(images)} held-back digits with their labels, {len(wrong)} of them deliberately wrong"
        f" (request {request_id}; backbone: the model trained in step 4)")
    await until(lambda: fold.request_complete(request_id), 300, "audit results")
    took = time.monotonic() - started
    status, error = fold.query("SELECT status, error FROM annotation_requests WHERE request_id = ?", (request_id,))[0]
    if status != "completed":
        raise RuntimeError(f"audit request {status}: {error}")
    (audit_url, audited, issues, cv_accuracy), = fold.query(
        "SELECT audit_url, audited, label_issues, cv_accuracy FROM audit_requests WHERE request_id = ?", (request_id,))
    flagged = {row["image_id"] for row in fold.review_queue(request_id, limit=len(images), issues_only=True)}
    injected = {f"digit-{i}" for i in wrong}
    hits = len(flagged & injected)
    say(f"   audited {audited} images in {took:.1f} s (request to folded result); cross-validated accuracy against the"
        f" given labels {cv_accuracy:.3f}; table: {audit_url}")
    say(f"   label_issue on {issues} images: precision {hits / max(1, len(flagged)):.3f}, recall"
        f" {hits / max(1, len(injected)):.3f} against the {len(injected)} injected wrong labels")
    say("   the head of the review queue (table audit_entries, by rank):")
    for row in fold.review_queue(request_id, limit=5):
        origin = "injected" if row["image_id"] in injected else "as given"
        suggestion = f"-> {row['suggested_label']}" if row["label_issue"] else "(no issue)"
        say(f"     #{row['rank']} {row['image_id']:10s} labeled {row['label']:6s} p={row['label_probability']:.3f}"
            f" {suggestion:10s} [{origin}]")


async def find_duplicates(demo: Demo, fold: Fold, session: aioboto3.Session, endpoint: str, photos: dict[str, bytes],
                          base: str, weights: str, until: Callable[[Callable[[], bool], float, str], Awaitable[None]]) -> None:
    """Step 2: embed the photos plus injected copies with ``duplicates``, fold the result, print the groups."""
    import numpy as np

    from schemas import topics
    from schemas.annotation import DEFAULT_DUPLICATE_THRESHOLD

    originals = [name for name in photos if COPY_SEPARATOR not in name]
    copies = injected_copies({name: photos[name] for name in originals})
    images = [{"id": name, "url": f"{base}/{name}"} for name in originals]
    for index, (image_id, data) in enumerate(copies.items()):
        extension = "png" if data.startswith(b"\x89PNG") else "jpg"
        path = f"copies/{index}.{extension}"
        demo.images.add(path, data, content_type="image/png" if extension == "png" else "image/jpeg")  # served
        images.append({"id": image_id, "url": f"{base}/{path}"})
    request_id = f"demo-dup-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    await produce(demo.bootstrap, topics.ANNOTATION_REQUESTS, request_id,
                  {"task": "embed", "model": "clip", "images": images, "output_path": EMBEDDINGS_PREFIX,
                   "duplicates": {"threshold": DEFAULT_DUPLICATE_THRESHOLD}})
    kinds = sorted({image_id.split(COPY_SEPARATOR)[1] for image_id in copies})
    say(f"   sent {len(images)} images to embed (request {request_id}): {len(originals)} photos + {len(copies)} injected"
        f" copies ({', '.join(kinds)}) named <photo>{COPY_SEPARATOR}<kind>; duplicates at cosine >= {DEFAULT_DUPLICATE_THRESHOLD}")
    await until(lambda: fold.request_complete(request_id), 300, "embed results")
    took = time.monotonic() - started
    status, error = fold.query("SELECT status, error FROM annotation_requests WHERE request_id = ?", (request_id,))[0]
    if status != "completed":
        raise RuntimeError(f"embed request {status}: {error}")
    parts = fold.query("SELECT embeddings_url, dim, images FROM embedding_parts WHERE request_id = ? ORDER BY part",
                       (request_id,))
    if not parts or not parts[0][0]:
        errors = fold.query("SELECT image_id, code FROM image_errors WHERE request_id = ?", (request_id,))
        raise RuntimeError(f"embed request {request_id} stored no vectors; image errors: {errors[:5]}")
    embedded = sum(row[2] for row in parts)
    say(f"   embedded {embedded} of {len(images)} images in {took:.1f} s (request to folded result); vectors in"
        f" {len(parts)} part file(s): {parts[0][0]}")
    bucket_name, _, key = parts[0][0].removeprefix("s3://").partition("/")
    async with session.client("s3", endpoint_url=endpoint) as s3:
        body = await (await s3.get_object(Bucket=bucket_name, Key=key))["Body"].read()
    with np.load(io.BytesIO(body), allow_pickle=False) as npz:  # as docs/contract.md "Embeddings" loads it
        ids, vectors = npz["ids"], npz["embeddings"]
    say(f"   read back with numpy: {len(ids)} ids, embeddings {vectors.dtype} {tuple(vectors.shape)}")

    groups = fold.duplicates(request_id)
    say(f"   {len(groups)} duplicate groups folded (tables duplicate_groups, duplicate_members):")
    for group in groups:
        shown = ", ".join(group["ids"][:6]) + (f", ... ({len(group['ids']) - 6} more)" if len(group["ids"]) > 6 else "")
        say(f"     {group['kind']:5s}  similarity >= {group['similarity']:.4f}  {len(group['ids']):2d} images: {shown}")
    together = sum(any(image_id in g["ids"] and original_of(image_id) in g["ids"] for g in groups) for image_id in copies)
    exact_pairs = sum(any(g["kind"] == "exact" and {image_id, original_of(image_id)} <= set(g["ids"]) for g in groups)
                      for image_id in copies)
    mixed = sum(len({original_of(i) for i in g["ids"]}) > 1 for g in groups)
    say(f"   injected copies in a group with their photo: {together} of {len(copies)}; found by content hash (exact):"
        f" {exact_pairs}; groups joining different photos: {mixed} of {len(groups)}")
    if weights == "random":
        say("   ! NEAR-DUPLICATE GROUPS ARE NOT MEANINGFUL WITH RANDOM WEIGHTS: random features score unrelated photos")
        say("   ! about as similar as copies (docs/methods.md, \"Near-duplicates\"), so a near group here says nothing about the")
        say("   ! photos in it. Exact groups (byte-identical files, SHA-256) hold with any weights. With pretrained")
        say("   ! weights, set the threshold from the margin between copies and non-copies on your own images.")


def photo_crops(photos: dict[str, bytes], seed: int = 0) -> list[tuple[str, int, bytes]]:
    """(class, index, JPEG bytes): ``FEW_SHOT_CROPS`` square crops per class of ``FEW_SHOT_PHOTOS`` (45-65% of the
    short side, at random places, alternating between the class's photos)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for name, sources in FEW_SHOT_PHOTOS.items():
        for k in range(FEW_SHOT_CROPS):
            image = Image.open(io.BytesIO(photos[sources[k % len(sources)]])).convert("RGB")
            width, height = image.size
            side = int(min(width, height) * rng.uniform(0.45, 0.65))
            x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            buffer = io.BytesIO()
            image.crop((x, y, x + side, y + side)).save(buffer, "JPEG", quality=90)
            out.append((name, k, buffer.getvalue()))
    return out


async def few_shot_on_photos(demo: Demo, fold: Fold, photos: dict[str, bytes], base: str, weights: str,
                             until: Callable[[Callable[[], bool], float, str], Awaitable[None]]) -> None:
    """Step 3: the same held-out crops classified zero-shot and with a few labeled crops as ``examples``."""
    from schemas import topics

    examples, queries, truth = [], [], {}
    for name, k, data in photo_crops(photos):
        path = f"crops/{name.replace(' ', '-')}-{k}.jpg"
        demo.images.add(path, data, content_type="image/jpeg")
        if k < FEW_SHOT_SHOTS:
            examples.append({"url": f"{base}/{path}", "label": name})
        else:
            image_id = f"{name.replace(' ', '-')}-crop-{k}"
            queries.append({"id": image_id, "url": f"{base}/{path}"})
            truth[image_id] = name
    classes = list(FEW_SHOT_PHOTOS)
    suffix = uuid.uuid4().hex[:6]
    zero_id, few_id = f"demo-zero-{suffix}", f"demo-few-{suffix}"
    body = {"task": "classify", "model": "clip", "images": queries, "classes": classes, "top_k": 1, "threshold": 0.0}
    started = time.monotonic()
    await produce(demo.bootstrap, topics.ANNOTATION_REQUESTS, zero_id, body)
    await produce(demo.bootstrap, topics.ANNOTATION_REQUESTS, few_id, {**body, "examples": examples})
    say(f"   {len(examples)} labeled crops ({FEW_SHOT_SHOTS} per class) as examples; {len(queries)} other crops of the"
        f" same photos classified with them and without (zero-shot), classes {classes}")
    await until(lambda: fold.request_complete(zero_id) and fold.request_complete(few_id), 300, "few-shot results")
    took = time.monotonic() - started
    accuracy = {}
    for request_id in (zero_id, few_id):
        status, error = fold.query("SELECT status, error FROM annotation_requests WHERE request_id = ?", (request_id,))[0]
        if status != "completed":
            raise RuntimeError(f"request {request_id} {status}: {error}")
        top1 = dict(fold.query("SELECT image_id, class FROM labels WHERE request_id = ? AND rank = 0", (request_id,)))
        accuracy[request_id] = sum(top1.get(image_id) == name for image_id, name in truth.items()) / len(truth)
    method, n, failed, cv = fold.query("SELECT method, examples, examples_failed, cv_accuracy FROM few_shot_requests"
                                       " WHERE request_id = ?", (few_id,))[0]
    cv_text = "n/a" if cv is None else f"{cv:.3f}"
    say(f"   zero-shot accuracy {accuracy[zero_id]:.3f}   few-shot accuracy {accuracy[few_id]:.3f}"
        f"   (chance {1 / len(classes):.3f}; both requests answered in {took:.1f} s)")
    say(f"   few-shot head: {method} on {n} examples ({failed} failed), cross-validated accuracy on them {cv_text}"
        " (folded: table few_shot_requests)")
    if weights == "random":
        say("   ! with random weights zero-shot is chance; the few-shot head learns from the examples' own embeddings")
        say("   ! (crops of one photo share colour and texture even in random features). Pretrained weights lift both.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--once", action="store_true", help="exit after the demo (also DEMO_ONCE=1, or no terminal)")
    parser.add_argument("--database", default=os.environ.get("DEMO_DATABASE_URL"),
                        help="fold into this PostgreSQL database (postgresql://user@host:port/db) instead of SQLite"
                             " (also DEMO_DATABASE_URL)")
    args = parser.parse_args()
    once = args.once or os.environ.get("DEMO_ONCE") == "1" or not sys.stdin.isatty()
    state = Path(os.environ.get("DEMO_STATE_DIR") or REPO / ".state" / "demo")
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    from consumers.logging_setup import configure_logging

    configure_logging("WARNING", "console")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    demo = Demo(state)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    code = 0
    try:
        asyncio.run(run(demo, once, args.database))
    except KeyboardInterrupt:
        say("\ninterrupted")
    except Exception as exc:  # noqa: BLE001 - report and clean up
        say(f"\ndemo failed: {type(exc).__name__}: {exc}")
        code = 1
    finally:
        demo.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
