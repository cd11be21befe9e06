"""``cls-worker topics create``: explicit partitions, retention, a compacted control topic; idempotent."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from consumers.topics_admin import create_topics, topic_specs
from testkit.local import KAFKA_SH
from testkit.kafka import settings_for, topic_env
from testkit.local import REPO

pytestmark = pytest.mark.kafka


def tool(*args: str) -> str:
    out = subprocess.run([str(KAFKA_SH), *args], env={**os.environ}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


async def test_topics_create_provisions_everything_and_is_idempotent(kafka_bootstrap, topic_prefix):
    env = {**os.environ, **topic_env(topic_prefix), "CLS_REQUEST_TOPIC_PARTITIONS": "4"}
    out = subprocess.run([sys.executable, "-m", "consumers.cli", "topics", "create"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\tcreated") == 10, out.stdout
    requests = f"{topic_prefix}.cls.annotation.requests"
    described = tool("topics", "--describe", "--topic", requests)
    assert "PartitionCount: 4" in described and "retention.ms=604800000" in described
    assert f"max.message.bytes={4 * 1024 * 1024 + 16 * 1024}" in described  # matches CLS_MAX_RECORD_BYTES
    interactive = tool("topics", "--describe", "--topic", f"{topic_prefix}.cls.annotation.interactive")
    assert "PartitionCount: 4" in interactive
    control = tool("topics", "--describe", "--topic", f"{topic_prefix}.cls.training.control")
    assert "cleanup.policy=compact" in control
    assert f"{requests}.dlq" in tool("topics", "--list")

    again = subprocess.run([sys.executable, "-m", "consumers.cli", "topics", "create"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("\texists") == 10, again.stdout

    # a request topic with fewer partitions than configured is grown, never shrunk
    settings = settings_for(topic_prefix, request_topic_partitions=6)
    outcomes = await create_topics(settings, topic_specs(settings))
    assert outcomes[requests] == "grown 4->6"
    assert "PartitionCount: 6" in tool("topics", "--describe", "--topic", requests)


def test_topics_create_reports_unreachable_broker():
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9", "KAFKA_REQUEST_TIMEOUT_MS": "3000"}
    out = subprocess.run([sys.executable, "-m", "consumers.cli", "topics", "create"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "could not create topics on 127.0.0.1:9" in out.stderr, out.stderr
