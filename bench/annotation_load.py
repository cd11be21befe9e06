"""Latency under load and fairness, against the benchmark's one worker (``--scenarios load``).

1. Idle: ``--load-probes`` one-image requests on the interactive topic, one after another (each waits for its
   answer, then ``--probe-gap-s``, as a labeler looking at the suggestion would).
2. Under load: one ``--load-bulk-images`` bulk request (2,000) on the request topic. Once the worker batches
   it, three windows while it runs: ``--load-window-s`` without probes, the probes again, and
   ``--load-window-s`` without probes. The bulk request must still run when the probes end (checked).
   Bulk throughput per window comes from the worker's metrics (images batched per second, the probes'
   own images left out; whole batches, so a window should hold many), and so does the share of the window
   the model thread spent in bulk forwards; the time of one bulk batch forward is the worker's own mean
   (``cls_batch_forward_seconds{lane="bulk"}``) over the same windows.
3. Fairness: two equal bulk requests (``--fair-images`` each) produced together; each one's finish time
   (its last result part) from the first produce.

Targets: p95 under load <= idle p95 + one bulk batch forward; bulk throughput with probes at most 10% below
the mean of the windows without; the two bulk requests finish within 20% of each other.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from bench.common import CpuProbe, percentile, request_body, wait_all

FORWARD_SUM = 'cls_batch_forward_seconds_sum{lane="bulk"}'
FORWARD_COUNT = 'cls_batch_forward_seconds_count{lane="bulk"}'
INTERACTIVE_SUM = 'cls_batch_forward_seconds_sum{lane="interactive"}'
INTERACTIVE_COUNT = 'cls_batch_forward_seconds_count{lane="interactive"}'
LATENCY_SLACK_TARGET = 1.0  # p95 under load <= idle p95 + this many bulk batch forwards
THROUGHPUT_LOSS_TARGET = 0.10
FAIRNESS_TARGET = 1.2


def _stats(latencies: list[float]) -> dict[str, Any]:
    return {"p50_ms": round(1000 * percentile(latencies, 0.5), 1), "p95_ms": round(1000 * percentile(latencies, 0.95), 1),
            "max_ms": round(1000 * max(latencies), 1), "n": len(latencies)}


class _Window:
    """Bulk images batched, and bulk forwards, between ``start`` and ``stop`` (the worker's metrics)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.probe = CpuProbe(session.cpu_pids)

    def start(self) -> None:
        self.t0, self.m0 = time.monotonic(), self.session.metrics()
        self.probe.start()

    def stop(self, own_images: int = 0) -> dict[str, Any]:
        t1, m1 = time.monotonic(), self.session.metrics()
        cpu = self.probe.stop()

        def delta(name: str) -> float:
            return m1.get(name, 0.0) - self.m0.get(name, 0.0)

        images = delta("cls_batch_images_sum") - own_images
        forwards, interactive = delta(FORWARD_COUNT), delta(INTERACTIVE_COUNT)
        seconds = t1 - self.t0
        return {"seconds": round(seconds, 2), "bulk_images": int(images),
                "bulk_images_per_s": round(images / seconds, 2),
                "bulk_forwards": int(forwards),
                "bulk_forward_s": round(delta(FORWARD_SUM) / forwards, 3) if forwards else None,
                "bulk_forward_s_per_image": round(delta(FORWARD_SUM) / images, 5) if images > 0 else None,
                "interactive_forwards": int(interactive),
                "interactive_forward_s": round(delta(INTERACTIVE_SUM) / interactive, 3) if interactive else None,
                # the share of the window the model thread spent in forwards (1.0: never idle), and in bulk ones
                "forward_busy": round((delta(FORWARD_SUM) + delta(INTERACTIVE_SUM)) / seconds, 3),
                "bulk_busy": round(delta(FORWARD_SUM) / seconds, 3),
                "others_cores": cpu.get("others_cores"), "loadavg_1m": round(os.getloadavg()[0], 2)}


async def load_scenario(session: Any) -> dict[str, Any]:
    args, urls = session.args, session.urls
    out: dict[str, Any] = {"probe_gap_s": args.probe_gap_s, "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}

    async def probes(tag: str) -> list[float]:
        latencies = []
        for i in range(args.load_probes):
            image = [(f"{tag}-{i}", urls[(7 * i + 3) % len(urls)])]
            latencies.append(await session.one(f"{tag}-{i}", image, 120, interactive=True))
            await asyncio.sleep(args.probe_gap_s)
        return latencies

    idle = await probes("idle")
    out["idle"] = _stats(idle)

    bulk_images = [(f"bulk-{i}", urls[i % len(urls)]) for i in range(args.load_bulk_images)]
    bulk, bulk_started = await session.send("bulk-load", bulk_images)
    # the worker batches the bulk request steadily: two bulk forwards done
    first = session.metrics().get(FORWARD_COUNT, 0.0)
    deadline = time.monotonic() + 300
    while session.metrics().get(FORWARD_COUNT, 0.0) < first + 2:
        if time.monotonic() > deadline or bulk.future.done():
            raise RuntimeError("the bulk request did not start batching within 300 s (or ended already)")
        await asyncio.sleep(0.2)

    windows: dict[str, Any] = {}
    window = _Window(session)
    window.start()
    await asyncio.sleep(args.load_window_s)
    windows["before"] = window.stop()
    window.start()
    loaded = await probes("load")
    windows["probes"] = window.stop(own_images=len(loaded))
    out["bulk_running_when_probes_ended"] = not bulk.future.done()
    window.start()
    await asyncio.sleep(args.load_window_s)
    windows["after"] = window.stop()
    out["bulk_running_after_last_window"] = not bulk.future.done()
    out["windows"] = windows
    out["under_load"] = _stats(loaded)

    rate_without = (windows["before"]["bulk_images_per_s"] + windows["after"]["bulk_images_per_s"]) / 2
    out["bulk_images_per_s_without_probes"] = round(rate_without, 2)
    out["bulk_images_per_s_with_probes"] = windows["probes"]["bulk_images_per_s"]
    out["bulk_throughput_loss"] = round(1 - windows["probes"]["bulk_images_per_s"] / rate_without, 3) if rate_without else None
    # the same from the model thread's time in bulk forwards (not quantised by whole batches in a window)
    busy_without = (windows["before"]["bulk_busy"] + windows["after"]["bulk_busy"]) / 2
    out["bulk_busy_loss"] = round(1 - windows["probes"]["bulk_busy"] / busy_without, 3) if busy_without else None
    forwards = [w for w in (windows["before"], windows["after"]) if w["bulk_forward_s"]]
    forward_s = sum(w["bulk_forward_s"] * w["bulk_forwards"] for w in forwards) / max(1, sum(w["bulk_forwards"] for w in forwards))
    out["bulk_mean_forward_ms"] = round(1000 * forward_s, 1)  # batches as they came (partial ones too)
    # The budget's "one bulk batch forward": a full batch (CLS_BATCH_SIZE images), from the model thread's time per
    # bulk image in the windows without probes (on a CPU a forward's time is about linear in its images from 8 on).
    per_image = [w["bulk_forward_s_per_image"] for w in forwards if w.get("bulk_forward_s_per_image")]
    full_s = (sum(per_image) / len(per_image)) * args.worker_batch_size if per_image else forward_s
    out["bulk_batch_forward_ms"] = round(1000 * full_s, 1)
    out["bulk_batch_size"] = args.worker_batch_size
    out["p95_ratio"] = round(out["under_load"]["p95_ms"] / out["idle"]["p95_ms"], 2)
    out["p95_budget_ms"] = round(out["idle"]["p95_ms"] + LATENCY_SLACK_TARGET * out["bulk_batch_forward_ms"], 1)
    out["latency_ok"] = out["under_load"]["p95_ms"] <= out["p95_budget_ms"]
    out["throughput_ok"] = out["bulk_throughput_loss"] is not None and out["bulk_throughput_loss"] <= THROUGHPUT_LOSS_TARGET
    out["valid"] = out["bulk_running_when_probes_ended"]

    timeout_s = max(600.0, 10 * args.load_bulk_images / max(rate_without, 0.5))
    await wait_all([bulk], session.worker, timeout_s, "bulk-load")
    out["bulk_seconds"] = round(bulk.last_at - bulk_started, 2)
    out["bulk_images_per_s_overall"] = round(args.load_bulk_images / (bulk.last_at - bulk_started), 2)
    out["bulk_image_errors"] = bulk.image_errors

    out["fairness"] = await two_bulk_requests(session, rate_without)
    out["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


async def two_bulk_requests(session: Any, rate: float) -> dict[str, Any]:
    """Two equal bulk requests produced together; when each one's last part arrives."""
    args, urls = session.args, session.urls
    n = args.fair_images
    topic = session.topics["CLS_ANNOTATION_REQUESTS_TOPIC"]
    entries = {}
    t0 = time.monotonic()
    deliveries = []
    for name, offset in (("fair-a", 0), ("fair-b", n)):
        entries[name] = session.collector.expect(name)
        images = [(f"{name}-{i}", urls[(offset + i) % len(urls)]) for i in range(n)]
        deliveries.append(await session.producer.send(topic, request_body(name, images, session.classes),
                                                      key=name.encode()))
    await asyncio.wait_for(asyncio.gather(*deliveries), 60)
    await wait_all(list(entries.values()), session.worker, max(600.0, 20 * n / max(rate, 0.5)), "two bulk requests")
    finished = {name: round(e.last_at - t0, 2) for name, e in entries.items()}
    first, last = min(finished.values()), max(finished.values())
    return {"images_each": n, "finished_s": finished, "ratio": round(last / first, 3),
            "ok": last / first <= FAIRNESS_TARGET}
