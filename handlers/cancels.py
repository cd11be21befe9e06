"""Job ids cancelled on the control topic: written by the control reader (``consumers.control_reader``, which
reads the topic from its start before the worker takes jobs), read by the training handler and its thread."""

from __future__ import annotations

import asyncio
import threading


class CancelRegistry:
    """Job ids cancelled on the control topic (fed by the consumer layer, read by the training thread)."""

    def __init__(self) -> None:
        self._cancelled: dict[str, str | None] = {}
        self._lock = threading.Lock()
        self.caught_up = asyncio.Event()

    def cancel(self, job_id: str, reason: str | None = None) -> None:
        with self._lock:
            self._cancelled[job_id] = reason

    def uncancel(self, job_id: str) -> None:
        with self._lock:
            self._cancelled.pop(job_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._cancelled)

    def is_cancelled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled
