"""Which offset of a partition may be committed while several of its records are in flight."""

from __future__ import annotations


class PartitionOffsets:
    """Tracks taken and finished offsets of one partition.

    The committable offset is the lowest offset still in flight, or one past the highest finished
    offset when nothing is in flight: a record is never committed before every earlier record of its
    partition is finished (at-least-once with concurrent handling).
    """

    def __init__(self) -> None:
        self._in_flight: set[int] = set()
        self._highest_done: int | None = None
        self._floor: int | None = None  # lowest abandoned offset, not to be committed past
        self.committed: int | None = None

    def take(self, offset: int) -> None:
        self._in_flight.add(offset)
        if self._floor is not None and offset <= self._floor:
            self._floor = None  # the abandoned record is being handled again

    def done(self, offset: int) -> None:
        self._in_flight.discard(offset)
        if self._highest_done is None or offset > self._highest_done:
            self._highest_done = offset

    def abandon(self, offset: int) -> None:
        """Forget an offset without finishing it (it stays uncommitted: redelivered to the next owner)."""
        self._in_flight.discard(offset)
        # Anything at or after an abandoned offset must not be committed past it.
        if self._highest_done is not None and self._highest_done >= offset:
            self._highest_done = offset - 1
        self._floor = offset if self._floor is None else min(self._floor, offset)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def committable(self) -> int | None:
        """Offset to commit (next offset to read), or None when nothing new can be committed."""
        floor = self._floor
        if self._in_flight:
            candidate = min(self._in_flight)
        elif self._highest_done is not None:
            candidate = self._highest_done + 1
        else:
            return None
        if floor is not None:
            candidate = min(candidate, floor)
        if self.committed is not None and candidate <= self.committed:
            return None
        return candidate
