"""Moved to ``testkit.kafka`` (clients, topics) and ``testkit.local`` (``WorkerProcess``, ``REPO``); this
re-export keeps tests written before the move importing. New code imports from ``testkit``."""

from testkit.kafka import (  # noqa: F401
    Record,
    committed_offsets,
    end_offsets,
    produce,
    provision,
    read_until,
    send,
    settings_for,
    topic_env,
)
from testkit.local import REPO, WorkerProcess  # noqa: F401
