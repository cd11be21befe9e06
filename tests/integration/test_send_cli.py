"""``cls-worker send``: a request in, its events followed to the end; clear errors otherwise."""

from __future__ import annotations

import asyncio
import json

import pytest

from testkit.kafka import provision, settings_for, topic_env
from testkit.worker_processes import send, start_echo

pytestmark = pytest.mark.kafka


async def test_send_annotate_follows_the_result(tmp_path, kafka_bootstrap, topic_prefix):
    await provision(settings_for(topic_prefix))
    worker = start_echo(tmp_path, topic_prefix)
    try:
        await worker.wait_for_log("partitions_assigned", timeout_s=60)
        out = await asyncio.to_thread(send, ["annotate", "--classes", "cat,dog", "--id", "cli-1", "--json",
                                             "https://example.com/a.jpg", "https://example.com/b.jpg"],
                                      topic_env(topic_prefix))
        assert out.returncode == 0, out.stderr
        event = json.loads(out.stdout.strip().splitlines()[-1])
        assert event["request_id"] == "cli-1" and [r["id"] for r in event["results"]] == ["a.jpg", "b.jpg"]
        human = await asyncio.to_thread(send, ["annotate", "--classes", "cat,dog", "https://example.com/c.jpg"],
                                        topic_env(topic_prefix))
        assert human.returncode == 0 and "c.jpg: cat 1.000" in human.stdout, human.stdout
    finally:
        worker.close()


def test_send_reports_unreachable_broker_and_invalid_requests(tmp_path):
    out = send(["annotate", "--classes", "a,b", "https://example.com/x.jpg"],
               {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9", "KAFKA_REQUEST_TIMEOUT_MS": "3000"}, timeout=90)
    assert out.returncode == 2 and "cannot reach Kafka at 127.0.0.1:9" in out.stderr, out.stderr
    out = send(["annotate", "--classes", "a,a", "https://example.com/x.jpg"], {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"})
    assert out.returncode == 2 and "unique" in out.stderr
    bad = tmp_path / "req.json"
    bad.write_text(json.dumps({"task": "train", "config": {}}))
    out = send([str(bad)], {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"})
    assert out.returncode == 2 and "config" in out.stderr
