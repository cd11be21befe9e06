"""Kafka clients for the local stack (tests, benchmarks, demo): per-run topic names and settings, topics
provisioned from the topology, producing, reading a topic until a condition, committed and end offsets.

``settings_for(prefix)`` and ``topic_env(prefix)`` name every topic and group under a unique prefix, so runs
sharing one broker never see each other's records."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from consumers.settings import KafkaSettings, Settings, WorkerSettings
from consumers.topics_admin import create_topics, topic_partitions, topic_specs

GROUP_SESSION_ENV = {"CLS_SESSION_TIMEOUT_MS": "10000", "CLS_HEARTBEAT_INTERVAL_MS": "1000"}
"""Consumer sessions of test workers: 10 s instead of 30 s, so a worker the test kills (``WorkerProcess.close`` is a
SIGKILL, and several tests kill on purpose) leaves the group 10 s later, not 30: the next worker of the group gets
its partitions that much sooner. Above the broker's 6 s minimum, and far above any event-loop stall we allow."""


def topic_env(prefix: str) -> dict[str, str]:
    """CLS_* variables naming per-test topics and groups, and the groups' short sessions (``GROUP_SESSION_ENV``)."""
    return {
        **GROUP_SESSION_ENV,
        "CLS_ANNOTATION_REQUESTS_TOPIC": f"{prefix}.cls.annotation.requests",
        "CLS_ANNOTATION_INTERACTIVE_TOPIC": f"{prefix}.cls.annotation.interactive",
        "CLS_ANNOTATION_RESULTS_TOPIC": f"{prefix}.cls.annotation.results",
        "CLS_TRAINING_REQUESTS_TOPIC": f"{prefix}.cls.training.requests",
        "CLS_TRAINING_STATUS_TOPIC": f"{prefix}.cls.training.status",
        "CLS_TRAINING_CONTROL_TOPIC": f"{prefix}.cls.training.control",
        "CLS_ANNOTATION_GROUP_ID": f"{prefix}-annotation",
        "CLS_TRAINING_GROUP_ID": f"{prefix}-training",
    }


def settings_for(prefix: str, bootstrap: str | None = None, **overrides: Any) -> Settings:
    """Settings with ``topic_env(prefix)``'s topics and groups (3 partitions each unless overridden), for the
    broker at ``bootstrap`` (default: ``KAFKA_BOOTSTRAP_SERVERS``)."""
    env = topic_env(prefix)
    worker_kwargs = {k.removeprefix("CLS_").lower(): v for k, v in env.items()}
    worker_kwargs.setdefault("request_topic_partitions", 3)
    worker_kwargs.setdefault("output_topic_partitions", 3)
    worker_kwargs.update(overrides)
    return Settings(
        kafka=KafkaSettings(bootstrap_servers=bootstrap or os.environ["KAFKA_BOOTSTRAP_SERVERS"]),
        worker=WorkerSettings(**worker_kwargs),
    )


async def provision(settings: Settings) -> None:
    """Create the topology's topics for ``settings`` (idempotent)."""
    await create_topics(settings, topic_specs(settings))


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    header_list: list[tuple[str, bytes]] = field(default_factory=list)  # in order, repeated names kept

    def json(self) -> Any:
        return json.loads(self.value) if self.value is not None else None


async def produce(bootstrap: str, topic: str, value: bytes | dict | None, key: str | bytes | None = None,
                  headers: list[tuple[str, bytes]] | None = None, partition: int | None = None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        await send(producer, topic, value, key, headers, partition)
    finally:
        await producer.stop()


async def send(producer: AIOKafkaProducer, topic: str, value: bytes | dict | None, key: str | bytes | None = None,
               headers: list[tuple[str, bytes]] | None = None, partition: int | None = None) -> None:
    raw = json.dumps(value).encode() if isinstance(value, dict) else value
    raw_key = key.encode() if isinstance(key, str) else key
    await producer.send_and_wait(topic, value=raw, key=raw_key, headers=headers, partition=partition)


async def read_until(bootstrap: str, topic: str, done: Callable[[list[Record]], bool], timeout_s: float = 60.0) -> list[Record]:
    """Read ``topic`` from the beginning (no group) until ``done(records)`` or the timeout (then AssertionError)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    records: list[Record] = []
    try:
        tps = await _partitions(consumer, topic, timeout_s)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        while not done(records):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s reading {topic}; got {len(records)} records: "
                                     f"{[r.value[:300] if r.value else None for r in records[-5:]]}")
            batches = await consumer.getmany(timeout_ms=200)
            for batch in batches.values():
                for r in batch:
                    records.append(Record(r.topic, r.partition, r.offset, r.key, r.value,
                                          {k: v for k, v in (r.headers or ())}, list(r.headers or ())))
    finally:
        await consumer.stop()
    return records


async def _partitions(consumer: AIOKafkaConsumer, topic: str, timeout_s: float) -> list[TopicPartition]:
    tps = await topic_partitions(consumer, topic, timeout_s)
    if not tps:
        raise AssertionError(f"topic {topic} does not exist")
    return tps


async def committed_offsets(bootstrap: str, group: str) -> dict[tuple[str, int], int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}


async def end_offsets(bootstrap: str, topic: str) -> dict[tuple[str, int], int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = await _partitions(consumer, topic, 30)
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return {(tp.topic, tp.partition): off for tp, off in ends.items()}
