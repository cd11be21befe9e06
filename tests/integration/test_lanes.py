"""The interactive lane through the real broker: bulk work that fills CLS_MAX_IN_FLIGHT never keeps an
interactive request waiting, whether it arrives on the interactive topic or with ``priority`` on the
request topic behind the bulk ones."""

from __future__ import annotations

import time

import pytest

from testkit.kafka import produce, provision, read_until, settings_for
from testkit.worker_processes import annotation_request, assert_no_lag, start_echo

pytestmark = pytest.mark.kafka


@pytest.fixture
async def topics(kafka_bootstrap, topic_prefix):
    settings = settings_for(topic_prefix)
    await provision(settings)
    return settings


@pytest.mark.slow
async def test_interactive_requests_overtake_a_saturating_bulk_request(tmp_path, topics, topic_prefix, kafka_bootstrap):
    w = topics.worker
    worker = start_echo(tmp_path, topic_prefix, ECHO_BULK_SLEEP_S="8", CLS_MAX_IN_FLIGHT="1",
                        CLS_INTERACTIVE_MAX_IN_FLIGHT="2", CLS_DRAIN_TIMEOUT_S="1")
    try:
        await worker.wait_for_log("partitions_assigned", timeout_s=60)
        await produce(kafka_bootstrap, w.annotation_requests_topic, annotation_request("bulk-a", n_images=40),
                      key="k", partition=0)
        await produce(kafka_bootstrap, w.annotation_requests_topic, annotation_request("bulk-b", n_images=40),
                      key="k", partition=0)
        await worker.wait_for_log("record_received", timeout_s=30)
        sent = time.monotonic()
        ui = annotation_request("ui-topic", n_images=1)
        await produce(kafka_bootstrap, w.annotation_interactive_topic, ui, key="k", partition=0)
        marked = annotation_request("ui-priority", n_images=40)
        marked["priority"] = "interactive"  # large, but a person waits: the explicit priority wins
        await produce(kafka_bootstrap, w.annotation_requests_topic, marked, key="k", partition=0)
        small = annotation_request("ui-small", n_images=2)  # no priority: interactive by size
        await produce(kafka_bootstrap, w.annotation_requests_topic, small, key="k", partition=0)

        wanted = {"ui-topic", "ui-priority", "ui-small"}
        results = await read_until(kafka_bootstrap, w.annotation_results_topic,
                                   lambda rs: wanted <= {r.json()["request_id"] for r in rs}, timeout_s=30)
        waited = time.monotonic() - sent
        answered = [r.json()["request_id"] for r in results]
        assert "bulk-a" not in answered and "bulk-b" not in answered, answered  # the bulk one still runs
        assert waited < 7, f"interactive requests waited {waited:.1f} s behind bulk work"
        lanes = {e["request_id"]: e for e in worker.log_events() if e["event"] == "record_done"}
        assert set(lanes) >= wanted
        everything = await read_until(kafka_bootstrap, w.annotation_results_topic,
                                      lambda rs: {"bulk-a", "bulk-b"} <= {r.json()["request_id"] for r in rs},
                                      timeout_s=60)
        order = [r.json()["request_id"] for r in everything]
        assert order.index("bulk-a") < order.index("bulk-b")  # bulk keeps its order
        await assert_no_lag(kafka_bootstrap, w.annotation_group_id, w.annotation_requests_topic)
        await assert_no_lag(kafka_bootstrap, w.annotation_group_id, w.annotation_interactive_topic)
    finally:
        worker.close()


def test_lane_rule():
    from schemas.annotation import lane_of

    one = {"images": [{}]}
    many = {"images": [{}] * 17}
    assert lane_of(one, "bulk", 16) == "interactive"
    assert lane_of(many, "bulk", 16) == "bulk"
    assert lane_of({**one, "priority": "bulk"}, "bulk", 16) == "bulk"
    assert lane_of({**many, "priority": "interactive"}, "bulk", 16) == "interactive"
    assert lane_of({**many, "priority": "bulk"}, "interactive", 16) == "interactive"  # the topic wins
    assert lane_of({"images": "nope"}, "bulk", 16) == "bulk"
    # few-shot examples are images to embed too; a manifest is of unknown size
    examples = [{"url": "http://x/e.jpg", "label": "cat"}] * 16
    assert lane_of({**one, "examples": examples}, "bulk", 16) == "bulk"
    assert lane_of({**one, "examples": examples[:15]}, "bulk", 16) == "interactive"
    assert lane_of({**one, "examples_url": "s3://b/support.jsonl"}, "bulk", 16) == "bulk"
    assert lane_of({"task": "audit", "manifest_url": "s3://b/audit.jsonl"}, "bulk", 16) == "bulk"
    assert lane_of({**one, "examples": examples, "priority": "interactive"}, "bulk", 16) == "interactive"
