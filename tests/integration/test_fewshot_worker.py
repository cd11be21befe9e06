"""Few-shot classify through the real broker: ``cls-worker send classify --examples support.jsonl`` (a local JSON
Lines file, sent inline) to a real annotation worker process; the result comes back with its ``few_shot``
summary, and a failing example is counted, not fatal."""

from __future__ import annotations

import asyncio
import json

import pytest

from testkit.kafka import provision, settings_for, topic_env
from testkit.pictures import noisy_png
from testkit.worker_processes import send, start_annotation_worker

pytestmark = pytest.mark.kafka

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


async def test_few_shot_request_through_the_broker(tmp_path, kafka_bootstrap, topic_prefix, http_server):
    await provision(settings_for(topic_prefix))
    urls = {name: [http_server.add(f"fewshot-worker/{name}-{k}.png", noisy_png(rgb, 100 + 10 * k + i, 24), content_type="image/png")
                   for k in range(3)]
            for i, (name, rgb) in enumerate(COLOURS.items())}
    manifest = tmp_path / "support.jsonl"
    lines = [{"url": url, "label": name} for name in COLOURS for url in urls[name][:2]]
    lines.append({"url": http_server.urls["not_found"], "label": "red"})
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    worker = start_annotation_worker(tmp_path, topic_prefix, "fewshot")
    try:
        await worker.wait_for_log("partitions_assigned", timeout_s=120)
        out = await asyncio.to_thread(send, ["classify", "--classes", ",".join(COLOURS), "--examples", str(manifest),
                                             "--few-shot-method", "tip_adapter", "--top-k", "3", "--threshold", "0",
                                             "--id", "fs-broker-1", "--json", "--timeout", "120",
                                             *(urls[name][2] for name in COLOURS)],
                                      {**topic_env(topic_prefix)}, 180)
    finally:
        worker.close()
    assert out.returncode == 0, (out.stdout, out.stderr)
    event = json.loads(out.stdout.strip().splitlines()[-1])
    assert event["request_id"] == "fs-broker-1" and event["status"] == "completed"
    assert event["few_shot"]["method"] == "tip_adapter" and event["few_shot"]["fitted"] is True
    assert event["few_shot"]["examples_per_class"] == dict.fromkeys(COLOURS, 2)
    assert event["few_shot"]["examples_failed"] == 1 and 0.0 <= event["few_shot"]["cv_accuracy"] <= 1.0
    assert [r["id"] for r in event["results"]] == [f"{name}-2.png" for name in COLOURS]
    assert all(len(r["predictions"]) == 3 for r in event["results"])
