"""What the consumer runtime needs to know about one kind of request (annotation, training, ...).

A ``Pipeline`` binds an input topic to a handler: how to validate a record into a request, how to run
it, and how to turn a failure into a contract event. It knows nothing of aiokafka.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter

from schemas.common import ErrorInfo, OutputModel
from schemas.topics import Headers

Handle = Callable[[Any], AsyncIterator[OutputModel]]
FailedEvent = Callable[[str, ErrorInfo], OutputModel]


@dataclass
class Pipeline:
    """One input topic, its request model, its handler and its output topic."""

    name: str
    input_topic: str
    output_topic: str
    adapter: TypeAdapter[Any]
    id_field: str  # "request_id" | "job_id"
    handle: Handle  # async generator of events for one validated request
    failed_event: FailedEvent  # the contract's failed event for an id + error
    handler_timeout_s: float | None = None
    # Called with the ids of requests in flight on revoked partitions / at shutdown, so long
    # handlers can checkpoint and raise ``handlers.lifecycle.Abandoned`` (no event, no commit).
    on_preempt: Callable[[set[str]], None] | None = None
    # Lanes: every input topic belongs to a lane with its own in-flight budget (the runtime's
    # max_in_flight is the budget of the first topic's lane). ``lane_for(body, topic_lane)`` may move a
    # record read from a topic into another lane (e.g. a request with "priority": "interactive" on the
    # bulk topic); ``with_lane(request, lane)`` tells the validated request which lane it runs in.
    extra_input_topics: list[str] = field(default_factory=list)
    topic_lanes: dict[str, str] = field(default_factory=dict)
    lane_budgets: dict[str, int] = field(default_factory=dict)
    lane_for: Callable[[dict[str, Any], str], str] | None = None
    with_lane: Callable[[Any, str], Any] | None = None

    @property
    def input_topics(self) -> list[str]:
        return [self.input_topic, *self.extra_input_topics]

    def lane_of_topic(self, topic: str) -> str:
        return self.topic_lanes.get(topic, "default")

    @property
    def id_header(self) -> str:
        return Headers.JOB_ID if self.id_field == "job_id" else Headers.REQUEST_ID

    def headers_for(self, event: OutputModel, entity_id: str) -> list[tuple[str, bytes]]:
        return [
            (Headers.EVENT_TYPE, str(getattr(event, "event_type", self.name)).encode()),
            (Headers.SCHEMA_VERSION, event.schema_version.encode()),
            (Headers.CONTENT_TYPE, b"application/json"),
            (self.id_header, entity_id.encode()),
        ]
