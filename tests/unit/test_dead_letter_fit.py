"""A dead letter fits its limit whatever the record carried, and keeps only the worker's ``dlq-*`` headers."""

from __future__ import annotations

from aiokafka import ConsumerRecord

from consumers.dlq import dead_letter_for, record_size


def _record(value: bytes | None, key: bytes | None, headers: list[tuple[str, bytes]]) -> ConsumerRecord:
    return ConsumerRecord(topic="t", partition=2, offset=7, timestamp=0, timestamp_type=0, key=key, value=value,
                          checksum=None, serialized_key_size=0, serialized_value_size=0, headers=headers)


def test_a_small_record_is_kept_unchanged_but_incoming_dlq_headers_are_dropped():
    record = _record(b"v", b"k", [("a", b"1"), ("DLQ-Error-Code", b"forged"), ("dlq-source-offset", b"0")])
    letter = dead_letter_for(record, "not_json_object", "why", limit=10_000)
    assert (letter.topic, letter.value, letter.key) == ("t.dlq", b"v", b"k")
    names = [name for name, _ in letter.headers]
    assert names == ["a", "dlq-error-code", "dlq-error-message", "dlq-source-topic", "dlq-source-partition",
                     "dlq-source-offset"]
    assert dict(letter.headers)["dlq-source-offset"] == b"7"


def test_a_hundred_thousand_headers_are_dropped_until_the_letter_fits():
    headers = [(f"h{i}", b"x" * 100) for i in range(100_000)]  # ~10 MB of small headers
    letter = dead_letter_for(_record(b"v" * 10_000_000, b"k" * 5_000_000, headers), "crash_loop", "m" * 5000,
                             limit=256 * 1024)
    assert letter.size <= 256 * 1024
    got = dict(letter.headers)
    assert got["dlq-error-code"] == b"crash_loop"
    assert got["dlq-value-truncated"] == b"10000000" and len(letter.value) == 64 * 1024
    assert got["dlq-key-truncated"] == b"5000000" and len(letter.key) == 1024
    assert 0 < int(got["dlq-headers-dropped"]) < 100_000
    assert len(got["dlq-error-message"]) == 1000


def test_a_limit_below_the_fixed_parts_still_keeps_the_why():
    letter = dead_letter_for(_record(b"v" * 100_000, None, []), "crash_loop", "why", limit=2000)
    assert letter.size <= 2000 + 100 and dict(letter.headers)["dlq-error-code"] == b"crash_loop"
    assert record_size(letter.value, letter.key, letter.headers) == letter.size
