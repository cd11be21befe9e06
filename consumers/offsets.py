"""Which offset of a partition may be committed while several of its records are in flight."""

from __future__ import annotations


class PartitionOffsets:
    """Tracks taken, finished and abandoned offsets of one partition.

    An offset is *pending* from the moment it is taken until it is acknowledged (``done``): while in
    flight, and also after it was abandoned (left for redelivery) until it is taken and finished again.
    The committable offset is the lowest pending offset, or one past the highest finished offset when
    nothing is pending: a record is never committed past before its events were acknowledged, however
    takes, failures and re-takes interleave (at-least-once with concurrent handling).
    """

    def __init__(self) -> None:
        self._in_flight: set[int] = set()
        self._abandoned: set[int] = set()
        self._highest_done: int | None = None
        self.committed: int | None = None

    def take(self, offset: int) -> None:
        self._in_flight.add(offset)
        self._abandoned.discard(offset)

    def done(self, offset: int) -> None:
        self._in_flight.discard(offset)
        self._abandoned.discard(offset)
        if self._highest_done is None or offset > self._highest_done:
            self._highest_done = offset

    def abandon(self, offset: int) -> None:
        """Stop handling an offset without finishing it: it stays pending (not to be committed past)."""
        if offset in self._in_flight:
            self._in_flight.discard(offset)
            self._abandoned.add(offset)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def lowest_pending(self) -> int | None:
        pending = self._in_flight | self._abandoned
        return min(pending) if pending else None

    def committable(self) -> int | None:
        """Offset to commit (next offset to read), or None when nothing new can be committed."""
        candidate = self.lowest_pending()
        if candidate is None:
            if self._highest_done is None:
                return None
            candidate = self._highest_done + 1
        if self.committed is not None and candidate <= self.committed:
            return None
        return candidate
