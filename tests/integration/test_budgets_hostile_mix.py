"""The hostile mix through the real broker: a real ``cls-worker annotation`` and ``cls-worker training`` process,
the real S3 API and the local image server, sent at once: ICO bombs, model packages whose config.json demands
huge preprocessing (or nests deeply), a giant training architecture, manifests over their caps, a compressed
``against`` file, 50 distinct 100-class few-shot support sets, ``$`` class names and ``..`` ids.

Every record ends with an answer (a result or a terminal status), each worker's peak RSS stays under 2.5 GB,
no object is written outside its output prefix, and a one-image interactive request sent in the middle is
answered about as fast as on the idle worker.
"""

from __future__ import annotations

import asyncio
import io
import json
import time

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from PIL import Image

from ml.training.package import build_package_config
from testkit.worker_processes import PEAK_RSS_LIMIT, peak_rss_bytes
from testkit.images import ico_bmp_frame, ico_bomb
from testkit.kafka import provision, read_until, send, settings_for
from testkit.worker_processes import start_annotation_worker, start_training_worker

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.slow]

FEW_SHOT_SETS, FEW_SHOT_CLASSES = 50, 100
MANIFEST_CAP = 8 * 1024 * 1024  # CLS_MANIFEST_MAX_BYTES here (256 MiB by default); the big manifest is twice it
TERMINAL = {"completed", "failed", "cancelled"}


