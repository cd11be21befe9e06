"""Default topic and header names (each topic name is configurable in the workers' settings)."""

ANNOTATION_REQUESTS = "cls.annotation.requests"
ANNOTATION_INTERACTIVE = "cls.annotation.interactive"
ANNOTATION_RESULTS = "cls.annotation.results"
TRAINING_REQUESTS = "cls.training.requests"
TRAINING_STATUS = "cls.training.status"
TRAINING_CONTROL = "cls.training.control"
DLQ_SUFFIX = ".dlq"


def dlq_topic(source_topic: str) -> str:
    """The dead-letter topic of an input topic."""
    return source_topic + DLQ_SUFFIX


class Headers:
    """Header names on produced records (values are UTF-8)."""

    EVENT_TYPE = "event-type"
    SCHEMA_VERSION = "schema-version"
    CONTENT_TYPE = "content-type"
    REQUEST_ID = "request-id"
    JOB_ID = "job-id"
    DLQ_ERROR_CODE = "dlq-error-code"
    DLQ_ERROR_MESSAGE = "dlq-error-message"
    DLQ_SOURCE_TOPIC = "dlq-source-topic"
    DLQ_SOURCE_PARTITION = "dlq-source-partition"
    DLQ_SOURCE_OFFSET = "dlq-source-offset"
    DLQ_VALUE_TRUNCATED = "dlq-value-truncated"  # only when the original value could not fit: its size in bytes


CONTENT_TYPE_JSON = "application/json"
