"""handlers.parts.parts_in_order: parts in order, one part ahead, nothing left running when it ends early."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from handlers.parts import parts_in_order


async def test_parts_in_order_one_part_ahead():
    started: list[int] = []
    gates = {k: asyncio.Event() for k in range(3)}

    async def handle(item: int) -> int:
        started.append(item)
        await gates[item // 10].wait()
        return item * 2

    parts = [[0, 1], [10, 11], [20]]
    seen = []
    async with aclosing(parts_in_order(parts, handle)) as stream:
        consumer = stream.__aiter__()
        first = asyncio.ensure_future(consumer.__anext__())
        await asyncio.sleep(0.01)
        assert sorted(started) == [0, 1, 10, 11]  # part 1 started while part 0 is awaited; part 2 not yet
        gates[0].set()
        seen.append(await first)
        gates[1].set()
        gates[2].set()
        async for item in consumer:
            seen.append(item)
    assert seen == [(0, [0, 1], [0, 2]), (1, [10, 11], [20, 22]), (2, [20], [40])]


async def test_early_close_and_failure_cancel_every_pending_task():
    tasks: list[asyncio.Task] = []

    async def handle(item: int) -> int:
        tasks.append(asyncio.current_task())
        if item == 1:
            raise ValueError("bad image")
        await asyncio.sleep(3600)  # bounded by the cancellation the test asserts
        return item

    with pytest.raises(ValueError, match="bad image"):
        async with aclosing(parts_in_order([[0, 1], [2, 3]], handle)) as stream:
            async for _ in stream:
                pass
    await asyncio.sleep(0)
    assert len(tasks) == 4 and all(t.done() for t in tasks)
    assert sum(t.cancelled() for t in tasks) == 3

    tasks.clear()

    async def slow_tail(item: int) -> int:
        tasks.append(asyncio.current_task())
        if item >= 10:
            await asyncio.sleep(3600)
        return item

    async with aclosing(parts_in_order([[0], [10, 11]], slow_tail)) as stream:
        async for k, _, outputs in stream:
            assert (k, outputs) == (0, [0])
            break  # the consumer stops early: part 1 is still running
    await asyncio.sleep(0)
    assert len(tasks) == 3 and all(t.done() for t in tasks) and sum(t.cancelled() for t in tasks) == 2
