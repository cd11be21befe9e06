"""The backend's client of cls-workers: build and validate a request, send it, read and validate the result
and status events. It imports ``schemas`` (pydantic), aiokafka and the standard library, never torch or
any other part of the workers: it is what ``pip install cls-workers`` (no extras) is for (docs/client.md).

    from cls_client import send_request, wait_for_events

    request_id = await send_request(producer, {"task": "classify", "model": "clip", "classes": ["cat", "dog"],
                                               "images": [{"id": "a", "url": "s3://datasets/a.jpg"}]})
    parts = await wait_for_events(consumer, request_id, timeout_s=60)   # every part of the result, validated
"""

from cls_client.client import (
    REQUEST_TOPICS,
    RESULT_TOPICS,
    EventProgress,
    InvalidEvent,
    InvalidRequest,
    OutgoingRecord,
    UnfoldableEvent,
    build_request,
    check_storable,
    encode_request,
    parse_event,
    read_event,
    send_request,
    wait_for_events,
)

__all__ = [
    "REQUEST_TOPICS",
    "RESULT_TOPICS",
    "EventProgress",
    "InvalidEvent",
    "InvalidRequest",
    "OutgoingRecord",
    "UnfoldableEvent",
    "build_request",
    "check_storable",
    "encode_request",
    "parse_event",
    "read_event",
    "send_request",
    "wait_for_events",
]
