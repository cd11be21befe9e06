"""Shared by the benchmarks: percentiles, CPU accounting per process (and waiting for a quiet machine on a
shared one), timed loops, the worker's metrics, and a reader of the results topic that completes one future
per request."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from testkit.local import WorkerProcess


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


_TICK = os.sysconf("SC_CLK_TCK")


def _machine_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    busy = sum(parts[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy, busy + idle


def _proc_cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def _thread_cpu_s(pid: int, tid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


class CpuProbe:
    """CPU seconds of named processes (and the whole machine) between ``start`` and ``stop``."""

    def __init__(self, pids: dict[str, int], main_thread_of: str | None = None) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid}
        self.main_thread_of = main_thread_of  # also split this process: main thread vs the others

    def _snap(self) -> dict[str, float]:
        snap: dict[str, float] = {}
        for name, pid in self.pids.items():
            value = _proc_cpu_s(pid)
            if value is not None:
                snap[name] = value
        if self.main_thread_of and self.main_thread_of in self.pids:
            pid = self.pids[self.main_thread_of]
            value = _thread_cpu_s(pid, pid)
            if value is not None:
                snap[f"{self.main_thread_of}.main_thread"] = value
        busy, total = _machine_jiffies()
        snap["_busy"], snap["_total"] = busy / _TICK, total / _TICK
        snap["_wall"] = time.monotonic()
        return snap

    def start(self) -> None:
        self._a = self._snap()

    def stop(self) -> dict[str, Any]:
        b = self._snap()
        a = self._a
        wall = b["_wall"] - a["_wall"]
        ncpu = os.cpu_count() or 1
        out: dict[str, Any] = {"wall_s": round(wall, 3)}
        for name in b:
            if name.startswith("_") or name not in a:
                continue
            out[f"{name}_cpu_s"] = round(b[name] - a[name], 2)
        total = b["_total"] - a["_total"]
        out["machine_busy_cores"] = round(ncpu * (b["_busy"] - a["_busy"]) / total, 2) if total > 0 else None
        ours = sum(v for k, v in out.items() if k.endswith("_cpu_s") and ".main_thread" not in k)
        out["ours_cores"] = round(ours / wall, 2) if wall > 0 else None
        if out["machine_busy_cores"] is not None and out["ours_cores"] is not None:
            out["others_cores"] = round(max(0.0, out["machine_busy_cores"] - out["ours_cores"]), 2)
        return out


_WAIT_BUDGET = {"left_s": 600.0}  # all waits of one run together (--wait-budget)


def set_wait_budget(seconds: float) -> None:
    """How long all ``wait_quiet`` calls of this run may wait together."""
    _WAIT_BUDGET["left_s"] = seconds


def wait_quiet(pids: dict[str, int], max_wait_s: float, cores: float) -> dict[str, Any]:
    """Wait (bounded) until processes other than ours use less than ``cores`` over a 1 s window."""
    max_wait_s = min(max_wait_s, _WAIT_BUDGET["left_s"])
    if max_wait_s <= 0:
        return {}
    started = time.monotonic()
    others = None
    while True:
        probe = CpuProbe(pids)
        probe.start()
        time.sleep(1.0)
        others = probe.stop().get("others_cores")
        waited = time.monotonic() - started
        if others is None or others < cores or waited >= max_wait_s:
            _WAIT_BUDGET["left_s"] -= waited
            return {"waited_s": round(waited, 1), "others_cores_at_start": others}


def undisturbed(measure, args: argparse.Namespace, pids: dict[str, int]) -> dict[str, Any]:
    """Run ``measure()`` after waiting for a quiet machine; again (``--retries``) while other processes used more
    than ``--disturbed-cores`` during it. The fastest attempt counts: other load only ever slows one down."""
    attempts = []
    for _ in range(1 + args.retries):
        quiet = wait_quiet(pids, args.wait_quiet, args.quiet_cores)
        attempts.append({**measure(), **quiet})
        others = attempts[-1].get("others_cores")
        if others is None or others <= args.disturbed_cores:
            break
    best = max(attempts, key=lambda a: a["images_per_s"])
    return {**best, "attempts": len(attempts), "attempt_rates": [a["images_per_s"] for a in attempts],
            "attempt_others_cores": [a.get("others_cores") for a in attempts]}


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def timed_rate(fn, items: list, budget_s: float = 120.0) -> tuple[float, int, float]:
    """Call ``fn(item)`` for every item (stop after ``budget_s``); returns (items/s, items done, seconds)."""
    started = time.perf_counter()
    done = 0
    for item in items:
        fn(item)
        done += 1
        if time.perf_counter() - started > budget_s:
            break
    elapsed = time.perf_counter() - started
    return done / elapsed, done, elapsed


def scrape_metrics(port: int | None) -> dict[str, float]:
    """The worker's Prometheus samples (``name{labels}`` -> value); empty when the port does not answer."""
    if not port:
        return {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("cls_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


@dataclass
class Expected:
    future: asyncio.Future
    parts: int | None = None
    seen: set = field(default_factory=set)
    last_at: float = 0.0
    images: int = 0
    image_errors: int = 0
    status: str = "completed"
    prompt_set: str | None = None  # the result's model.prompt_set (which templates made the class embeddings)


class ResultCollector:
    """Reads the results topic (no group) and completes one future per request when all its parts are in."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.expected: dict[str, Expected] = {}
        self.stray = 0

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        from consumers.topics_admin import topic_partitions

        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                                         auto_offset_reset="earliest", fetch_max_wait_ms=50)
        await self.consumer.start()
        tps = await topic_partitions(self.consumer, self.topic, 60)
        if not tps:
            raise RuntimeError(f"topic {self.topic} does not exist")
        self.consumer.assign(tps)
        await self.consumer.seek_to_beginning(*tps)
        self.task = asyncio.create_task(self._loop())

    def expect(self, request_id: str) -> Expected:
        entry = Expected(asyncio.get_running_loop().create_future())
        self.expected[request_id] = entry
        return entry

    async def _loop(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=100)
            now = time.monotonic()
            for records in batches.values():
                for record in records:
                    self._record(record, now)

    def _record(self, record: Any, now: float) -> None:
        rid = record.key.decode() if record.key else ""
        entry = self.expected.get(rid)
        if entry is None or entry.future.done():
            self.stray += 1
            return
        value = json.loads(record.value)
        entry.last_at = now
        if value.get("status") != "completed":
            entry.status = value.get("status", "?")
            entry.future.set_exception(RuntimeError(f"request {rid} {entry.status}: {value.get('error')}"))
            return
        entry.parts = value.get("parts") or 1
        entry.prompt_set = (value.get("model") or {}).get("prompt_set")
        entry.seen.add(value.get("part") or 0)
        for result in value.get("results", []):
            entry.images += 1
            if result.get("error"):
                entry.image_errors += 1
        if len(entry.seen) >= entry.parts:
            entry.future.set_result(entry.last_at)

    async def stop(self) -> None:
        task = getattr(self, "task", None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        consumer = getattr(self, "consumer", None)
        if consumer is not None:
            await consumer.stop()


async def wait_all(entries: list[Expected], worker: WorkerProcess, timeout_s: float, what: str) -> None:
    """Wait for every entry's future, checking that the worker is alive; bounded by ``timeout_s``."""
    pending = {e.future for e in entries if not e.future.done()}
    deadline = time.monotonic() + timeout_s
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {len(pending)} of {len(entries)} requests unanswered after {timeout_s:.0f}s\n"
                               f"worker log tail:\n{worker.log_tail(2000)}")
        if not worker.alive():
            raise RuntimeError(f"{what}: worker exited ({worker.proc.returncode}):\n{worker.log_tail()}")
        done, pending = await asyncio.wait(pending, timeout=1.0)
        for fut in done:
            fut.result()  # raises for a failed request


def request_body(request_id: str, images: list[tuple[str, str]], classes: list[str],
                 priority: str | None = None) -> bytes:
    body: dict[str, Any] = {"task": "classify", "request_id": request_id, "model": "clip",
                            "images": [{"id": i, "url": u} for i, u in images], "classes": classes,
                            "top_k": min(3, len(classes)), "threshold": 0.0}
    if priority:
        body["priority"] = priority
    return json.dumps(body).encode()
