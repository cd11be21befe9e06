"""``"task": "audit"`` end to end: ``cls-worker send audit --manifest labels.jsonl`` produces the request on the
real broker, a real annotation worker process answers with ranked parts and writes the table to the S3 API
(moto on loopback); the command follows the parts to the end."""

from __future__ import annotations

import asyncio
import csv
import io
import json

import pytest

from testkit.pictures import noisy_png
from testkit.kafka import provision, read_until, settings_for, topic_env
from testkit.worker_processes import send, start_annotation_worker

pytestmark = pytest.mark.kafka

COLORS = {"red": (210, 40, 40), "blue": (40, 40, 210), "green": (40, 200, 40)}


async def test_audit_through_the_broker_in_review_order(tmp_path, kafka_bootstrap, topic_prefix, http_server,
                                                         s3_server, s3_bucket):
    settings = settings_for(topic_prefix)
    await provision(settings)
    worker = start_annotation_worker(tmp_path, topic_prefix, "audit", CLS_EMBED_OUTPUT_PATH=f"s3://{s3_bucket}/audits",
                                     CLS_RESULT_PART_SIZE="4")
    lines = []
    for c, (name, color) in enumerate(COLORS.items()):
        for k in range(4):
            url = http_server.add(f"audit-e2e/{name}-{k}.png", noisy_png(color, 50 + 10 * c + k), content_type="image/png")
            label = "green" if (name, k) == ("red", 1) else name  # one planted label error
            lines.append(json.dumps({"id": f"{name}-{k}", "url": url, "label": label}))
    lines.append(json.dumps({"id": "gone", "url": http_server.urls["not_found"], "label": "red"}))
    manifest = tmp_path / "labels.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    try:
        await worker.wait_for_log("partitions_assigned", timeout_s=120)
        out = await asyncio.to_thread(send, ["audit", "--manifest", str(manifest), "--id", "audit-e2e", "--json",
                                             "--folds", "3", "--timeout", "150"], topic_env(topic_prefix), 200)
        records = await read_until(kafka_bootstrap, settings.worker.annotation_results_topic,
                                   lambda rs: sum(r.key == b"audit-e2e" for r in rs) >= 4, timeout_s=30)
    finally:
        worker.close()
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-2000:])
    events = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert [e["part"] for e in events] == [0, 1, 2, 3] and {e["parts"] for e in events} == {4}  # 13 entries, 4 per part
    assert all(e["task"] == "audit" and e["status"] == "completed" for e in events)
    assert all(dict(r.headers)["event-type"] == b"annotation.result" for r in records if r.key == b"audit-e2e")
    results = [r for e in events for r in e["results"]]
    assert [r["audit"]["rank"] for r in results[:-1]] == list(range(12))
    scores = [r["audit"]["issue_score"] for r in results[:-1]]
    assert scores == sorted(scores, reverse=True)
    assert results[-1]["id"] == "gone" and results[-1]["error"]["code"] == "http_status"
    assert events[0]["audit_summary"]["audited"] == 12 and events[0]["audit_summary"]["classes"] == 3
    assert events[-1]["audit_url"] == f"s3://{s3_bucket}/audits/audit-e2e/audit.csv"
    bucket, key = events[-1]["audit_url"][len("s3://"):].split("/", 1)
    async with s3_server.client() as client:
        table = await (await client.get_object(Bucket=bucket, Key=key))["Body"].read()
    rows = list(csv.reader(io.StringIO(table.decode(), newline="")))
    assert [row[0] for row in rows[1:]] == [r["id"] for r in results]
