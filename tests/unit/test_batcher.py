"""The micro-batcher: batches across requests, bounded size, errors to every waiter, reloaded models."""

from __future__ import annotations

import asyncio

import pytest
import torch

from handlers.batcher import MicroBatcher
from handlers.executor import Executors


@pytest.fixture
async def batcher():
    executors = Executors(cpu_workers=1)
    b = MicroBatcher(executors, max_batch=4, max_wait_ms=50)
    yield b
    await b.close()
    executors.shutdown()


async def test_batches_across_requests_up_to_max_batch(batcher):
    sizes: list[int] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        return x * 2

    rows = [torch.full((3,), float(i)) for i in range(6)]
    out = await asyncio.gather(*(batcher.submit("m", forward, r, f"req-{i % 2}") for i, r in enumerate(rows)))
    assert [o[0].item() for o in out] == [2.0 * i for i in range(6)]
    assert max(sizes) <= 4 and sum(sizes) == 6
    assert batcher.stats.multi_request_batches >= 1
    assert batcher.forget("req-0") >= 1 and batcher.forget("req-0") == 0


async def test_a_failing_forward_fails_every_waiter(batcher):
    def forward(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    results = await asyncio.gather(*(batcher.submit("bad", forward, torch.zeros(2), "r") for _ in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_a_reloaded_model_gets_a_new_lane(batcher):
    old = await batcher.submit("k", lambda x: x + 1, torch.zeros(1), "r")
    new = await batcher.submit("k", lambda x: x + 10, torch.zeros(1), "r")  # same key, new model instance
    assert old.item() == 1 and new.item() == 10
    batcher.drop("k")
    assert await batcher.submit("k", lambda x: x + 100, torch.zeros(1), "r") == 100
