"""The runtime's lane slots without a broker: a finished record hands its slot to the lane's next parked
record at once (not when the poll loop next comes round, which may be waiting up to poll_timeout_ms for
new records)."""

from __future__ import annotations

import asyncio

from aiokafka import ConsumerRecord, TopicPartition

from consumers.runtime import ConsumerRuntime, _Job
from testkit.echo_worker import echo_pipeline
from testkit.kafka import settings_for


def _record(tp: TopicPartition, offset: int) -> ConsumerRecord:
    return ConsumerRecord(topic=tp.topic, partition=tp.partition, offset=offset, timestamp=0, timestamp_type=0,
                          key=None, value=b"{}", checksum=None, serialized_key_size=0, serialized_value_size=2,
                          headers=())


async def test_a_finished_record_starts_the_lanes_next_parked_record_at_once():
    settings = settings_for("slots", "127.0.0.1:9", max_in_flight=1, interactive_max_in_flight=1, poll_timeout_ms=60_000)
    runtime = ConsumerRuntime(settings, echo_pipeline(settings), group_id="slots")
    release: dict[int, asyncio.Event] = {}
    started: list[int] = []

    async def run_job(job: _Job) -> None:  # stands in for handling: waits until the test releases it
        started.append(job.record.offset)
        release[job.record.offset] = asyncio.Event()
        await release[job.record.offset].wait()
        await runtime._finish(job, "handled", 0)

    runtime._run_job = run_job  # type: ignore[method-assign]
    tp = TopicPartition(settings.worker.annotation_requests_topic, 0)
    for offset in range(3):  # one slot in the bulk lane: the first runs, two are parked behind it
        runtime._start(tp, _record(tp, offset))
    await asyncio.sleep(0)
    assert started == [0]
    assert [job.record.offset for job in runtime._parked["bulk"]] == [1, 2]

    release[0].set()  # no poll loop runs here: only the finish can start the next one
    for _ in range(10):
        await asyncio.sleep(0)
    assert started == [0, 1]
    assert [job.record.offset for job in runtime._parked["bulk"]] == [2]
    assert runtime._offsets[tp].committable() == 1  # offset 0 done; 1 in flight, 2 pending

    runtime.stop()  # stopping: a freed slot is not handed on (the drain unparks what never started)
    release[1].set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert started == [0, 1]
    assert [job.record.offset for job in runtime._parked["bulk"]] == [2]
