"""What each control record means: cancels and retractions apply, everything else is dead-lettered with a code."""

from __future__ import annotations

import json

import pytest
from aiokafka.structs import ConsumerRecord

from consumers.control_reader import INVALID_CANCEL, NOT_JSON_OBJECT, classify


def record(value: bytes | None, key: bytes | None = b"job-1") -> ConsumerRecord:
    return ConsumerRecord(topic="cls.training.control", partition=0, offset=7, timestamp=0, timestamp_type=0,
                          key=key, value=value, checksum=None, serialized_key_size=0, serialized_value_size=0,
                          headers=())


@pytest.mark.parametrize(("value", "key", "code"), [
    (b"\x00\x01 raw bytes", b"k", NOT_JSON_OBJECT),
    (b'{"task": "cancel", "job_id": "\xff"}', b"k", NOT_JSON_OBJECT),
    (b"[" * 100_000, b"k", NOT_JSON_OBJECT),
    (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b"k", NOT_JSON_OBJECT),
    (b'["cancel"]', b"k", NOT_JSON_OBJECT),
    (json.dumps({"task": "cancel", "job_id": 5}).encode(), b"k", INVALID_CANCEL),
    (json.dumps({"task": "cancel", "reason": ["x"]}).encode(), b"k", INVALID_CANCEL),
    (json.dumps({"task": "train", "job_id": "j"}).encode(), b"k", INVALID_CANCEL),
    (json.dumps({"task": "cancel"}).encode(), b"\xff\xfe", INVALID_CANCEL),  # no id: body none, key not UTF-8
    (None, None, INVALID_CANCEL),  # a tombstone without a key retracts nothing
    (12345, b"k", INVALID_CANCEL),  # anything unexpected still ends as a dead letter, never an exception
])
def test_garbage_is_dead_lettered_with_a_code(value, key, code):
    action = classify(record(value, key))
    assert (action.kind, action.code) == ("dead_letter", code), action
    assert action.message


def test_cancels_and_retractions():
    assert classify(record(json.dumps({"task": "cancel", "job_id": "j-2", "reason": "user"}).encode())).job_id == "j-2"
    from_key = classify(record(json.dumps({"task": "cancel"}).encode(), key=b"j-3"))
    assert (from_key.kind, from_key.job_id) == ("cancel", "j-3")
    tombstone = classify(record(None, key=b"j-4"))
    assert (tombstone.kind, tombstone.job_id) == ("uncancel", "j-4")
