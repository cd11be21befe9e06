"""The workers as processes on a test run's topics (``testkit.kafka.topic_env``), with settings that need no
model hub and stay small: ``cls-worker annotation`` (tiny CLIP / SigLIP with random weights), ``cls-worker
training`` (CPU), the echo worker (the real consumer runtime with a trivial handler) and ``cls-worker send``;
``assert_no_lag`` waits until a group has committed a topic's end."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from testkit.kafka import committed_offsets, end_offsets, topic_env
from testkit.local import REPO, WorkerProcess

ANNOTATION_WORKER_ENV = {
    "CLS_CLIP_VARIANT": "cls-tiny-clip",
    "CLS_CLIP_WEIGHTS": "random",
    "CLS_SIGLIP_VARIANT": "cls-tiny-siglip",
    "CLS_SIGLIP_WEIGHTS": "random",
    "CLS_PRELOAD_MODELS": "clip",
    "CLS_DEFAULT_PROMPT_TEMPLATES": "a photo of a {}.",
    "CLS_ALLOW_PRIVATE_NETWORKS": "true",
    "CLS_FETCH_READ_TIMEOUT_S": "1",
    "CLS_FETCH_TOTAL_TIMEOUT_S": "8",
    "CLS_FETCH_MAX_BYTES": str(4 * 1024 * 1024),
    "CLS_TORCH_THREADS": "1",
    "CLS_LOG_FORMAT": "json",
}


def training_worker_env(tmp: Path, name: str) -> dict[str, str]:
    """A training worker's settings: its own work directory under ``tmp``, the image cache shared by the run."""
    return {
        "CLS_TRAINING_WORK_DIR": str(tmp / f"work-{name}"),
        "CLS_DATASET_CACHE_DIR": str(tmp.parent / "shared-image-cache"),
        "CLS_ALLOW_PRIVATE_NETWORKS": "true",
        "CLS_FETCH_CONNECT_TIMEOUT_S": "1",
        "CLS_TORCH_THREADS": "2",
        "CLS_DEVICE": "cpu",
        "CLS_LOG_FORMAT": "json",
        "CLS_DRAIN_TIMEOUT_S": "60",
    }


def start_annotation_worker(tmp_path: Path, prefix: str, name: str = "annotation", **env: str) -> WorkerProcess:
    return WorkerProcess("consumers.cli", ["annotation"], {**topic_env(prefix), **ANNOTATION_WORKER_ENV, **env},
                         tmp_path / f"{name}.log")


def start_training_worker(tmp_path: Path, prefix: str, name: str = "training", args: list[str] | None = None,
                          **env: str) -> WorkerProcess:
    return WorkerProcess("consumers.cli", ["training", *(args or [])],
                         {**topic_env(prefix), **training_worker_env(tmp_path, name), **env}, tmp_path / f"{name}.log")


def start_echo(tmp_path: Path, prefix: str, name: str = "worker", **env: str) -> WorkerProcess:
    """The echo worker (``testkit.echo_worker``) on the run's topics."""
    # a killed worker holds its partitions until its session times out: 6 s instead of 30 s
    full_env = {**topic_env(prefix), "CLS_LOG_LEVEL": "DEBUG", "CLS_RETRY_BACKOFF_S": "0.05",
                "CLS_SESSION_TIMEOUT_MS": "6000", "CLS_HEARTBEAT_INTERVAL_MS": "500", **env}
    return WorkerProcess("testkit.echo_worker", [], full_env, tmp_path / f"{name}.log")


def annotation_request(request_id: str | None = None, n_images: int = 2) -> dict:
    """A classify request for the echo worker (its URLs are never fetched)."""
    body = {
        "task": "classify",
        "model": "clip",
        "images": [{"id": f"img-{i}", "url": f"https://example.com/{i}.jpg"} for i in range(n_images)],
        "classes": ["cat", "dog", "bird"],
        "top_k": 3,
        "threshold": 0.1,
    }
    if request_id:
        body["request_id"] = request_id
    return body


async def assert_no_lag(bootstrap: str, group: str, topic: str) -> None:
    """Wait (10 s at most) until ``group`` has committed the end of every non-empty partition of ``topic``."""
    ends = await end_offsets(bootstrap, topic)
    for _ in range(50):
        committed = await committed_offsets(bootstrap, group)
        if all(committed.get(tp, 0) == end for tp, end in ends.items() if end > 0):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"lag left: committed={committed} end={ends}")


def send(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``cls-worker send <args>`` with ``env`` added to this process's environment."""
    return subprocess.run([sys.executable, "-m", "consumers.cli", "send", *args], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


PEAK_RSS_LIMIT = 2.5 * 1024**3
"""A worker's peak resident memory under hostile inputs stays below this."""


def peak_rss_bytes(pid: int, field: str = "VmHWM") -> int:
    """A live process's peak (``VmHWM``) or current (``VmRSS``) resident memory, from /proc."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


def statuses_of(records: Any, job_id: str) -> list[dict]:
    """The status events of one training job among records of the status topic, in order."""
    return [r.json() for r in records if r.key == job_id.encode()]


def final(events: list[dict]) -> bool:
    """Whether a job's events include a terminal one."""
    return any(e["status"] in ("completed", "failed", "cancelled") for e in events)