def _png(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def _package_config(side: int, crop_pct: float) -> bytes:
    config = build_package_config(
        model_name="test_resnet", model_kwargs={}, class_names=["a", "b"], training={}, best_epoch=1,
        data_config={"input_size": [3, side, side], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
                     "crop_pct": crop_pct, "crop_mode": "center"})
    return json.dumps(config).encode()


def _compressed_against() -> bytes:
    """Valid unit vectors, all alike: ~16 MiB of float16 once read, a few hundred KB stored."""
    rows, dim = 131_072, 64
    vectors = np.zeros((rows, dim), np.float16)
    vectors[:, 0] = 1.0
    out = io.BytesIO()
    np.savez_compressed(out, ids=np.array([f"{i:07d}" for i in range(rows)]), embeddings=vectors)
    return out.getvalue()


async def test_hostile_mix_ends_every_record_within_bounded_memory(tmp_path, kafka_bootstrap, topic_prefix,
                                                                  http_server, s3_server, s3_bucket):
    settings = settings_for(topic_prefix)
    await provision(settings)
    w = settings.worker
    bucket = f"s3://{s3_bucket}"

    # -- the inputs: images on the image server, packages, files and manifests in S3 ---------------------------
    url = {f"img{k}": http_server.add(f"mix/img{k}.png", _png(k), content_type="image/png")
           for k in range(FEW_SHOT_CLASSES + 2)}
    bombs = [http_server.add("mix/bomb-png.ico", ico_bomb(10_000, 8_000), content_type="image/x-icon"),
             http_server.add("mix/bomb-big.ico", ico_bomb(3_000, 3_000), content_type="image/x-icon"),
             http_server.add("mix/bomb-bmp.ico", ico_bmp_frame(6_000, 6_000), content_type="image/x-icon")]
    manifest_line = json.dumps({"url": url["img0"], "label": "a", "split": "train", "pad": "x" * 60}).encode() + b"\n"
    objects = {
        "pkg-crop/config.json": _package_config(224, 0.005),  # Resize(44800): 6-8 GB per image
        "pkg-size/config.json": _package_config(8192, 1.0),
        "pkg-nested/config.json": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        "against/compressed.npz": _compressed_against(),
        "manifests/big.jsonl": manifest_line * (2 * MANIFEST_CAP // len(manifest_line) + 1),
        "manifests/examples.jsonl": b"".join(json.dumps({"url": url["img1"], "label": f"c{k % 3}"}).encode() + b"\n"
                                             for k in range(3_000)),  # over CLS_FEWSHOT_MAX_EXAMPLES (2,000)
    }
    async with s3_server.client() as client:
        for key, body in objects.items():
            await client.put_object(Bucket=s3_bucket, Key=key, Body=body)

    def classify(request_id: str, images: list[str], **extra) -> dict:
        body = {"task": "classify", "model": "clip", "request_id": request_id, "top_k": 2, "threshold": 0.0,
                "images": [{"id": f"i{k}", "url": u} for k, u in enumerate(images)], "classes": ["cat", "dog"], **extra}
        return {k: v for k, v in body.items() if v is not None}

    classes = [f"class ${k}$" for k in range(FEW_SHOT_CLASSES)]  # '$' in every label: matplotlib mathtext's
    annotation: dict[str, dict] = {
        "ico-bombs": classify("ico-bombs", [*bombs, url["img0"]]),
        "pkg-crop": classify("pkg-crop", [url["img0"]], model="custom", model_url=f"{bucket}/pkg-crop", classes=None),
        "pkg-size": classify("pkg-size", [url["img0"]], model="custom", model_url=f"{bucket}/pkg-size", classes=None),
        "pkg-nested": classify("pkg-nested", [url["img0"]], model="custom", model_url=f"{bucket}/pkg-nested",
                               classes=None),
        "against": {"task": "embed", "model": "clip", "request_id": "against", "output_path": f"{bucket}/out",
                    "images": [{"id": "a", "url": url["img0"]}], "duplicates": {},
                    "against": [f"{bucket}/against/compressed.npz"]},
        "dollar": classify("dollar", [url["img0"]], classes=["$x^2$", "$\\alpha$ dog", "$$", "cat $"]),
        "..": {"task": "embed", "model": "clip", "request_id": "..", "output_path": f"{bucket}/out",
               "images": [{"id": "..", "url": url["img0"]}, {"id": "../../x", "url": url["img1"]}]},
        "examples-manifest": classify("examples-manifest", [url["img0"]], classes=None,
                                      examples_url=f"{bucket}/manifests/examples.jsonl"),
    }
    for s in range(FEW_SHOT_SETS):  # distinct support sets: the same images, labels rotated per set
        examples = [{"url": url[f"img{k}"], "label": classes[(k + s) % FEW_SHOT_CLASSES]}
                    for k in range(FEW_SHOT_CLASSES)]
        annotation[f"fs-{s}"] = classify(f"fs-{s}", [url[f"img{FEW_SHOT_CLASSES}"]], classes=classes,
                                         examples=examples, priority="bulk")

    def train(job_id: str, **config) -> dict:
        return {"task": "train", "job_id": job_id, "output_path": f"{bucket}/models/{job_id.replace('.', 'dot')}",
                "config": {"model_name": "test_resnet", "num_classes": 2, "epochs": 1, "batch_size": 2,
                           "pretrained": False, "image_size": 16, **config},
                "dataset": {"class_names": ["a", "b"], "train_urls": [url["img0"], url["img1"]]}}

    training: dict[str, dict] = {
        "giant": train("giant", model_name="vit_gigantic_patch14_clip_224", batch_size=1, image_size=None),
        "manifest-big": {**train("manifest-big"), "dataset": {"class_names": ["a", "b"],
                                                              "manifest_url": f"{bucket}/manifests/big.jsonl"}},
        # a '..' job id and '$' class names (matplotlib mathtext in the report): trains, and its package and report
        # land under its own output_path
        "..": {**train(".."), "dataset": {"class_names": ["$x^2$", "$\\alpha$"],
                                         "train_urls": [{"url": url[f"img{k}"], "label": ["$x^2$", "$\\alpha$"][k % 2]}
                                                        for k in range(8)]}},
    }

    common = {"CLS_RETRY_BACKOFF_S": "0.05", "CLS_RETRY_BACKOFF_MAX_S": "0.2", "CLS_S3_ALLOWED_BUCKETS": s3_bucket,
              "CLS_MANIFEST_MAX_BYTES": str(MANIFEST_CAP), "CLS_TRAINING_MEMORY_BUDGET_MB": "2048"}
    annotation_worker = start_annotation_worker(tmp_path, topic_prefix, "mix-annotation", CLS_EMBED_AGAINST_MAX_MB="4",
                                                CLS_TORCH_THREADS="1", CLS_HANDLER_TIMEOUT_S="120", **common)
    training_worker = start_training_worker(tmp_path, topic_prefix, "mix-training", **common)
    ping = classify("ping", [url[f"img{FEW_SHOT_CLASSES + 1}"]], priority="interactive")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", max_request_size=4 * 1024 * 1024)
    try:
        await annotation_worker.wait_for_log("partitions_assigned", timeout_s=180)
        await training_worker.wait_for_log("partitions_assigned", timeout_s=180)
        await producer.start()

        async def interactive(request_id: str) -> float:
            started = time.monotonic()
            await send(producer, w.annotation_interactive_topic, {**ping, "request_id": request_id}, key=request_id)
            await read_until(kafka_bootstrap, w.annotation_results_topic,
                             lambda rs: any(r.key == request_id.encode() for r in rs), timeout_s=120)
            return time.monotonic() - started

        idle_s = await interactive("ping-idle")  # its usual time, on the idle worker
        started = time.monotonic()
        for key, body in training.items():
            await send(producer, w.training_requests_topic, body, key=key)
        for key, body in annotation.items():
            await send(producer, w.annotation_requests_topic, body, key=key)
        await asyncio.sleep(2)  # the worker is busy with the mix now
        busy_s = await interactive("ping-busy")

        expected = {key.encode() for key in annotation} | {b"ping-idle", b"ping-busy"}

        def answered(records) -> bool:
            done = {r.key for r in records if r.json().get("status") in TERMINAL
                    and r.json().get("part", 0) + 1 >= r.json().get("parts", 1)}
            return done >= expected

        results = await read_until(kafka_bootstrap, w.annotation_results_topic, answered, timeout_s=300)
        statuses = await read_until(kafka_bootstrap, w.training_status_topic,
                                    lambda rs: {r.key for r in rs if r.json()["status"] in TERMINAL}
                                    >= {k.encode() for k in training}, timeout_s=300)
        elapsed = time.monotonic() - started
        peaks = {"annotation": peak_rss_bytes(annotation_worker.proc.pid),
                 "training": peak_rss_bytes(training_worker.proc.pid)}
        assert annotation_worker.proc.poll() is None and training_worker.proc.poll() is None, "a worker exited"
    finally:
        await producer.stop()
        annotation_worker.close()
        training_worker.close()

    final = {}
    for record in results:
        body = record.json()
        final.setdefault(record.key.decode(), []).append(body)
    by_status = {key: {b["status"] for b in bodies} for key, bodies in final.items()}
    errors = {key: bodies[-1].get("error", {}).get("code") for key, bodies in final.items()}
    assert by_status["ico-bombs"] == {"completed"}
    bomb_codes = [r.get("error", {}).get("code") for r in final["ico-bombs"][0]["results"]]
    # 80 MP: over CLS_MAX_IMAGE_PIXELS; 9 MP: 216 MB to decode, within the 512 MB budget, decoded; 36 MP BMP frame:
    # 864 MB > the budget
    assert bomb_codes == ["too_many_pixels", None, "too_many_pixels", None], bomb_codes
    assert {errors[k] for k in ("pkg-crop", "pkg-size", "pkg-nested")} == {"model_unavailable"}, errors
    assert errors["against"] == "invalid_request" and "CLS_EMBED_AGAINST_MAX_MB" in final["against"][-1]["error"]["message"]
    assert errors["examples-manifest"] == "invalid_request", final["examples-manifest"]
    assert by_status["dollar"] == {"completed"} and by_status[".."] == {"completed"}, (by_status["dollar"], final[".."])
    few_shot = [final[f"fs-{s}"][-1] for s in range(FEW_SHOT_SETS)]
    assert all(b["status"] == "completed" and b["few_shot"]["fitted"] for b in few_shot), [
        (b["status"], b.get("error")) for b in few_shot if b["status"] != "completed"][:3]

    status = {r.key.decode(): r.json() for r in statuses if r.json()["status"] in TERMINAL}
    assert status["giant"]["error"]["code"] == "invalid_request", status["giant"]
    assert "CLS_TRAINING_MEMORY_BUDGET_MB" in status["giant"]["error"]["message"]
    assert status["manifest-big"]["status"] == "failed", status["manifest-big"]
    assert "CLS_MANIFEST_MAX_BYTES" in status["manifest-big"]["error"]["message"], status["manifest-big"]
    assert status[".."]["status"] == "completed", status[".."]
    assert status[".."]["model_url"].startswith(f"{bucket}/models/dotdot")

    async with s3_server.client() as client:
        listed = await client.list_objects_v2(Bucket=s3_bucket)
    written = [o["Key"] for o in listed.get("Contents", []) if o["Key"] not in objects]
    assert written and all(k.startswith(("out/", "models/")) and "/../" not in f"/{k}/" for k in written), written

    print(f"hostile mix: {len(annotation)} annotation + {len(training)} training records ended in {elapsed:.0f} s; "
          f"interactive one-image request {idle_s:.2f} s idle, {busy_s:.2f} s during the mix; peak RSS "
          + ", ".join(f"{name} {peak / 1024**2:.0f} MB" for name, peak in peaks.items()))
    assert all(peak < PEAK_RSS_LIMIT for peak in peaks.values()), peaks
    assert busy_s <= max(7.0, 3 * idle_s), (idle_s, busy_s)
