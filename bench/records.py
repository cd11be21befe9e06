"""Record throughput of the consumer runtime on a backlog of cheap records (invalid requests, the echo handler):
what a flood of small or bad records costs a worker, with the fetch wait at Kafka's default (500 ms, the
baseline) and at the worker's default (``CLS_FETCH_MAX_WAIT_MS``, 100 ms).

The backlog is skewed over three partitions (most records on one, as keyless producers make it): once a
partition is caught up, a fetch for it alone waits ``fetch_max_wait_ms`` at the broker, and partitions just
drained cannot be fetched until it returns. Both runs read the same records from offset 0 in their own group,
on a local broker started here (127.0.0.1).

    .venv/bin/python bench/records.py [--records 4000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import AIOKafkaProducer  # noqa: E402

from consumers.logging_setup import configure_logging  # noqa: E402
from consumers.runtime import ConsumerRuntime  # noqa: E402
from testkit.echo_worker import echo_pipeline  # noqa: E402
from testkit.kafka import provision, settings_for  # noqa: E402
from testkit.local import LocalBroker  # noqa: E402


def _body(rng: random.Random, i: int) -> bytes:
    kind = rng.randrange(3)
    if kind == 0:  # invalid: answered with a failed event
        return json.dumps({"task": "classify", "request_id": f"r-{i}", "images": [], "classes": []}).encode()
    if kind == 1:  # valid: the echo handler answers at once
        return json.dumps({"task": "classify", "model": "clip", "request_id": f"r-{i}", "classes": ["a", "b", "c"],
                           "images": [{"id": "x", "url": "https://example.com/x.jpg"}]}).encode()
    return b"\x00not json"  # dead-lettered


async def _fill(bootstrap: str, topic: str, n: int) -> None:
    rng = random.Random(7)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    await producer.start()
    try:
        futures = []
        for i in range(n):
            partition = 0 if rng.random() < 0.8 else rng.choice([1, 2])
            futures.append(await producer.send(topic, value=_body(rng, i), partition=partition))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _run(bootstrap: str, prefix: str, n: int, fetch_wait_ms: int) -> float:
    settings = settings_for(prefix, bootstrap, request_topic_partitions=3, max_in_flight=16,
                            interactive_max_in_flight=16, fetch_max_wait_ms=fetch_wait_ms)
    runtime = ConsumerRuntime(settings, echo_pipeline(settings), group_id=f"{prefix}-{uuid.uuid4().hex[:6]}",
                              max_records=n)
    started = time.perf_counter()
    await asyncio.wait_for(runtime.run(), timeout=600)
    elapsed = time.perf_counter() - started
    ended = sum(runtime.stats[k] for k in ("handled", "invalid", "failed", "dlq"))
    assert ended == n, runtime.stats
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    configure_logging("ERROR")  # every dead letter logs a warning
    broker = LocalBroker()
    bootstrap = broker.start()
    os.environ["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
    try:
        prefix = f"bench{uuid.uuid4().hex[:6]}"
        await provision(settings_for(prefix, bootstrap, request_topic_partitions=3))
        await _fill(bootstrap, settings_for(prefix, bootstrap).worker.annotation_requests_topic, args.records)
        times: dict[int, list[float]] = {500: [], 100: []}
        for _ in range(args.rounds):  # interleaved, so drift of the machine hits both
            for wait_ms in times:
                times[wait_ms].append(await _run(bootstrap, prefix, args.records, wait_ms))
        base, ours = min(times[500]), min(times[100])
        print(f"{args.records} records (1/3 invalid, 1/3 valid, 1/3 dead-lettered; 80% on one of 3 partitions), "
              f"16 + 16 in flight, best of {args.rounds}")
        print(f"  fetch_max_wait_ms 500 (Kafka default, baseline): {base:6.2f} s  {args.records / base:7.0f} records/s")
        print(f"  fetch_max_wait_ms 100 (CLS_FETCH_MAX_WAIT_MS):    {ours:6.2f} s  {args.records / ours:7.0f} records/s")
        print(f"  throughput ratio 100 / 500: x{base / ours:.2f}")
    finally:
        broker.stop()


if __name__ == "__main__":
    asyncio.run(main())
