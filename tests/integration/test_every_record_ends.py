"""Issue 9 through the real broker: every record ends (answered, failed event or dead letter), nothing
is committed past an unacknowledged record, and a record that kills the worker ends as ``crash_loop``."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter

import pytest

from testkit.kafka import committed_offsets, produce, provision, read_until, settings_for
from testkit.worker_processes import annotation_request, assert_no_lag, start_echo

pytestmark = pytest.mark.kafka

KEY = "same-key"  # every record of a test on one key: one partition, in order


@pytest.fixture
async def topics(kafka_bootstrap, topic_prefix):
    settings = settings_for(topic_prefix)
    await provision(settings)
    return settings


def valid(request_id: str) -> dict:
    return annotation_request(request_id, n_images=1)


async def test_poison_records_end_and_the_valid_request_behind_each_is_answered_once(
        tmp_path, topics, topic_prefix, kafka_bootstrap):
    w = topics.worker
    src = w.annotation_requests_topic
    worker = start_echo(tmp_path, topic_prefix, ECHO_BIG_FOR="too-big", ECHO_BUG_FOR="buggy",
                        CLS_RETRY_BACKOFF_MAX_S="0.2")
    many_bad_urls = {"task": "classify", "request_id": "bad-urls", "classes": ["a", "b"],
                     "images": [{"id": f"i{i}", "url": f"notaurl-{i}"} for i in range(3000)]}
    surrogate_image = json.dumps(valid("surrogate-image")).replace('"img-0"', '"img-\\ud800"').encode()
    poisons: list[tuple[str, bytes | dict | None]] = [
        ("nested", b"[" * 100_000 + b"]" * 100_000),
        ("nested-object", b'{"request_id": "n",' + b'"x":' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
        ("surrogate-id", b'{"task": "classify", "request_id": "\\ud800", "images": [], "classes": []}'),
        ("surrogate-image", surrogate_image),
        ("tombstone", None),
        ("bad-urls", many_bad_urls),
        ("too-big", valid("too-big")),
        ("buggy", valid("buggy")),
    ]
    try:
        await worker.wait_for_log("partitions_assigned", timeout_s=60)
        for name, value in poisons:
            await produce(kafka_bootstrap, src, value, key=KEY, partition=0)
            await produce(kafka_bootstrap, src, valid(f"after-{name}"), key=KEY, partition=0)

        expected_valid = {f"after-{name}" for name, _ in poisons}
        results = await read_until(
            kafka_bootstrap, w.annotation_results_topic,
            lambda rs: expected_valid <= {r.json()["request_id"] for r in rs if r.json()["status"] == "completed"},
            timeout_s=90)
        dlq = await read_until(kafka_bootstrap, src + ".dlq", lambda rs: len(rs) >= 4, timeout_s=30)
        await assert_no_lag(kafka_bootstrap, w.annotation_group_id, src)
        assert worker.proc.poll() is None, "the worker exited"
        await asyncio.sleep(1.5)  # a rewind loop would show up as more results
        seen = len(results)
        results = await read_until(kafka_bootstrap, w.annotation_results_topic, lambda rs: len(rs) >= seen)
    finally:
        worker.close()

    codes = sorted(r.headers["dlq-error-code"].decode() for r in dlq)
    assert codes == ["invalid_id", "not_json_object", "not_json_object", "not_json_object"], codes
    by_offset = {int(r.headers["dlq-source-offset"]): r for r in dlq}
    assert by_offset[0].value.startswith(b"[[[")  # the original bytes, unchanged
    assert b"nested too deeply" in by_offset[0].headers["dlq-error-message"]

    events = [r.json() for r in results]
    per_id = Counter(e["request_id"] for e in events)
    assert all(per_id[rid] == 1 for rid in expected_valid), per_id  # each answered once, no re-handling
    by_id = {e["request_id"]: e for e in events}
    bad_urls = by_id["bad-urls"]["error"]
    assert bad_urls["code"] == "invalid_request"
    assert len(bad_urls["details"]) == 20 and bad_urls["details_omitted"] == 2980
    assert len(json.dumps(by_id["bad-urls"])) < 20_000
    assert by_id["too-big"]["status"] == "failed"
    assert by_id["too-big"]["error"]["code"] == "event_too_large"
    assert "CLS_MAX_RECORD_BYTES" in by_id["too-big"]["error"]["message"]
    assert by_id["buggy"]["error"]["code"] == "internal_error"
    assert by_id["surrogate-image"]["error"]["code"] == "invalid_request"
    assert "unpaired surrogate" in by_id["surrogate-image"]["error"]["message"]


async def test_no_commit_past_a_record_whose_publish_failed(tmp_path, topics, topic_prefix, kafka_bootstrap):
    """Records 0-4 in flight; publishing 3 keeps failing, publishing 0 fails twice then succeeds; the
    worker stops before 3 is acknowledged: the commit stays at 3, and a restarted worker answers it."""
    w = topics.worker
    src = w.annotation_requests_topic
    worker = start_echo(tmp_path, topic_prefix, "faulty", ECHO_SLEEP_S="0.3",
                        CLS_FAULT_FAIL_PUBLISH="r3:1000000,r0:2", CLS_RETRY_BACKOFF_S="0.05",
                        CLS_RETRY_BACKOFF_MAX_S="0.2", CLS_DRAIN_TIMEOUT_S="3")
    try:
        await worker.wait_for_log("partitions_assigned", timeout_s=60)
        for i in range(5):
            await produce(kafka_bootstrap, src, valid(f"r{i}"), key=KEY, partition=0)
        answered = await read_until(kafka_bootstrap, w.annotation_results_topic,
                                    lambda rs: {"r0", "r1", "r2", "r4"} <= {r.json()["request_id"] for r in rs})
        assert "r3" not in {r.json()["request_id"] for r in answered}
        assert any(e["event"] == "publish_retry" for e in worker.log_events())
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.wait_exit(30) == 0
    finally:
        worker.close()
    committed = await committed_offsets(kafka_bootstrap, w.annotation_group_id)
    assert committed.get((src, 0)) == 3, committed

    worker = start_echo(tmp_path, topic_prefix, "restarted")
    try:
        records = await read_until(kafka_bootstrap, w.annotation_results_topic,
                                   lambda rs: "r3" in {r.json()["request_id"] for r in rs})
        assert [r.json()["status"] for r in records if r.json()["request_id"] == "r3"] == ["completed"]
        await assert_no_lag(kafka_bootstrap, w.annotation_group_id, src)
    finally:
        worker.close()


async def test_a_record_that_kills_the_worker_ends_as_crash_loop(tmp_path, topics, topic_prefix, kafka_bootstrap):
    w = topics.worker
    src = w.annotation_requests_topic
    await produce(kafka_bootstrap, src, valid("poison"), key=KEY, partition=0)
    await produce(kafka_bootstrap, src, valid("behind"), key=KEY, partition=0)
    # a dead member holds its partitions until its session times out: keep that short
    env = {"CLS_FAULT_EXIT_ON_REQUEST": "poison", "CLS_MAX_ATTEMPTS": "3", "CLS_SESSION_TIMEOUT_MS": "6000",
           "CLS_HEARTBEAT_INTERVAL_MS": "500"}
    for start in range(3):  # the first start and two restarts die on the poison record
        worker = start_echo(tmp_path, topic_prefix, f"dies-{start}", **env)
        try:
            assert await worker.wait_exit(90) == 137, worker.log_text()[-2000:]
        finally:
            worker.close()
    worker = start_echo(tmp_path, topic_prefix, "survives", **env)
    try:
        dlq = await read_until(kafka_bootstrap, src + ".dlq", lambda rs: len(rs) >= 1, timeout_s=60)
        assert dlq[0].headers["dlq-error-code"] == b"crash_loop"
        assert dlq[0].headers["dlq-source-offset"] == b"0"
        assert json.loads(dlq[0].value)["request_id"] == "poison"
        results = await read_until(kafka_bootstrap, w.annotation_results_topic,
                                   lambda rs: {"behind", "poison"} <= {r.json()["request_id"] for r in rs})
        poison = [r.json() for r in results if r.json()["request_id"] == "poison"]
        assert [(e["status"], e["error"]["code"]) for e in poison] == [("failed", "crash_loop")]  # the backend hears an end
        await assert_no_lag(kafka_bootstrap, w.annotation_group_id, src)
        assert worker.proc.poll() is None
    finally:
        worker.close()


async def test_stuck_partition_gauge_and_readiness(topic_prefix, kafka_bootstrap):
    import aiohttp

    from consumers.health import HealthServer
    from consumers.runtime import ConsumerRuntime
    from testkit.local import free_port
    from testkit.echo_worker import echo_pipeline

    settings = settings_for(topic_prefix, stuck_record_s=1.0, metrics_port=free_port(), metrics_host="127.0.0.1")
    await provision(settings)
    w = settings.worker
    runtime = ConsumerRuntime(settings, echo_pipeline(settings, sleep_s=8.0), group_id=w.annotation_group_id,
                              max_records=1)
    health = HealthServer(settings, runtime)
    await health.start()
    run = asyncio.create_task(runtime.run())
    try:
        await produce(kafka_bootstrap, w.annotation_requests_topic, valid("slow"), key=KEY, partition=0)
        url = f"http://127.0.0.1:{health.port}"
        async with aiohttp.ClientSession() as http:
            stuck_body = None
            for _ in range(600):  # bounded: 60 s (joining a new group takes a few seconds, more on a busy broker)
                async with http.get(url + "/readyz") as resp:
                    body = await resp.json()
                    if resp.status == 503 and "stuck_partitions" in body:  # (503 also before the consumer starts)
                        stuck_body = body
                        break
                await asyncio.sleep(0.1)
            assert stuck_body is not None and stuck_body["ready"] is False
            assert float(stuck_body["stuck_partitions"]["0"]) >= 1.0  # reported rounded to 0.1 s
            async with http.get(url + "/metrics") as resp:
                text = await resp.text()
            line = next(l for l in text.splitlines()
                        if l.startswith("cls_oldest_unfinished_record_seconds{") and 'partition="0"' in l
                        and w.annotation_requests_topic in l)
            assert float(line.rsplit(" ", 1)[1]) > 1.0
            await asyncio.wait_for(run, timeout=30)  # the record finishes: nothing is stuck any more
            assert runtime.stuck_partitions() == {}
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await health.stop()


def test_alert_rules_use_metrics_the_workers_export():
    import re
    from pathlib import Path

    import yaml
    from prometheus_client import REGISTRY

    import consumers.metrics  # noqa: F401 - registers the metrics

    rules = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy/prometheus/alerts.yml").read_text())
    exported = {metric.name for metric in REGISTRY.collect()} | {"up"}
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert exprs
    for expr in exprs:
        names = set(re.findall(r"\b(cls_[a-z_]+|up)\b", expr))
        # a counter is collected as its family name without _total
        assert names and all(n in exported or n.removesuffix("_total") in exported for n in names), expr


async def test_graceful_stops_mid_record_never_add_up_to_a_crash_loop(tmp_path, topics, topic_prefix, kafka_bootstrap):
    """Three deploys (SIGTERM, drain deadline passed) while the same record runs: it is still handled."""
    w = topics.worker
    src = w.annotation_requests_topic
    await produce(kafka_bootstrap, src, valid("long"), key=KEY, partition=0)
    for n in range(3):
        worker = start_echo(tmp_path, topic_prefix, f"deploy-{n}", ECHO_SLEEP_S="60", CLS_DRAIN_TIMEOUT_S="0.5",
                            CLS_MAX_ATTEMPTS="3")
        try:
            await worker.wait_for_log("record_received", timeout_s=60)
            worker.proc.send_signal(signal.SIGTERM)
            assert await worker.wait_exit(30) == 0
            assert any(e["event"] == "record_left_for_redelivery" for e in worker.log_events())
        finally:
            worker.close()
    worker = start_echo(tmp_path, topic_prefix, "after-deploys", CLS_MAX_ATTEMPTS="3")
    try:
        results = await read_until(kafka_bootstrap, w.annotation_results_topic,
                                   lambda rs: "long" in {r.json()["request_id"] for r in rs}, timeout_s=60)
        assert [r.json()["status"] for r in results] == ["completed"]
        await assert_no_lag(kafka_bootstrap, w.annotation_group_id, src)
    finally:
        worker.close()
    assert not any(e["event"] == "record_dead_lettered" for e in worker.log_events())
