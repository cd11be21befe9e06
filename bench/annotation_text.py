"""The text pass in the annotation benchmark (``--scenarios text``): what a person waits for when a class is new.

Against the benchmark's worker (CLS_TEXT_CACHE_DIR under the work folder, the default templates the bench's
--templates, the quick set the worker's default 'a photo of a {}.'), after the other scenarios:

1. first interactive request with 5 new classes (one image): answered with the quick set (``prompt_set``
   "quick"); the worker then computes the full ensemble in the background (its ``text_background_done`` log
   line, waited for, bounded);
2. the next interactive request with the same classes: the full ensemble (``prompt_set`` "full");
3. for comparison, a first interactive request with 5 other new classes and ``CLS_QUICK_PROMPT_TEMPLATES``
   off is what every first request cost before: measured as a first *bulk* request with 5 other new classes
   (bulk requests always wait for the full ensemble);
4. restarted worker with a warm disk cache (``restart_row``): a new worker process on the same
   CLS_TEXT_CACHE_DIR answers an interactive request with the classes of step 1 with the full ensemble and
   no text pass (its log says ``text_cache: hit``).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.common import ResultCollector, wait_all
from testkit.local import WorkerProcess

SessionLike = Any  # bench.annotation_e2e.Session, or restart_row's stand-in with the same fields

NEW_CLASSES = ["zebra", "violin", "lighthouse", "teapot", "kayak"]
OTHER_CLASSES = ["cactus", "harp", "windmill", "kettle", "canoe"]


async def one_request(session: SessionLike, request_id: str, url: str, classes: list[str], priority: str,
                      timeout_s: float = 600) -> dict[str, Any]:
    import json

    body = {"task": "classify", "request_id": request_id, "model": "clip", "images": [{"id": request_id, "url": url}],
            "classes": classes, "top_k": 3, "threshold": 0.0, "priority": priority}
    topic = session.topics["CLS_ANNOTATION_INTERACTIVE_TOPIC" if priority == "interactive"
                           else "CLS_ANNOTATION_REQUESTS_TOPIC"]
    entry = session.collector.expect(request_id)
    started = time.monotonic()
    await session.producer.send_and_wait(topic, json.dumps(body).encode(), key=request_id.encode())
    await wait_all([entry], session.worker, timeout_s, request_id)
    return {"seconds": round(entry.last_at - started, 3), "prompt_set": entry.prompt_set}


async def wait_background(session: SessionLike, done_before: int, timeout_s: float = 600) -> float:
    """Seconds until the worker logs one more ``text_background_done`` than ``done_before``."""
    started = time.monotonic()
    while len(session.worker.log_events("text_background_done")) <= done_before:
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"the background ensemble did not finish in {timeout_s:.0f} s")
        await asyncio.sleep(0.1)
    return round(time.monotonic() - started, 2)


async def text_scenario(session: SessionLike) -> dict[str, Any]:
    url = session.urls[0]
    tag = f"{int(time.time())}"
    done_before = len(session.worker.log_events("text_background_done"))
    first = await one_request(session, f"text-first-{tag}", url, NEW_CLASSES, "interactive")
    background_s = await wait_background(session, done_before)
    second = await one_request(session, f"text-next-{tag}", url, NEW_CLASSES, "interactive")
    bulk_first = await one_request(session, f"text-bulk-{tag}", url, OTHER_CLASSES, "bulk")
    return {"first_interactive": first, "background_ensemble_s": background_s, "next_interactive": second,
            "first_bulk_full_ensemble": bulk_first, "classes": NEW_CLASSES}


def restart_row(env: dict[str, str], workdir: Path, bootstrap: str, topics: dict[str, str], url: str,
                stop_old: Any) -> dict[str, Any]:
    """Stop the benchmark's worker (``stop_old()``), start a new one on the same CLS_TEXT_CACHE_DIR, and time an
    interactive request with the classes the first worker computed (no text pass expected)."""
    stop_old()
    started = time.monotonic()
    worker = WorkerProcess.cli("annotation", env, workdir / "worker-restarted.log", die_with_parent=True)
    try:
        worker.wait_for_log_blocking("partitions_assigned", timeout_s=300)
        ready_s = round(time.monotonic() - started, 1)
        out = asyncio.run(_restarted_request(worker, bootstrap, topics, url))
        summaries = [e for e in worker.log_events("annotation_summary")
                     if str(e.get("request_id", "")).startswith("text-restart")]
        out["text_cache"] = summaries[0].get("text_cache") if summaries else None
        out["worker_ready_s"] = ready_s
        return out
    finally:
        worker.stop()


async def _restarted_request(worker: WorkerProcess, bootstrap: str, topics: dict[str, str], url: str) -> dict[str, Any]:
    from aiokafka import AIOKafkaProducer

    collector = ResultCollector(bootstrap, topics["CLS_ANNOTATION_RESULTS_TOPIC"])
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await collector.start()
    await producer.start()
    try:
        session = SimpleNamespace(topics=topics, collector=collector, producer=producer, worker=worker)
        return await one_request(session, f"text-restart-{int(time.time())}", url, NEW_CLASSES, "interactive")
    finally:
        await producer.stop()
        await collector.stop()
