"""Crash-loop accounting: how many times the record at a partition's committed offset has been started.

The count lives in the commit metadata of that offset (``{"attempts": N}``), written before the record is
handled when it is the partition's head, so a process death while handling it is counted by the next
owner; a record left for redelivery on purpose (shutdown, revocation) takes its start back out. The
runtime dead-letters a record started ``CLS_MAX_ATTEMPTS`` times as ``crash_loop``.

A head started before (a worker died while it was in flight) is a suspect (:class:`Suspects`): it waits until
nothing else is in flight, then runs alone in the process, one suspect at a time, so a death while it runs is
counted against it and never against an innocent record that happened to be in flight beside it.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Head", "Suspects", "attempts_from_metadata", "attempts_metadata"]

J = TypeVar("J")


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


class Suspects(Generic[J]):
    """The suspect records of one runtime: those waiting (in the order taken) and the one running alone."""

    def __init__(self) -> None:
        self.waiting: collections.deque[J] = collections.deque()
        self.running: J | None = None

    @property
    def active(self) -> bool:
        """A suspect waits or runs: nothing else may start (and every partition is paused)."""
        return bool(self.waiting) or self.running is not None

    def add(self, job: J) -> None:
        self.waiting.append(job)

    def next(self, in_flight: int) -> J | None:
        """The suspect to start now: one waits, none runs and nothing else is in flight."""
        if self.running is not None or not self.waiting or in_flight > 0:
            return None
        self.running = self.waiting.popleft()
        return self.running

    def finished(self, job: J) -> None:
        if job is self.running:
            self.running = None

    def remove(self, job: J) -> None:
        """Forget a waiting suspect (its partition revoked, the worker stopping)."""
        self.waiting.remove(job)
