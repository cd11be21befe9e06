"""Lanes: which request topics the annotation worker reads, the lane of each, and the rule that moves a
request between lanes (all from ``schemas.topology``); and the runtime's lane admission (``LaneAdmission``):
per-lane slots, parked records, read-ahead and the partitions to pause. Light on imports: the runtime
tests' echo worker uses it too."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any, Generic, Protocol, TypeVar

from aiokafka import TopicPartition

from consumers import metrics
from consumers.settings import Settings
from schemas.annotation import lane_of
from schemas.topology import BY_KEY, request_topics


def annotation_lanes(settings: Settings) -> dict[str, Any]:
    """The Pipeline fields of the annotation lanes, from ``schemas.topology``: the request topics, the
    lane of each, the interactive budget, and the rule that moves a request between lanes."""
    w = settings.worker
    decls = request_topics("annotation")
    max_images = w.interactive_max_images
    return {
        "input_topic": decls[0].name(w),
        "extra_input_topics": [d.name(w) for d in decls[1:]],
        "output_topic": BY_KEY[decls[0].output_key or ""].name(w),
        "topic_lanes": {d.name(w): d.lane or "bulk" for d in decls},
        "lane_budgets": {"interactive": w.interactive_max_in_flight},
        "lane_for": lambda body, topic_lane: lane_of(body, topic_lane, max_images),
        "with_lane": lambda request, lane: request.model_copy(update={"priority": lane}),
    }


class Parkable(Protocol):
    lane: str
    parked: bool


J = TypeVar("J", bound=Parkable)


class LaneAdmission(Generic[J]):
    """Lane admission of one consumer runtime: each lane's budget of records in flight, the records taken
    but parked until their lane has a slot (in the order taken), and the read-ahead that lets a request for
    another lane be seen behind a full one. ``paused`` says which partitions to pause."""

    def __init__(self, budgets: dict[str, int], lookahead: int) -> None:
        self.budgets = dict(budgets)
        self.running: dict[str, int] = {lane: 0 for lane in self.budgets}
        self.parked: dict[str, collections.deque[J]] = {lane: collections.deque() for lane in self.budgets}
        # Records read ahead while their lane is full, so a request for another lane behind them is seen
        # (only with several lanes; a one-lane pipeline reads what it can start).
        self.lookahead = lookahead if len(self.budgets) > 1 else 0

    def free(self, lane: str) -> int:
        return self.budgets[lane] - self.running[lane]

    def parked_total(self) -> int:
        return sum(len(q) for q in self.parked.values())

    def room(self) -> int:
        """How many records may be read now: free slots in every lane, plus read-ahead room."""
        room = sum(max(0, self.free(lane)) for lane in self.budgets)
        return room + max(0, self.lookahead - self.parked_total())

    def can_start(self, lane: str) -> bool:
        """A slot is free and nothing of the lane waits before it."""
        return self.free(lane) > 0 and not self.parked[lane]

    def park(self, job: J) -> None:
        job.parked = True
        self.parked[job.lane].append(job)
        metrics.LANE_PARKED.labels(job.lane).set(len(self.parked[job.lane]))

    def started(self, job: J) -> None:
        job.parked = False
        self.running[job.lane] += 1
        metrics.LANE_IN_FLIGHT.labels(job.lane).set(self.running[job.lane])

    def finished(self, job: J) -> None:
        self.running[job.lane] -= 1
        metrics.LANE_IN_FLIGHT.labels(job.lane).set(self.running[job.lane])

    def ready(self) -> Iterator[J]:
        """The parked records that have a slot now, oldest first per lane (each one ``started`` by the caller)."""
        for lane, queue in self.parked.items():
            while queue and self.free(lane) > 0:
                yield queue.popleft()
            metrics.LANE_PARKED.labels(lane).set(len(queue))

    def unpark(self, job: J) -> None:
        self.parked[job.lane].remove(job)

    def paused(self, assignment: set[TopicPartition], held: set[TopicPartition], lane_of_topic: Callable[[str], str],
               all_paused: bool) -> set[TopicPartition]:
        """The partitions to pause: all of them when there is no room; else each one whose lane is full and
        whose read-ahead is used up; partitions with a suspect record (``held``) always."""
        if all_paused:
            return set(assignment)
        want = held & assignment
        ahead_full = self.parked_total() >= self.lookahead
        for tp in assignment:
            if self.free(lane_of_topic(tp.topic)) <= 0 and ahead_full:
                want.add(tp)
        return want
