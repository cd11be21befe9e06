"""Hypothesis-generated garbage never crashes the consumer: every record is handled or dead-lettered."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from consumers.runtime import ConsumerRuntime
from testkit.echo_worker import echo_pipeline
from testkit.kafka import committed_offsets, end_offsets, produce, provision, read_until, settings_for

pytestmark = pytest.mark.kafka

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
near_valid = st.fixed_dictionaries(
    {"task": st.sampled_from(["classify", "train", "cancel", "", 3])},
    optional={
        "request_id": st.one_of(st.text(max_size=12), st.integers(), st.none()),
        "images": st.one_of(json_values, st.lists(st.fixed_dictionaries({"id": st.text(max_size=5), "url": st.text(max_size=30)}), max_size=3)),
        "classes": st.one_of(json_values, st.lists(st.text(max_size=8), max_size=4)),
        "top_k": st.one_of(st.integers(-3, 10), st.text(max_size=3)),
        "threshold": st.one_of(st.floats(allow_nan=False), st.none()),
        "model": st.sampled_from(["clip", "siglip", "custom", "other"]),
    },
)
record_values = st.one_of(
    st.binary(max_size=64),
    json_values.map(lambda v: json.dumps(v).encode()),
    near_valid.map(lambda v: json.dumps(v).encode()),
)
records_strategy = st.lists(st.tuples(record_values, st.one_of(st.none(), st.text(min_size=1, max_size=8))), min_size=25, max_size=25)


@hsettings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
@given(batch=records_strategy)
def test_garbage_is_handled_or_dead_lettered(kafka_bootstrap, batch):
    asyncio.run(_run_batch(kafka_bootstrap, batch))


async def _run_batch(bootstrap: str, batch: list[tuple[bytes, str | None]]) -> None:
    prefix = f"fz{uuid.uuid4().hex[:10]}"
    settings = settings_for(prefix, request_topic_partitions=2, retry_backoff_s=0.01)
    await provision(settings)
    w = settings.worker
    for value, key in batch:
        await produce(bootstrap, w.annotation_requests_topic, value, key=key)
    runtime = ConsumerRuntime(settings, echo_pipeline(settings), group_id=w.annotation_group_id,
                              max_records=len(batch))
    await asyncio.wait_for(runtime.run(), timeout=120)

    stats = runtime.stats
    accounted = stats["handled"] + stats["invalid"] + stats["failed"] + stats["dlq"]
    assert accounted == len(batch), stats
    assert stats.get("abandoned", 0) == 0
    dlq = await read_until(bootstrap, w.annotation_requests_topic + ".dlq", lambda rs: len(rs) >= stats["dlq"], 30)
    # a dead letter whose key names a request is answered too (a failed event with the dead letter's code)
    answered = [r for r in dlq if r.key and r.key.decode("utf-8").strip()]
    expected = stats["handled"] + stats["invalid"] + stats["failed"] + len(answered)
    results = await read_until(bootstrap, w.annotation_results_topic, lambda rs: len(rs) >= expected, 30)
    assert len(results) == expected and len(dlq) == stats["dlq"]
    for record in dlq:
        assert record.headers["dlq-error-code"] in (b"not_json_object", b"invalid_no_id")
    failed_codes = sorted(r.json()["error"]["code"] for r in results if r.json()["status"] == "failed"
                          and r.json()["error"]["code"] in ("not_json_object", "invalid_no_id"))
    assert failed_codes == sorted(r.headers["dlq-error-code"].decode() for r in answered)
    ends = await end_offsets(bootstrap, w.annotation_requests_topic)
    committed = await committed_offsets(bootstrap, w.annotation_group_id)
    for tp, end in ends.items():
        if end:
            assert committed.get(tp) == end, (committed, ends)


async def test_commits_of_concurrent_records_are_coalesced(kafka_bootstrap):
    """160 records, 16 at a time: each record's offset is committed (lag 0, every result published), with
    far fewer commit requests than records (one request covers the records that finished while the
    previous one was in flight)."""
    from consumers import metrics

    prefix = f"co{uuid.uuid4().hex[:10]}"
    settings = settings_for(prefix, request_topic_partitions=2, max_in_flight=16, interactive_max_in_flight=16)
    await provision(settings)
    w = settings.worker
    n = 160
    for i in range(n):
        body = {"task": "classify", "model": "clip", "request_id": f"co-{i}", "classes": ["a", "b", "c"],
                "images": [{"id": "x", "url": "https://example.com/x.jpg"}]}
        await produce(kafka_bootstrap, w.annotation_requests_topic, body, key=f"co-{i}")
    commits = metrics.COMMITS.labels(w.annotation_requests_topic)
    before = commits._value.get()
    runtime = ConsumerRuntime(settings, echo_pipeline(settings, sleep_s=0.05), group_id=w.annotation_group_id,
                              max_records=n)
    await asyncio.wait_for(runtime.run(), timeout=120)
    sent_commits = commits._value.get() - before
    assert runtime.stats["handled"] == n, runtime.stats
    results = await read_until(kafka_bootstrap, w.annotation_results_topic, lambda rs: len(rs) >= n, 30)
    assert {r.key for r in results} == {f"co-{i}".encode() for i in range(n)}
    ends = await end_offsets(kafka_bootstrap, w.annotation_requests_topic)
    committed = await committed_offsets(kafka_bootstrap, w.annotation_group_id)
    assert all(committed.get(tp) == end for tp, end in ends.items() if end), (committed, ends)
    assert 0 < sent_commits <= n // 2, f"{sent_commits} commit requests for {n} records"
    print(f"{n} records, {sent_commits:.0f} commit requests")
