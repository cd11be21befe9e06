"""Crash-loop accounting: how many times the record at a partition's committed offset has been started.

The count lives in the commit metadata of that offset (``{"attempts": N}``), written before the record is
handled when it is the partition's head, so a process death while handling it is counted by the next
owner; a record left for redelivery on purpose (shutdown, revocation) takes its start back out. The
runtime dead-letters a record started ``CLS_MAX_ATTEMPTS`` times as ``crash_loop``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["Head", "attempts_from_metadata", "attempts_metadata"]


@dataclass
class Head:
    """The committed position of a partition and how often its record was started (commit metadata)."""

    offset: int | None
    attempts: int = 0


def attempts_metadata(count: int) -> str:
    """Commit metadata saying how many times the record at the committed offset has been started."""
    return json.dumps({"attempts": count}) if count else ""


def attempts_from_metadata(metadata: str | None) -> int:
    try:
        value = json.loads(metadata or "{}").get("attempts", 0)
    except (ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) and value >= 0 else 0
