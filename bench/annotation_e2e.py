"""The annotation benchmark through Kafka: a broker and one worker from ``testkit.local``, a warm-up request,
the idle latency of one-image requests, then (b) throughput rounds (taking turns with the in-process (a) and
(c)) and the latency-under-load scenario (``bench/annotation_load.py``), all against the same worker."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.annotation_model import InProcess
from bench.common import CpuProbe, Expected, ResultCollector, percentile, request_body, scrape_metrics, wait_all, wait_quiet
from testkit.images import ImageServerProcess
from testkit.kafka import settings_for, topic_env
from testkit.local import LocalBroker, WorkerProcess, free_port, worker_env


@dataclass
class Session:
    """One worker, its topics, a producer and a reader of the results topic: what every scenario sends with."""

    args: argparse.Namespace
    producer: Any
    collector: ResultCollector
    worker: WorkerProcess
    topics: dict[str, str]
    urls: list[str]
    classes: list[str]
    cpu_pids: dict[str, int]
    metrics_port: int

    async def send(self, request_id: str, images: list[tuple[str, str]], interactive: bool = False,
                   priority: str | None = None) -> tuple[Expected, float]:
        """Produce one request (to the interactive topic when ``interactive``); returns its entry and the time
        the produce started."""
        topic = self.topics["CLS_ANNOTATION_INTERACTIVE_TOPIC" if interactive else "CLS_ANNOTATION_REQUESTS_TOPIC"]
        entry = self.collector.expect(request_id)
        started = time.monotonic()
        await self.producer.send_and_wait(topic, request_body(request_id, images, self.classes, priority),
                                          key=request_id.encode())
        return entry, started

    async def one(self, request_id: str, images: list[tuple[str, str]], timeout_s: float,
                  interactive: bool = False) -> float:
        """Send one request and wait for all its parts; returns the seconds from produce to the last part."""
        entry, started = await self.send(request_id, images, interactive)
        await wait_all([entry], self.worker, timeout_s, request_id)
        return entry.last_at - started

    def metrics(self) -> dict[str, float]:
        return scrape_metrics(self.metrics_port)


async def e2e_phase(session: Session, inproc: InProcess, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    args, urls = session.args, session.urls
    out: dict[str, Any] = {}
    # warm-up: the worker's text pass (cache miss) and a first full batch
    warm = [(f"warm-{i}", urls[i % len(urls)]) for i in range(args.request_size)]
    out["first_request_s"] = round(await session.one("warm-0", warm, 900), 3)

    # idle latency: sequential single-image requests
    latencies = []
    for i in range(args.latency_requests):
        latencies.append(await session.one(f"lat-{i}", [(f"lat-{i}", urls[i % len(urls)])], 120))
    out["latency_ms"] = {"p50": round(1000 * percentile(latencies, 0.5), 1),
                         "p95": round(1000 * percentile(latencies, 0.95), 1),
                         "max": round(1000 * max(latencies), 1) if latencies else None, "n": len(latencies)}

    for r in range(args.rounds if "throughput" in args.scenarios else 0):
        # (a) and (c) in this process (the worker idles), then (b): rounds alternate so that load from
        # other processes on a shared machine hits all three
        this: dict[str, Any] = {}
        sizes = args.batch_sizes if r == 0 else inproc.focus_sizes(rounds[0]["model"])
        this["model"] = await asyncio.to_thread(inproc.model_round, sizes)
        this["baseline"] = await asyncio.to_thread(inproc.baseline_round)
        model_rate = max(x["model"]["best_images_per_s"] for x in [*rounds, this])
        attempts = []
        for attempt in range(1 + args.retries):
            attempts.append(await throughput_round(session, f"{r}a{attempt}", model_rate))
            others = attempts[-1]["others_cores"]
            if others is None or others <= args.disturbed_cores:
                break
            print(f"  (b) disturbed: other processes used {others} cores; again", flush=True)
        best = max(attempts, key=lambda a: a["images_per_s"])
        this["e2e"] = {**best, "attempts": len(attempts), "attempt_rates": [a["images_per_s"] for a in attempts],
                       "attempt_others_cores": [a["others_cores"] for a in attempts]}
        rounds.append(this)
        best_model = this["model"]["by_batch"][str(this["model"]["best_batch"])]
        print(f"  round {r + 1}: (a) {best_model['images_per_s']}/s [others {best_model['others_cores']} cores]  "
              f"(c) {this['baseline']['images_per_s']}/s [others {this['baseline']['others_cores']}]  "
              f"(b) {this['e2e']['images_per_s']}/s [others {this['e2e']['others_cores']}]", flush=True)

    if "text" in args.scenarios:
        from bench.annotation_text import text_scenario

        print("text pass: a first interactive request with 5 new classes, the next one, a first bulk one ...",
              flush=True)
        out["text"] = await text_scenario(session)

    if "load" in args.scenarios:
        from bench.annotation_load import load_scenario

        print("latency under load: idle probes, a bulk request with and without probes, two bulk requests ...",
              flush=True)
        out["load"] = await load_scenario(session)
    out["stray_records"] = session.collector.stray
    return out


async def throughput_round(session: Session, r: str, model_rate: float) -> dict[str, Any]:
    """(b): all N images as requests of ``request_size``, produced as fast as possible."""
    args, urls = session.args, session.urls
    requests_topic = session.topics["CLS_ANNOTATION_REQUESTS_TOPIC"]
    chunks = [list(range(i, min(i + args.request_size, len(urls)))) for i in range(0, len(urls), args.request_size)]
    timeout_s = args.e2e_timeout or max(300.0, 10 * len(urls) / max(model_rate, 0.5))
    quiet = await asyncio.to_thread(wait_quiet, session.cpu_pids, args.wait_quiet, args.quiet_cores)
    before = session.metrics()
    probe = CpuProbe(session.cpu_pids, main_thread_of="worker")
    ids = [f"tp{r}-{k}" for k in range(len(chunks))]
    entries = [session.collector.expect(rid) for rid in ids]
    probe.start()
    t0 = time.monotonic()
    deliveries = []
    for rid, chunk in zip(ids, chunks, strict=True):
        body = request_body(rid, [(f"{rid}-{i}", urls[i]) for i in chunk], session.classes)
        deliveries.append(await session.producer.send(requests_topic, body, key=rid.encode()))
    await asyncio.wait_for(asyncio.gather(*deliveries), 60)
    produced_s = time.monotonic() - t0
    await wait_all(entries, session.worker, timeout_s, f"throughput {r}")
    t_last = max(e.last_at for e in entries)
    cpu = probe.stop()
    after = session.metrics()
    elapsed = t_last - t0
    batches = after.get("cls_batch_images_count", 0) - before.get("cls_batch_images_count", 0)
    batch_images = after.get("cls_batch_images_sum", 0) - before.get("cls_batch_images_sum", 0)
    batch_requests = after.get("cls_batch_requests_sum", 0) - before.get("cls_batch_requests_sum", 0)
    done_at = sorted(e.last_at - t0 for e in entries)
    return {
        "images_per_s": round(len(urls) / elapsed, 2), "seconds": round(elapsed, 2), "requests": len(chunks),
        "request_size": args.request_size, "images_returned": sum(e.images for e in entries),
        "image_errors": sum(e.image_errors for e in entries), "produce_s": round(produced_s, 3),
        "first_request_done_s": round(done_at[0], 2), "median_request_done_s": round(percentile(done_at, 0.5), 2),
        "batches": int(batches), "mean_batch": round(batch_images / batches, 2) if batches else None,
        "mean_requests_per_batch": round(batch_requests / batches, 2) if batches else None,
        "cpu": cpu, "others_cores": cpu.get("others_cores"), **quiet,
    }


async def _session_run(args: argparse.Namespace, bootstrap: str, topics: dict[str, str], worker: WorkerProcess,
                       urls: list[str], classes: list[str], cpu_pids: dict[str, int], metrics_port: int,
                       inproc: InProcess, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    from aiokafka import AIOKafkaProducer

    collector = ResultCollector(bootstrap, topics["CLS_ANNOTATION_RESULTS_TOPIC"])
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await collector.start()
    await producer.start()
    try:
        session = Session(args, producer, collector, worker, topics, urls, classes, cpu_pids, metrics_port)
        return await e2e_phase(session, inproc, rounds)
    finally:
        await producer.stop()
        await collector.stop()


def run_e2e(args: argparse.Namespace, workdir: Path, urls: list[str], classes: list[str], templates: list[str],
            server: ImageServerProcess, inproc: InProcess, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    from consumers.topics_admin import create_topics

    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker = None if external else LocalBroker(workdir / "kafka")
    worker: WorkerProcess | None = None
    out: dict[str, Any] = {}
    try:
        started = time.monotonic()
        bootstrap = external or broker.start(timeout_s=240)
        out["broker"] = "external" if external else "kafka.sh"
        out["broker_start_s"] = round(time.monotonic() - started, 1)
        prefix = f"bench{int(time.time())}x{os.getpid()}"
        topics = topic_env(prefix)
        asyncio.run(asyncio.wait_for(create_topics(settings_for(prefix, bootstrap)), 120))

        metrics_port = free_port()
        env = {
            **topics,
            **worker_env(bootstrap, workdir),
            "CLS_CLIP_VARIANT": args.variant,
            "CLS_CLIP_WEIGHTS": args.weights,
            "CLS_PRELOAD_MODELS": "clip",
            "CLS_TORCH_THREADS": str(args.threads),
            "CLS_BATCH_SIZE": str(args.worker_batch_size),
            "CLS_BATCH_WAIT_MS": str(args.worker_batch_wait_ms),
            "CLS_DEFAULT_PROMPT_TEMPLATES": "|".join(templates),
            "CLS_SEED": str(args.seed),
            "CLS_METRICS_PORT": str(metrics_port),
            "CLS_METRICS_HOST": "127.0.0.1",
            # the bench sends the same images again (rounds, the 2,000-image bulk request): measure the forwards,
            # not the image-embedding cache (--worker-env CLS_EMBEDDING_CACHE_MB=256 measures with it)
            "CLS_EMBEDDING_CACHE_MB": "0",
            # class text embeddings on disk: a fresh folder per run (the text scenario restarts the worker on it)
            "CLS_TEXT_CACHE_DIR": str(workdir / "text-cache"),
        }
        env.update(dict(item.split("=", 1) for item in args.worker_env))
        out["worker_env"] = {k: v for k, v in env.items() if k not in topics and k != "CLS_DEFAULT_PROMPT_TEMPLATES"}
        started = time.monotonic()
        worker = WorkerProcess.cli("annotation", env, workdir / "worker.log", die_with_parent=True)
        worker.wait_for_log_blocking("partitions_assigned", timeout_s=300)
        out["worker_ready_s"] = round(time.monotonic() - started, 1)
        loaded = worker.log_events("model_loaded")
        if loaded:
            out["worker_model_load_s"] = loaded[0].get("seconds")
        pids = {"worker": worker.pid, "image_server": server.pid, "bench": os.getpid(),
                "broker": broker.pid() if broker else None}
        inproc.cpu_pids = pids  # the idle worker and broker count as ours while (a) and (c) run
        out.update(asyncio.run(_session_run(args, bootstrap, topics, worker, urls, classes, pids, metrics_port,
                                            inproc, rounds)))
        memory = worker.memory()
        out["worker_peak_rss_bytes"] = memory.get("VmHWM")
        out["worker_rss_bytes"] = memory.get("VmRSS")
        summaries = [e for e in worker.log_events("annotation_summary") if str(e.get("request_id", "")).startswith("tp")]
        if summaries:
            out["worker_request_seconds_p50"] = round(statistics.median(float(e["seconds"]) for e in summaries), 2)
        handled = [float(e["seconds"]) for e in worker.log_events("annotation_summary")
                   if str(e.get("request_id", "")).startswith("lat-")]
        if handled:  # the handler's own time for the 1-image requests: the rest of the latency is Kafka
            out["latency_ms"]["handler_p50"] = round(1000 * statistics.median(handled), 1)
        out["worker_text_cache_misses"] = sum(1 for e in worker.log_events("annotation_summary")
                                              if e.get("text_cache") == "miss")
        if "text" in args.scenarios:
            from bench.annotation_text import restart_row

            print("text pass: a restarted worker with a warm disk cache ...", flush=True)
            old = worker
            worker = None  # stopped by restart_row; the restarted one is stopped there too
            out["text"]["restarted"] = restart_row(env, workdir, bootstrap, topics, urls[0], old.stop)
    except BaseException:
        if worker is not None:
            print(f"worker log tail:\n{worker.log_tail(3000)}", file=sys.stderr)
        raise
    finally:
        if worker is not None:
            worker.stop()
        if broker is not None:
            broker.stop()
    return out
