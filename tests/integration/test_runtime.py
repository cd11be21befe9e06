"""The consumer runtime against the real broker, with the echo handler in a real worker process."""

from __future__ import annotations

import asyncio
import signal

import pytest

from testkit.kafka import committed_offsets, produce, provision, read_until, settings_for
from testkit.worker_processes import annotation_request, assert_no_lag, start_echo

pytestmark = pytest.mark.kafka


@pytest.fixture
async def topics(kafka_bootstrap, topic_prefix):
    settings = settings_for(topic_prefix)
    await provision(settings)
    return settings


async def test_round_trip_commits_after_publish(tmp_path, topics, topic_prefix, kafka_bootstrap):
    w = topics.worker
    worker = start_echo(tmp_path, topic_prefix)
    try:
        await worker.wait_for_log("partitions_assigned", timeout_s=60)
        # The backend's seed-shaped payload: no envelope at all, the id comes from the record key.
        await produce(kafka_bootstrap, w.annotation_requests_topic, annotation_request(), key="req-1")
        records = await read_until(kafka_bootstrap, w.annotation_results_topic, lambda rs: len(rs) >= 1)
        result = records[0].json()
        assert records[0].key == b"req-1"
        assert result["request_id"] == "req-1"
        assert result["status"] == "completed"
        assert [r["id"] for r in result["results"]] == ["img-0", "img-1"]
        assert result["results"][0]["predictions"] == [{"class": "cat", "confidence": 1.0}]
        headers = records[0].headers
        assert headers["event-type"] == b"annotation.result"
        assert headers["schema-version"] == b"1.0"
        assert headers["content-type"] == b"application/json"
        assert headers["request-id"] == b"req-1"
        await assert_no_lag(kafka_bootstrap, w.annotation_group_id, w.annotation_requests_topic)
    finally:
        worker.close()


async def test_bad_records_dlq_or_failed_event_and_consumer_goes_on(tmp_path, topics, topic_prefix, kafka_bootstrap):
    w = topics.worker
    worker = start_echo(tmp_path, topic_prefix)
    try:
        await worker.wait_for_log("partitions_assigned", timeout_s=60)
        src = w.annotation_requests_topic
        await produce(kafka_bootstrap, src, b"\x00\xffnot json at all", key="k-garbage",
                      headers=[("trace", b"abc")], partition=0)
        await produce(kafka_bootstrap, src, b"[1, 2, 3]", key="k-array", partition=0)
        await produce(kafka_bootstrap, src, {"task": "classify", "images": "nope"}, key=None, partition=0)
        bad = annotation_request()
        bad["threshold"] = 7
        bad["classes"] = ["cat", "cat"]
        await produce(kafka_bootstrap, src, bad, key="req-invalid", partition=0)
        await produce(kafka_bootstrap, src, annotation_request("req-good"), key="req-good", partition=0)

        dlq = await read_until(kafka_bootstrap, src + ".dlq", lambda rs: len(rs) >= 3)
        by_key = {r.key: r for r in dlq}
        garbage = by_key[b"k-garbage"]
        assert garbage.value == b"\x00\xffnot json at all"  # original bytes unchanged
        assert garbage.headers["trace"] == b"abc"  # original headers kept
        assert garbage.headers["dlq-error-code"] == b"not_json_object"
        assert garbage.headers["dlq-source-topic"] == src.encode()
        assert garbage.headers["dlq-source-partition"] == b"0"
        assert garbage.headers["dlq-source-offset"] == b"0"
        assert b"dlq-error-message" in {k.encode() for k in garbage.headers}
        assert by_key[b"k-array"].headers["dlq-error-code"] == b"not_json_object"
        assert by_key[None].headers["dlq-error-code"] == b"invalid_no_id"

        results = await read_until(kafka_bootstrap, w.annotation_results_topic, lambda rs: len(rs) >= 2)
        failed = next(r.json() for r in results if r.key == b"req-invalid")
        assert failed["status"] == "failed"
        assert failed["error"]["code"] == "invalid_request"
        locs = {d["loc"] for d in failed["error"]["details"]}
        assert {"threshold", "classes"} <= locs
        good = next(r.json() for r in results if r.key == b"req-good")
        assert good["status"] == "completed"
        await assert_no_lag(kafka_bootstrap, w.annotation_group_id, src)
    finally:
        worker.close()


async def test_sigkill_before_commit_redelivers_with_identical_ids(tmp_path, topics, topic_prefix, kafka_bootstrap):
    w = topics.worker
    crashing = start_echo(tmp_path, topic_prefix, "crashing", CLS_FAULT_CRASH_AFTER_PUBLISH="1")
    try:
        await crashing.wait_for_log("partitions_assigned", timeout_s=60)
        await produce(kafka_bootstrap, w.annotation_requests_topic, annotation_request(), key="req-crash")
        assert await crashing.wait_exit(60) == 137
    finally:
        crashing.close()
    first = await read_until(kafka_bootstrap, w.annotation_results_topic, lambda rs: len(rs) >= 1)
    committed = await committed_offsets(kafka_bootstrap, w.annotation_group_id)
    assert all(offset <= 0 for offset in committed.values()), committed  # published, never committed

    worker = start_echo(tmp_path, topic_prefix, "restarted")
    try:
        both = await read_until(kafka_bootstrap, w.annotation_results_topic, lambda rs: len(rs) >= 2)
        assert len(both) == 2
        a, b = (r.json() for r in both)
        assert a["message_id"] == b["message_id"]
        assert a["request_id"] == b["request_id"] == "req-crash"
        assert a["results"] == b["results"]
        assert first[0].json()["message_id"] == a["message_id"]
        await assert_no_lag(kafka_bootstrap, w.annotation_group_id, w.annotation_requests_topic)
    finally:
        worker.close()


