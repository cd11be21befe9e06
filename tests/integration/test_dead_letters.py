"""Through the real broker: a dead letter always fits its topic (a record with a huge key or header never
sticks its partition), carries only the worker's own ``dlq-*`` headers, and a record dead-lettered for a
code whose request id can be read is answered with a ``failed`` event too."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaProducer

from tests.integration.test_runtime import annotation_request, assert_no_lag, start_echo
from testkit.kafka import produce, provision, read_until, send, settings_for

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
                                   lambda rs: "behind" in {r.json()["request_id"] for r in rs}, timeout_s=60)
        dlq = await read_until(kafka_bootstrap, src + ".dlq", lambda rs: len(rs) >= 1, timeout_s=10)
        await assert_no_lag(kafka_bootstrap, w.annotation_group_id, src)
    finally:
        worker.close()
    assert [r.json()["status"] for r in results] == ["completed"]
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
