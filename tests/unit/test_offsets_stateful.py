"""PartitionOffsets against a reference model: take / done / abandon / re-take (seek) / commit in any order.

The reference is the rule itself: a commit at C is safe when every offset below C that the consumer
handed out has been acknowledged (done) at least once since it was last abandoned; and when nothing
is pending, everything handed out and finished can be committed (liveness).
"""

from __future__ import annotations

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from consumers.offsets import PartitionOffsets


class OffsetsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.offsets = PartitionOffsets()
        self.position = 0  # the consumer's next fetch offset
        self.in_flight: set[int] = set()
        self.unacked: set[int] = set()  # handed out, and not acknowledged since (abandoned or in flight)
        self.acked: set[int] = set()
        self.high = -1  # highest offset ever handed out
        self.committed: int | None = None

    @rule()
    def take_next(self) -> None:
        offset = self.position
        self.position += 1
        self.high = max(self.high, offset)
        if offset in self.in_flight:  # the runtime never starts a record twice
            return
        self.offsets.take(offset)
        self.in_flight.add(offset)
        self.unacked.add(offset)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def done(self, data) -> None:
        offset = data.draw(st.sampled_from(sorted(self.in_flight)))
        self.offsets.done(offset)
        self.in_flight.discard(offset)
        self.unacked.discard(offset)
        self.acked.add(offset)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def abandon(self, data) -> None:
        offset = data.draw(st.sampled_from(sorted(self.in_flight)))
        self.offsets.abandon(offset)
        self.in_flight.discard(offset)
        self.unacked.add(offset)  # its events may be half published: never committed past

    @precondition(lambda self: self.unacked - self.in_flight)
    @rule(data=st.data())
    def seek_back(self, data) -> None:
        # The runtime rewinds to an abandoned offset; what follows is read (and taken) again.
        self.position = data.draw(st.sampled_from(sorted(self.unacked - self.in_flight)))

    @rule()
    def commit(self) -> None:
        candidate = self.offsets.committable()
        if candidate is None:
            return
        assert self.committed is None or candidate > self.committed, "commits only move forward"
        unsafe = [o for o in self.unacked if o < candidate]
        assert not unsafe, f"commit {candidate} passes unacknowledged offsets {sorted(unsafe)}"
        assert candidate <= self.high + 1
        self.offsets.committed = candidate
        self.committed = candidate

    @invariant()
    def in_flight_count(self) -> None:
        assert self.offsets.in_flight == len(self.in_flight)

    @invariant()
    def everything_finished_is_committable(self) -> None:
        if not self.unacked and self.acked:
            expected = max(self.acked) + 1
            got = self.offsets.committable()
            if self.committed is not None and expected <= self.committed:
                assert got is None
            else:
                assert got == expected

    @invariant()
    def lowest_pending_blocks(self) -> None:
        if self.unacked:
            assert self.offsets.lowest_pending() == min(self.unacked)


OffsetsMachine.TestCase.settings = settings(max_examples=400, stateful_step_count=40, deadline=None)
test_partition_offsets_against_reference = OffsetsMachine.TestCase


def test_the_interleaving_from_issue_9() -> None:
    """0-4 in flight; 3 fails, then 0 fails; 0 and 1 re-taken and finished; 2 and 4 finish: commit stays at 3."""
    offsets = PartitionOffsets()
    for o in range(5):
        offsets.take(o)
    offsets.abandon(3)
    offsets.abandon(0)
    offsets.take(0)
    offsets.take(1)  # already in flight in the runtime; taking it again is harmless
    for o in (0, 1, 2, 4):
        offsets.done(o)
    assert offsets.committable() == 3
    offsets.take(3)
    offsets.done(3)
    assert offsets.committable() == 5
