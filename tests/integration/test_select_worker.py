"""``"task": "select"`` end to end: ``cls-worker send select --pool pool.jsonl --labeled labels.jsonl --budget N``
produces the request on the real broker, a real annotation worker process answers with parts in selection order
and writes ``selection.csv`` (the whole pool's ranking) to the S3 API (moto on loopback); a cold start through the interactive topic picks one
image of every colour; the same request delivered again gives identical parts (ids, entries); a request that
cannot run is refused (``invalid_request``) before any image is fetched."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections import Counter

import pytest

from testkit.pictures import noisy_png
from testkit.kafka import produce, provision, read_until, settings_for, topic_env
from testkit.worker_processes import send, start_annotation_worker

pytestmark = pytest.mark.kafka

COLORS = {"red": (210, 40, 40), "blue": (40, 40, 210), "green": (40, 200, 40), "yellow": (220, 210, 40)}


async def test_select_through_the_broker(tmp_path, kafka_bootstrap, topic_prefix, http_server, s3_server, s3_bucket):
    settings = settings_for(topic_prefix)
    await provision(settings)
    w = settings.worker
    worker = start_annotation_worker(tmp_path, topic_prefix, "select", CLS_EMBED_OUTPUT_PATH=f"s3://{s3_bucket}/sel",
                                     CLS_RESULT_PART_SIZE="3")
    pool, labeled = [], []
    for c, (name, color) in enumerate(COLORS.items()):
        for k in range(5):
            url = http_server.add(f"select-e2e/{name}-{k}.png", noisy_png(color, 300 + 10 * c + k), content_type="image/png")
            if k == 0 and name in ("red", "blue"):
                labeled.append(json.dumps({"id": f"{name}-{k}", "url": url, "label": name}))
            else:
                pool.append({"id": f"{name}-{k}", "url": url})
    pool.append({"id": "gone", "url": http_server.urls["not_found"]})
    (tmp_path / "pool.jsonl").write_text("\n".join(json.dumps(p) for p in pool) + "\n")
    (tmp_path / "labels.jsonl").write_text("\n".join(labeled) + "\n")
    cold = {"task": "select", "request_id": "sel-cold", "images": pool[:-1], "budget": 4,
            "options": {"duplicate_threshold": 0.9999}}
    refused = {"task": "select", "request_id": "sel-refused", "budget": 2, "classes": ["red"],
               "images": [{"id": "x", "url": http_server.url("/custom/select-e2e-refused/x.png")}, *pool[:3]],
               "labeled": [{"id": "y", "url": http_server.url("/custom/select-e2e-refused/y.png"), "label": "blue"}]}
    try:
        await worker.wait_for_log("partitions_assigned", timeout_s=120)
        out = await asyncio.to_thread(send, ["select", "--pool", str(tmp_path / "pool.jsonl"), "--labeled",
                                             str(tmp_path / "labels.jsonl"), "--budget", "6", "--id", "sel-e2e",
                                             "--duplicate-threshold", "0.9999",
                                             "--json", "--timeout", "150"], topic_env(topic_prefix), 200)
        await produce(kafka_bootstrap, w.annotation_interactive_topic, cold, key="sel-cold")
        await produce(kafka_bootstrap, w.annotation_requests_topic, cold, key="sel-cold")  # delivered twice
        await produce(kafka_bootstrap, w.annotation_requests_topic, refused, key="sel-refused")
        records = await read_until(kafka_bootstrap, w.annotation_results_topic,
                                   lambda rs: sum(r.key == b"sel-cold" for r in rs) >= 4
                                   and any(r.key == b"sel-refused" for r in rs), timeout_s=90)
    finally:
        worker.close()
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-2000:])
    events = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert [e["part"] for e in events] == [0, 1, 2] and {e["parts"] for e in events} == {3}  # 6 selected + 1 failed
    assert all(e["task"] == "select" and e["status"] == "completed" for e in events)
    entries = [entry for e in events for entry in e["selection"]]
    assert [entry["rank"] for entry in entries] == list(range(6))
    assert not {"red-0", "blue-0"} & {entry["id"] for entry in entries}  # labeled images are not in the pool
    assert all(entry["predicted"]["class"] in ("red", "blue") for entry in entries)
    assert events[-1]["results"] == [{"id": "gone", "predictions": [], "error": events[-1]["results"][0]["error"]}]
    assert events[-1]["results"][0]["error"]["code"] == "http_status"
    summary = events[0]["select_summary"]
    assert (summary["pool"], summary["embedded"], summary["labeled"], summary["classes"], summary["selected"]) == (19, 18, 2, 2, 6)
    assert events[0]["selection_url"] == f"s3://{s3_bucket}/sel/sel-e2e/selection.csv"
    bucket, key = events[0]["selection_url"][len("s3://"):].split("/", 1)
    async with s3_server.client() as client:
        table = await (await client.get_object(Bucket=bucket, Key=key))["Body"].read()
    rows = list(csv.reader(io.StringIO(table.decode(), newline="")))
    # the whole pool's ranking: the selection, the other 12 embedded images ranked on (ranks 6..17), the failed one
    assert [row[0] for row in rows[1:7]] == [entry["id"] for entry in entries] and rows[-1][0] == "gone"
    assert sorted(row[0] for row in rows[1:]) == sorted(p["id"] for p in pool)
    assert [row[1] for row in rows[7:-1]] == [str(k) for k in range(6, 18)] and rows[-1][6] == "http_status"

    cold_parts = [r.json() for r in records if r.key == b"sel-cold"]
    # the two deliveries' parts may interleave on the results topic: pair them by part index
    by_part: dict[int, list[dict]] = {}
    for part in cold_parts[:4]:
        by_part.setdefault(part["part"], []).append(part)
    assert sorted(by_part) == [0, 1] and all(len(pair) == 2 for pair in by_part.values()), by_part.keys()
    for a, b in by_part.values():  # the two deliveries: the same parts and message ids
        assert a["message_id"] == b["message_id"] and a["selection"] == b["selection"]
    picked = [entry["id"].split("-")[0] for p in (by_part[0][0], by_part[1][0]) for entry in p["selection"]]
    assert Counter(picked) == Counter(list(COLORS))  # a cold start: one image of every colour
    failed = [r.json() for r in records if r.key == b"sel-refused"]
    assert failed[0]["status"] == "failed" and failed[0]["error"]["code"] == "invalid_request"
    assert "not in classes" in failed[0]["error"]["message"]
    assert http_server.hits("select-e2e-refused/") == 0
