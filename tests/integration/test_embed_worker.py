"""``"task": "embed"`` end to end: a real annotation worker process on the real broker writes the vectors to
the S3 API (moto on loopback); the result points to them and numpy reads them back; duplicates come in the
last part; a bad output location is a typed failed result, and the worker goes on."""

from __future__ import annotations

import io

import numpy as np
import pytest

from testkit.kafka import produce, provision, read_until, settings_for
from testkit.worker_processes import start_annotation_worker

pytestmark = pytest.mark.kafka


async def test_embed_request_through_the_broker_to_s3(tmp_path, kafka_bootstrap, topic_prefix, http_server, s3_server,
                                                      s3_bucket):
    settings = settings_for(topic_prefix)
    await provision(settings)
    w = settings.worker
    worker = start_annotation_worker(tmp_path, topic_prefix, "embed", CLS_EMBED_OUTPUT_PATH=f"s3://{s3_bucket}/emb",
                                     CLS_RESULT_PART_SIZE="2")
    copy_url = http_server.add("embed-e2e/copy.jpg", http_server.body("astronaut_jpg"), content_type="image/jpeg")
    names = ["astronaut_jpg", "coffee_jpg", "not_found"]
    body = {"task": "embed", "model": "clip", "duplicates": {"threshold": 0.999},
            "images": [{"id": n, "url": http_server.urls[n]} for n in names] + [{"id": "copy", "url": copy_url}]}
    try:
        await worker.wait_for_log("partitions_assigned", timeout_s=120)
        await produce(kafka_bootstrap, w.annotation_requests_topic, body, key="emb-1")
        await produce(kafka_bootstrap, w.annotation_requests_topic,
                      {**body, "output_path": "s3://not-an-allowed-place-but-no-such-bucket-xyz/x",
                       "duplicates": None}, key="emb-2")
        records = await read_until(kafka_bootstrap, w.annotation_results_topic,
                                   lambda rs: {r.key for r in rs} >= {b"emb-1", b"emb-2"} and
                                   sum(r.key == b"emb-1" for r in rs) >= 2, timeout_s=180)
    finally:
        worker.close()
    parts = sorted((r.json() for r in records if r.key == b"emb-1"), key=lambda e: e["part"])
    assert [p["part"] for p in parts] == [0, 1] and all(p["task"] == "embed" for p in parts)
    assert all(dict(r.headers)["event-type"] == b"annotation.result" for r in records)
    ids, vectors = [], []
    async with s3_server.client() as client:
        for p in parts:
            bucket, key = p["embeddings_url"][len("s3://"):].split("/", 1)
            assert bucket == s3_bucket and key == f"emb/emb-1/part-{p['part']:05d}.npz"
            data = await (await client.get_object(Bucket=bucket, Key=key))["Body"].read()
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                ids += npz["ids"].tolist()
                vectors.append(npz["embeddings"].astype(np.float32))
    assert ids == ["astronaut_jpg", "coffee_jpg", "copy"]
    matrix = np.concatenate(vectors)
    assert matrix.shape == (3, parts[0]["dim"])
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=2e-3)
    np.testing.assert_allclose(matrix[0], matrix[2], atol=0)  # the same bytes: the same vector
    results = [r for p in parts for r in p["results"]]
    assert results[2]["id"] == "not_found" and results[2]["error"]["code"] == "http_status"
    assert "duplicates" not in parts[0]
    assert {"ids": ["astronaut_jpg", "copy"], "kind": "exact", "similarity": 1.0} in parts[1]["duplicates"]
    failed = next(r.json() for r in records if r.key == b"emb-2")
    assert failed["status"] == "failed" and failed["error"]["code"] == "storage_unwritable", failed
