"""Through the real broker: a dead letter always fits its topic (a record with a huge key or header never
sticks its partition), carries only the worker's own ``dlq-*`` headers, and a record dead-lettered for a
code whose request id can be read is answered with a ``failed`` event too."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaProducer

from testkit.kafka import produce, provision, read_until, send, settings_for
from testkit.worker_processes import annotation_request, assert_no_lag, start_echo

pytestmark = pytest.mark.kafka

MAX_RECORD = 256 * 1024  # the worker's CLS_MAX_RECORD_BYTES; the topic (provisioned for 4 MiB) takes more


async def test_a_record_with_huge_key_and_headers_is_dead_lettered_cut_to_fit(tmp_path, topic_prefix, kafka_bootstrap):
    settings = settings_for(topic_prefix)  # topics provisioned for the default 4 MiB records
    await provision(settings)
    w = settings.worker
    src = w.annotation_requests_topic
    huge_key = b"k" * (300 * 1024)
    headers = [("dlq-error-code", b"forged"), ("dlq-source-offset", b"999"), ("x-huge", b"h" * (1024 * 1024)),
               ("x-small", b"kept"), ("y" * 5000, b"long name")]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", max_request_size=4 * 1024 * 1024)
    await producer.start()
    try:
        await send(producer, src, b"not json " * 1000, key=huge_key, headers=headers, partition=0)
    finally:
        await producer.stop()
    await produce(kafka_bootstrap, src, annotation_request("behind", n_images=1), key="behind", partition=0)
    worker = start_echo(tmp_path, topic_prefix, CLS_MAX_RECORD_BYTES=str(MAX_RECORD))
    try:
        results = await read_until(kafka_bootstrap, w.annotation_results_topic,
                                   lambda rs: {"behind", "k" * 256} <= {r.json()["request_id"] for r in rs}, timeout_s=60)
        dlq = await read_until(kafka_bootstrap, src + ".dlq", lambda rs: len(rs) >= 1, timeout_s=10)
        await assert_no_lag(kafka_bootstrap, w.annotation_group_id, src)
    finally:
        worker.close()
    assert [r.json()["status"] for r in results if r.json()["request_id"] == "behind"] == ["completed"]
    # the key names a request: it is answered too (its id is the key's first 256 characters)
    answered = [r.json() for r in results if r.json()["request_id"] == "k" * 256]
    assert [(e["status"], e["error"]["code"]) for e in answered] == [("failed", "not_json_object")]
    [letter] = dlq
    names = [name for name, _ in letter.header_list]
    assert names.count("dlq-error-code") == 1 and names.count("dlq-source-offset") == 1, names
    assert letter.headers["dlq-error-code"] == b"not_json_object"
    assert letter.headers["dlq-source-offset"] == b"0"
    assert letter.headers["dlq-key-truncated"] == str(len(huge_key)).encode()
    assert letter.key == huge_key[:1024]
    assert letter.headers["x-small"] == b"kept"
    assert letter.headers["x-huge"] == b"h" * 1024  # each header's head
    assert letter.value == b"not json " * 1000  # the value fitted: unchanged
    size = len(letter.value) + len(letter.key) + sum(len(k) + len(v) for k, v in letter.header_list)
    assert size <= MAX_RECORD + 32 * 1024


async def test_a_crash_is_counted_against_the_record_that_caused_it(tmp_path, topic_prefix, kafka_bootstrap):
    """A poison that kills the process on partition 0, a slow valid request at the head of partition 1: after
    the deaths, suspects run one at a time with nothing else in flight, so only the poison reaches
    CLS_MAX_ATTEMPTS: it is dead-lettered ``crash_loop`` and answered ``failed`` with that code; the slow
    request is answered ``completed``; nothing else is dead-lettered."""
    settings = settings_for(topic_prefix)
    await provision(settings)
    w = settings.worker
    src = w.annotation_requests_topic
    # two attempts prove it (the slow request would reach two as well if every death were counted against it)
    env = {"CLS_FAULT_EXIT_ON_REQUEST": "poison", "CLS_MAX_ATTEMPTS": "2", "ECHO_SLEEP_S": "1.5"}
    await produce(kafka_bootstrap, src, annotation_request("slow", n_images=1), key="slow", partition=1)
    for start in range(2):  # the first start and one restart die on the poison
        worker = start_echo(tmp_path, topic_prefix, f"dies-{start}", **env)
        try:
            if start == 0:  # the slow request is in flight (its start counted) when the poison arrives
                await worker.wait_for_log("record_received", timeout_s=60)
                await produce(kafka_bootstrap, src, annotation_request("poison", n_images=1), key="poison", partition=0)
            assert await worker.wait_exit(90) == 137, worker.log_text()[-2000:]
        finally:
            worker.close()
    worker = start_echo(tmp_path, topic_prefix, "survives", **env)
    try:
        results = await read_until(
            kafka_bootstrap, w.annotation_results_topic,
            lambda rs: {"slow", "poison"} <= {r.json()["request_id"] for r in rs}, timeout_s=90)
        dlq = await read_until(kafka_bootstrap, src + ".dlq", lambda rs: len(rs) >= 1, timeout_s=10)
        await assert_no_lag(kafka_bootstrap, w.annotation_group_id, src)
        assert worker.proc.poll() is None
    finally:
        worker.close()
    by_id = {r.json()["request_id"]: r.json() for r in results}
    assert by_id["slow"]["status"] == "completed"
    assert by_id["poison"]["status"] == "failed" and by_id["poison"]["error"]["code"] == "crash_loop"
    assert "CLS_MAX_ATTEMPTS" in by_id["poison"]["error"]["message"]
    assert [(r.partition, r.headers["dlq-error-code"], r.json()["request_id"]) for r in dlq] == [
        (0, b"crash_loop", "poison")]
    dlq = await read_until(kafka_bootstrap, src + ".dlq", lambda rs: len(rs) >= 1, timeout_s=5)
    assert len(dlq) == 1  # no other record dead-lettered
