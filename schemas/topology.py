"""The topic topology, declared once: every topic the workers read or write, who reads it, what flows
on it. ``cls-worker topics create`` (partitions, retention, compaction), the AsyncAPI document
(channels and operations) and the workers' pipelines (which topics a worker subscribes to, where its
events go) all read this table, so a new topic or lane is one entry here.

Topic names are settings (``CLS_<KEY>_TOPIC``); the defaults are ``schemas.topics``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from schemas import topics

Role = Literal["request", "output", "control"]
Worker = Literal["annotation", "training"]


@dataclass(frozen=True)
class TopicDecl:
    key: str  # settings attribute "<key>_topic", environment CLS_<KEY>_TOPIC
    default: str
    role: Role
    worker: Worker
    message: str  # AsyncAPI message id of the records on it
    channel_id: str
    description: str
    operation_summary: str
    lane: Literal["bulk", "interactive"] | None = None  # annotation request lanes
    output_key: str | None = None  # for request topics: the topic their events go to

    @property
    def setting(self) -> str:
        return f"{self.key}_topic"

    @property
    def env(self) -> str:
        return f"CLS_{self.key.upper()}_TOPIC"

    @property
    def cleanup(self) -> str:
        return "compact" if self.role == "control" else "delete"

    @property
    def has_dlq(self) -> bool:
        return self.role in ("request", "control")

    @property
    def action(self) -> str:
        return "send" if self.role == "output" else "receive"

    def name(self, worker_settings: Any) -> str:
        """This topic's configured name."""
        return str(getattr(worker_settings, self.setting))


TOPOLOGY: tuple[TopicDecl, ...] = (
    TopicDecl("annotation_requests", topics.ANNOTATION_REQUESTS, "request", "annotation", "annotationRequest",
              "annotationRequests", "Annotation requests, keyed by request id (CLS_ANNOTATION_REQUESTS_TOPIC). "
              "Bulk by default; a request with \"priority\": \"interactive\" (or at most "
              "CLS_INTERACTIVE_MAX_IMAGES images) is scheduled in the interactive lane.",
              "Annotation workers consume requests in consumer group CLS_ANNOTATION_GROUP_ID.",
              lane="bulk", output_key="annotation_results"),
    TopicDecl("annotation_interactive", topics.ANNOTATION_INTERACTIVE, "request", "annotation", "annotationRequest",
              "annotationInteractive", "Interactive annotation requests (a person waits), keyed by request id "
              "(CLS_ANNOTATION_INTERACTIVE_TOPIC); same schema and results topic as the request topic.",
              "Annotation workers consume interactive requests in the same group, with their own in-flight "
              "budget (CLS_INTERACTIVE_MAX_IN_FLIGHT): bulk work never pauses this topic.",
              lane="interactive", output_key="annotation_results"),
    TopicDecl("annotation_results", topics.ANNOTATION_RESULTS, "output", "annotation", "annotationResult",
              "annotationResults", "Annotation results, keyed by request id (CLS_ANNOTATION_RESULTS_TOPIC).",
              "One or more result parts per request, acknowledged (acks=all) before the request is committed."),
    TopicDecl("training_requests", topics.TRAINING_REQUESTS, "request", "training", "trainingRequest",
              "trainingRequests", "Training requests, keyed by job id (CLS_TRAINING_REQUESTS_TOPIC).",
              "Training workers consume jobs in consumer group CLS_TRAINING_GROUP_ID.",
              output_key="training_status"),
    TopicDecl("training_status", topics.TRAINING_STATUS, "output", "training", "trainingStatus",
              "trainingStatus", "Training status events, keyed by job id (CLS_TRAINING_STATUS_TOPIC).",
              "Status events of each job, ordered by seq."),
    TopicDecl("training_control", topics.TRAINING_CONTROL, "control", "training", "trainingCancel",
              "trainingControl", "Cancels, keyed by job id; compacted (CLS_TRAINING_CONTROL_TOPIC).",
              "Every training worker reads the whole control topic (no consumer group)."),
)

BY_KEY = {decl.key: decl for decl in TOPOLOGY}

_DLQ_WHAT = {"request": "name no request or cannot be handled", "control": "name no job"}


def request_topics(worker: Worker) -> list[TopicDecl]:
    """The request topics a worker kind subscribes to (its lanes)."""
    return [d for d in TOPOLOGY if d.worker == worker and d.role == "request"]


def dlq_channels() -> list[tuple[str, str, str, str]]:
    """(channel id, default address, description, operation summary) of every dead-letter topic."""
    out = []
    for decl in TOPOLOGY:
        if decl.has_dlq:
            noun = decl.description.split(",", 1)[0].split(" (", 1)[0].lower()
            out.append((decl.channel_id + "Dlq", topics.dlq_topic(decl.default),
                        f"Dead letters of the {decl.default} topic ({noun}).",
                        f"Records on {decl.default} that {_DLQ_WHAT[decl.role]}."))
    return out
