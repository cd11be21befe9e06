"""A worker process running the real consumer runtime with a trivial handler (runtime tests).

Environment (besides the normal KAFKA_* / CLS_* settings):
  ECHO_SLEEP_S         seconds each request takes (default 0)
  ECHO_MAX_POLL_MS     consumer max_poll_interval_ms override
  ECHO_GROUP_ID        consumer group (default: CLS_ANNOTATION_GROUP_ID)
  ECHO_BULK_SLEEP_S    extra seconds each bulk-lane request takes
  ECHO_BIG_FOR         a request id whose result event is made larger than any record may be
  ECHO_BUG_FOR         a request id whose handler raises an unexpected exception (a bug)
Handles annotation requests: every image gets the first class with confidence 1.0.
"""

from __future__ import annotations

import asyncio
import os
import sys

from consumers.logging_setup import configure_logging
from consumers.lanes import annotation_lanes
from consumers.pipeline import Pipeline
from consumers.runtime import ConsumerRuntime
from consumers.settings import Settings
from consumers.worker import serve
from schemas.annotation import AnnotationRequest, AnnotationResult, ImageResult, ModelDescriptor, Prediction
from schemas.codec import ANNOTATION_ADAPTER
from schemas.common import ErrorInfo


def echo_pipeline(settings: Settings, sleep_s: float = 0.0) -> Pipeline:
    big_for = os.environ.get("ECHO_BIG_FOR")
    bug_for = os.environ.get("ECHO_BUG_FOR")
    bulk_sleep_s = float(os.environ.get("ECHO_BULK_SLEEP_S", "0"))

    async def handle(request: AnnotationRequest):
        if sleep_s:
            await asyncio.sleep(sleep_s)
        if bulk_sleep_s and request.priority == "bulk":
            await asyncio.sleep(bulk_sleep_s)
        if request.request_id == bug_for:
            raise ZeroDivisionError("echo handler bug")
        first = (request.classes or ["none"])[0]
        weights = "x" * (settings.worker.max_record_bytes + 1) if request.request_id == big_for else "none"
        yield AnnotationResult(
            message_id=AnnotationResult.message_id_for(request.request_id, 0),
            request_id=request.request_id,
            status="completed",
            model=ModelDescriptor(family="echo", variant="echo", weights=weights),
            results=[ImageResult(id=img.id, predictions=[Prediction(class_name=first, confidence=1.0)]) for img in request.images],
        )

    def failed(request_id: str, error: ErrorInfo) -> AnnotationResult:
        return AnnotationResult(
            message_id=AnnotationResult.message_id_for(request_id, "failed"),
            request_id=request_id,
            status="failed",
            error=error,
        )

    return Pipeline(
        name="annotation.result",
        **annotation_lanes(settings),
        adapter=ANNOTATION_ADAPTER,
        id_field="request_id",
        handle=handle,
        failed_event=failed,
    )


async def main() -> int:
    settings = Settings()
    configure_logging(settings.worker.log_level, "json")
    sleep_s = float(os.environ.get("ECHO_SLEEP_S", "0"))
    poll_ms = os.environ.get("ECHO_MAX_POLL_MS")
    runtime = ConsumerRuntime(
        settings,
        echo_pipeline(settings, sleep_s),
        group_id=os.environ.get("ECHO_GROUP_ID", settings.worker.annotation_group_id),
        max_poll_interval_ms=int(poll_ms) if poll_ms else None,
    )
    return await serve(runtime)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