async def test_handler_longer_than_max_poll_interval_keeps_membership(tmp_path, topics, topic_prefix, kafka_bootstrap):
    w = topics.worker
    # max_poll_interval 2 s, each request takes 6 s (3x): the runtime must keep polling (partitions
    # paused), so there is no rebalance and no redelivery.
    worker = start_echo(
        tmp_path, topic_prefix, ECHO_SLEEP_S="6", ECHO_MAX_POLL_MS="2000", CLS_MAX_IN_FLIGHT="1",
        CLS_SESSION_TIMEOUT_MS="6000", CLS_HEARTBEAT_INTERVAL_MS="500",
    )
    try:
        await worker.wait_for_log("partitions_assigned", timeout_s=60)
        for i in range(2):
            await produce(kafka_bootstrap, w.annotation_requests_topic, annotation_request(f"slow-{i}"), key=f"slow-{i}", partition=0)
        results = await read_until(kafka_bootstrap, w.annotation_results_topic, lambda rs: len(rs) >= 2, timeout_s=60)
        await asyncio.sleep(2.5)  # a late rebalance would show up as a revocation and a redelivery
        again = await read_until(kafka_bootstrap, w.annotation_results_topic, lambda rs: len(rs) >= 2)
        assert len(again) == 2, "a request was handled twice"
        assert sorted(r.key for r in results) == [b"slow-0", b"slow-1"]
        events = worker.log_events()
        assert [e for e in events if e["event"] == "partitions_revoked"] == []
        assert len([e for e in events if e["event"] == "partitions_assigned"]) == 1
        await assert_no_lag(kafka_bootstrap, w.annotation_group_id, w.annotation_requests_topic)
    finally:
        worker.close()


async def test_sigterm_drains_in_flight_work_and_exits_zero(tmp_path, topics, topic_prefix, kafka_bootstrap):
    w = topics.worker
    worker = start_echo(tmp_path, topic_prefix, ECHO_SLEEP_S="3", CLS_DRAIN_TIMEOUT_S="20")
    try:
        await worker.wait_for_log("partitions_assigned", timeout_s=60)
        for i in range(3):
            await produce(kafka_bootstrap, w.annotation_requests_topic, annotation_request(f"drain-{i}"), key=f"drain-{i}")
        await worker.wait_for_log("record_received", timeout_s=30, count=3)
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.wait_exit(30) == 0
        assert any(e["event"] == "draining" for e in worker.log_events())
        results = await read_until(kafka_bootstrap, w.annotation_results_topic, lambda rs: len(rs) >= 3)
        assert sorted(r.key for r in results) == [b"drain-0", b"drain-1", b"drain-2"]
        await assert_no_lag(kafka_bootstrap, w.annotation_group_id, w.annotation_requests_topic)
    finally:
        worker.close()


async def test_kafka_tool_shows_group_with_zero_lag(tmp_path, topics, topic_prefix, kafka_bootstrap, kafka_broker):
    from testkit.local import KAFKA_SH
    import os
    import subprocess

    w = topics.worker
    worker = start_echo(tmp_path, topic_prefix)
    try:
        await worker.wait_for_log("partitions_assigned", timeout_s=60)
        for i in range(4):
            await produce(kafka_bootstrap, w.annotation_requests_topic, annotation_request(f"lag-{i}"), key=f"lag-{i}")
        await read_until(kafka_bootstrap, w.annotation_results_topic, lambda rs: len(rs) >= 4)
        await assert_no_lag(kafka_bootstrap, w.annotation_group_id, w.annotation_requests_topic)
        out = subprocess.run(
            [str(KAFKA_SH), "consumer-groups", "--describe", "--group", w.annotation_group_id],
            env={**os.environ}, capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stderr
        rows = [line.split() for line in out.stdout.splitlines() if line.startswith(w.annotation_group_id)]
        assert rows, out.stdout
        header = next(line.split() for line in out.stdout.splitlines() if "LAG" in line)
        lag_col = header.index("LAG")
        assert {row[1] for row in rows} == {w.annotation_requests_topic, w.annotation_interactive_topic}
        assert all(row[lag_col] in ("0", "-") for row in rows), out.stdout
        assert sum(int(row[header.index("CURRENT-OFFSET")]) for row in rows if row[header.index("CURRENT-OFFSET")] != "-") == 4
    finally:
        worker.close()
