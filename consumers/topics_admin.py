"""Explicit topic provisioning (``cls-worker topics create``): partitions, retention, compaction.

Auto-created topics get one partition, which caps scaling at one worker; so every topic is created
here with its configured partition count. Idempotent: existing topics are left as they are, except
that a request topic with fewer partitions than configured is grown (partitions can only grow).
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncio
import time

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.errors import for_code

from consumers.settings import Settings
from schemas.topics import dlq_topic
from schemas.topology import TOPOLOGY

log = structlog.get_logger("cls.topics")

TOPIC_ALREADY_EXISTS = 36


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    configs: dict[str, str]


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Every topic of ``schemas.topology``, with partitions and configs from settings."""
    w = settings.worker
    # Every topic takes records of CLS_MAX_RECORD_BYTES (plus batch overhead) whatever the broker's
    # message.max.bytes; a dead letter carries the original record plus its dlq-* headers.
    record = {"max.message.bytes": str(w.max_record_bytes + 16 * 1024)}
    dlq_record = {"max.message.bytes": str(w.max_record_bytes + 96 * 1024)}
    request = {"retention.ms": str(w.request_retention_ms), "cleanup.policy": "delete", **record}
    output = {"retention.ms": str(w.output_retention_ms), "cleanup.policy": "delete", **record}
    dlq = {"retention.ms": str(w.dlq_retention_ms), "cleanup.policy": "delete", **dlq_record}
    control = {"cleanup.policy": "compact", "min.compaction.lag.ms": "0", "segment.ms": str(3600 * 1000), **record}
    partitions = {"request": w.request_topic_partitions, "output": w.output_topic_partitions,
                  # The control topic is read whole by every training worker: few partitions suffice.
                  "control": 1}
    configs = {"request": request, "output": output, "control": control}
    specs = [TopicSpec(decl.name(w), partitions[decl.role], configs[decl.role]) for decl in TOPOLOGY]
    for decl in TOPOLOGY:
        if decl.has_dlq:
            specs.append(TopicSpec(dlq_topic(decl.name(w)), 1, dlq))
    return specs


async def create_topics(settings: Settings, specs: list[TopicSpec] | None = None) -> dict[str, str]:
    """Create missing topics, grow request topics with too few partitions. Returns name -> outcome."""
    specs = specs if specs is not None else topic_specs(settings)
    admin = AIOKafkaAdminClient(**settings.kafka.client_kwargs())
    await admin.start()
    outcomes: dict[str, str] = {}
    try:
        new = [
            NewTopic(s.name, s.partitions, settings.worker.topic_replication_factor, topic_configs=s.configs)
            for s in specs
        ]
        response = await admin.create_topics(new)
        for entry in response.topic_errors:
            name, code = entry[0], entry[1]
            if code == 0:
                outcomes[name] = "created"
            elif code == TOPIC_ALREADY_EXISTS:
                outcomes[name] = "exists"
            else:
                message = entry[2] if len(entry) > 2 else ""
                raise for_code(code)(f"creating topic {name}: {message}")
        existing = {s.name: s for s in specs if outcomes.get(s.name) == "exists"}
        if existing:
            described = await admin.describe_topics(list(existing))
            for topic in described:
                name = topic["topic"]
                have = len(topic["partitions"])
                want = existing[name].partitions
                if have < want:
                    await admin.create_partitions({name: NewPartitions(total_count=want)})
                    outcomes[name] = f"grown {have}->{want}"
    finally:
        await admin.close()
    for name, outcome in outcomes.items():
        log.info("topic", topic=name, outcome=outcome)
    return outcomes


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str, timeout_s: float = 10.0) -> list[TopicPartition]:
    """The partitions of ``topic``, metadata refreshed until it shows up (bounded); [] when it does not exist."""
    deadline = time.monotonic() + timeout_s
    while True:
        await consumer._client.force_metadata_update()  # aiokafka has no public refresh
        partitions = consumer.partitions_for_topic(topic)
        if partitions or time.monotonic() > deadline:
            return [TopicPartition(topic, p) for p in sorted(partitions or ())]
        await asyncio.sleep(0.2)
