"""The micro-batcher: batches across requests, bounded size, errors to every waiter, reloaded models,
and model eviction: no stranded waiter, an evicted model is freed, the cache bound holds."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref

import pytest
import torch

from handlers.batcher import MicroBatcher
from handlers.executor import Executors
from handlers.models import ModelConfig, ModelKey, ModelRegistry
from testkit.configs import model_config


@pytest.fixture
async def batcher():
    executors = Executors(cpu_workers=1)
    b = MicroBatcher(executors, max_batch=4, max_wait_ms=50, active_batch=4)  # the scheduling rules alone
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


async def test_a_reloaded_model_gets_the_next_batches_and_idle_lanes_end(batcher):
    old = await batcher.submit("k", lambda x: x + 1, torch.zeros(1), "r")
    new = await batcher.submit("k", lambda x: x + 10, torch.zeros(1), "r")  # same key, new model instance
    assert old.item() == 1 and new.item() == 10
    await asyncio.sleep(0)
    assert batcher.lanes() == 0  # nothing queued: no lane, so no lane holds a model


async def test_queued_images_go_to_the_reloaded_model_and_a_running_batch_finishes(batcher):
    started, release = threading.Event(), threading.Event()
    ran: list[tuple[str, int]] = []

    def old_forward(x: torch.Tensor) -> torch.Tensor:
        started.set()
        assert release.wait(10)
        ran.append(("old", x.shape[0]))
        return x + 1

    def new_forward(x: torch.Tensor) -> torch.Tensor:
        ran.append(("new", x.shape[0]))
        return x + 10

    running = [asyncio.create_task(batcher.submit("k", old_forward, torch.zeros(1), "a")) for _ in range(4)]
    assert await asyncio.to_thread(started.wait, 10)  # the first batch (4 images) runs on the old model
    queued = [asyncio.create_task(batcher.submit("k", old_forward, torch.zeros(1), "a")) for _ in range(2)]
    await asyncio.sleep(0)
    reloaded = asyncio.create_task(batcher.submit("k", new_forward, torch.zeros(1), "b"))  # evicted, reloaded
    await asyncio.sleep(0)
    release.set()
    done = await asyncio.wait_for(asyncio.gather(*running, *queued, reloaded), 10)
    assert [t.item() for t in done] == [1.0] * 4 + [10.0] * 3
    assert ran == [("old", 4), ("new", 3)]


def _tiny_config(tmp_path) -> ModelConfig:
    return model_config(clip_variant="cls-tiny-clip", clip_weights="random", siglip_variant="cls-tiny-siglip",
                       siglip_weights="random", device="cpu", cache_size=1, model_dir=str(tmp_path))


async def test_eviction_while_a_batch_runs_strands_no_waiter_and_frees_the_model(tmp_path):
    """Cache of one model: loading another evicts the first while its lane has a batch running and images
    queued. Every waiter gets its row; afterwards (request done) the evicted model is garbage, and a late
    submit for the evicted model does not keep it alive."""
    executors = Executors(cpu_workers=1)
    batcher = MicroBatcher(executors, max_batch=4, max_wait_ms=20)
    registry = ModelRegistry(_tiny_config(tmp_path), executors, store=None)
    clip_key = ModelKey("clip", "cls-tiny-clip", "random")
    siglip_key = ModelKey("siglip", "cls-tiny-siglip", "random")
    try:
        clip = await registry.get(clip_key)
        clip_ref = weakref.ref(clip.model)
        pixels = [clip.preprocess(_image(i)) for i in range(8)]  # two full batches
        gate = threading.Event()
        blocker = asyncio.ensure_future(executors.on_gpu(gate.wait, 10))  # hold the GPU thread
        waiters = [asyncio.create_task(batcher.submit(clip_key, clip.forward, p, "req-a")) for p in pixels]
        await asyncio.sleep(0.1)  # batch 1 is gathered and waits for the GPU thread; batch 2's images are queued
        loading = asyncio.create_task(registry.get(siglip_key))  # its load queues behind the batch on the GPU
        await asyncio.sleep(0.05)
        gate.set()  # batch 1 runs, then the load; batch 2 waits behind the load, its queue empty at the eviction
        await blocker
        rows = await asyncio.wait_for(asyncio.gather(*waiters), 30)
        siglip = await asyncio.wait_for(loading, 60)
        assert registry.peek(clip_key) is None and registry.peek(siglip_key) is siglip  # evicted mid-request
        assert all(row.shape == rows[0].shape for row in rows) and len(rows) == 8
        # a late image of the request that still holds the evicted model: answered, and no lane keeps it
        late = await asyncio.wait_for(batcher.submit(clip_key, clip.forward, pixels[0], "req-a"), 60)
        assert torch.allclose(late, rows[0], atol=1e-5)
        await asyncio.sleep(0)
        assert batcher.lanes() == 0
        del clip, waiters, late
        gc.collect()
        assert clip_ref() is None, gc.get_referrers(clip_ref())
        live = [obj for obj in gc.get_objects() if type(obj).__name__ in ("ClipModel", "SiglipZeroShotModel")]
        assert len(live) <= registry.config.cache_size, live  # the cache bound holds for what is alive
    finally:
        await batcher.close()
        executors.shutdown()


def _image(seed: int):
    from PIL import Image

    return Image.new("RGB", (40 + seed, 30), (seed * 20 % 255, 100, 200))


async def test_interactive_images_first_and_bulk_requests_round_robin(batcher):
    """While a batch runs, bulk requests A and B queue 8 images each and an interactive request 2: the next
    batch holds the interactive images alone (a short forward, not a full bulk one), and A and B then
    alternate (the batcher's record of batches)."""
    gate = threading.Event()

    def forward(x: torch.Tensor) -> torch.Tensor:
        gate.wait(10)  # bounded: the test opens it
        return x

    first = asyncio.create_task(batcher.submit("m", forward, torch.zeros(1), "warm", "bulk"))
    for _ in range(100):  # the first batch is running (its forward waits on the gate)
        await asyncio.sleep(0.01)
        if batcher.stats.batches:
            break
    assert batcher.stats.batches == 1
    waiters = [asyncio.create_task(batcher.submit("m", forward, torch.zeros(1), rid, "bulk"))
               for _ in range(8) for rid in ("A",)]
    waiters += [asyncio.create_task(batcher.submit("m", forward, torch.zeros(1), "B", "bulk")) for _ in range(8)]
    await asyncio.sleep(0.01)
    waiters += [asyncio.create_task(batcher.submit("m", forward, torch.zeros(1), "I", "interactive")) for _ in range(2)]
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(first, *waiters)
    batches = list(batcher.stats.log)[1:]
    taken = [rid for batch in batches for rid, _ in batch]
    assert taken[:2] == ["I", "I"], batches  # interactive waited only for the running batch
    assert batches[0] == [("I", "interactive")] * 2, batches  # and no bulk image lengthens its forward
    assert taken[2:10] == ["A", "B"] * 4, batches  # bulk: round robin by request
    assert [len(b) for b in batches[1:]] == [4, 4, 4, 4], batches  # bulk batches full again
    assert sorted(taken) == sorted(["I"] * 2 + ["A"] * 8 + ["B"] * 8)


async def test_interactive_image_joins_a_bulk_batch_being_filled(batcher):
    """A bulk batch still gathering (its wait not over, not full) takes an interactive image that arrives:
    micro-batching is kept; and the interactive image goes first among what is waiting."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x

    bulk = asyncio.create_task(batcher.submit("m", forward, torch.zeros(1), "A", "bulk"))
    for _ in range(100):  # the lane took A and waits (max_wait_ms=50) for more
        await asyncio.sleep(0)
        if batcher.lanes() and batcher._lanes["m"].queue.empty():
            break
    interactive = asyncio.create_task(batcher.submit("m", forward, torch.zeros(1), "I", "interactive"))
    await asyncio.gather(bulk, interactive)
    assert list(batcher.stats.log) == [[("A", "bulk"), ("I", "interactive")]]


async def test_a_batch_opened_by_interactive_images_takes_interactive_ones_only(batcher):
    """Interactive images that waited behind a running batch go in a batch of their own; the bulk images
    queued with them wait for the next one (the batcher's record), even when the batch is not full."""
    gate = threading.Event()

    def forward(x: torch.Tensor) -> torch.Tensor:
        gate.wait(10)  # bounded: the test opens it
        return x

    first = asyncio.create_task(batcher.submit("m", forward, torch.zeros(1), "warm", "bulk"))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if batcher.stats.batches:
            break
    waiters = [asyncio.create_task(batcher.submit("m", forward, torch.zeros(1), "I", "interactive"))]
    waiters += [asyncio.create_task(batcher.submit("m", forward, torch.zeros(1), "A", "bulk")) for _ in range(3)]
    waiters.append(asyncio.create_task(batcher.submit("m", forward, torch.zeros(1), "J", "interactive")))
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(first, *waiters)
    batches = list(batcher.stats.log)[1:]
    assert batches == [[("I", "interactive"), ("J", "interactive")], [("A", "bulk")] * 3], batches


async def test_interactive_images_go_before_the_bulk_batch_staged_behind_the_running_one(batcher):
    """While a batch runs, the next bulk batch is already gathered and staged; an interactive image that arrives
    then still runs before it (the batcher's record): it waits for the running forward only."""
    gate = threading.Event()

    def forward(x: torch.Tensor) -> torch.Tensor:
        gate.wait(10)  # bounded: the test opens it
        return x

    waiters = [asyncio.create_task(batcher.submit("m", forward, torch.zeros(1), "A", "bulk")) for _ in range(8)]
    for _ in range(100):  # batch 1 (max_batch=4) runs; batch 2 is gathered and waits for it
        await asyncio.sleep(0.01)
        if batcher.stats.batches == 1 and batcher._lanes["m"].queue.empty():
            break
    assert batcher.stats.batches == 1 and batcher._lanes["m"].queue.empty()
    waiters.append(asyncio.create_task(batcher.submit("m", forward, torch.zeros(1), "I", "interactive")))
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(*waiters)
    assert list(batcher.stats.log) == [[("A", "bulk")] * 4, [("I", "interactive")], [("A", "bulk")] * 4]


async def test_an_interactive_request_scores_before_the_next_bulk_forward(batcher):
    """On the model thread, an interactive request's scoring (queued by its handler once its image is back, as
    ``AnnotationHandler`` does) runs right after its forward, before the bulk forward staged behind it: the
    order of the model thread's calls, not time."""
    gate = threading.Event()
    order: list[str] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        gate.wait(10)  # bounded: the test opens it
        order.append(f"forward {x.shape[0]}")
        return x

    async def interactive_request() -> None:  # the handler's shape: the image in a task, gathered, then scored
        await asyncio.gather(asyncio.create_task(batcher.submit("m", forward, torch.zeros(1), "I", "interactive")))
        await batcher.executors.on_gpu(order.append, "score I")

    waiters = [asyncio.create_task(batcher.submit("m", forward, torch.zeros(1), "A", "bulk")) for _ in range(8)]
    for _ in range(100):  # batch 1 (max_batch=4) runs; batch 2 is gathered and waits for it
        await asyncio.sleep(0.01)
        if batcher.stats.batches == 1 and batcher._lanes["m"].queue.empty():
            break
    waiters.append(asyncio.create_task(interactive_request()))
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(*waiters)
    assert order == ["forward 4", "forward 1", "score I", "forward 4"], order


async def test_bulk_batches_are_smaller_while_a_person_is_active_and_full_again_after():
    """While interactive images arrive (within active_s), bulk batches hold at most active_batch images, so the
    forward an interactive image may wait for is shorter; once nobody is active, bulk batches are full again."""
    executors = Executors(cpu_workers=1)
    b = MicroBatcher(executors, max_batch=4, max_wait_ms=20, active_batch=2, active_s=0.5)
    try:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return x

        async def bulk(tag: str) -> None:
            await asyncio.gather(*(b.submit("m", forward, torch.zeros(1), tag) for _ in range(8)))

        await bulk("before")
        await b.submit("m", forward, torch.zeros(1), "person", "interactive")
        assert b.person_active() and b.bulk_batch_limit() == 2
        await bulk("during")
        await asyncio.sleep(0.6)
        assert not b.person_active() and b.bulk_batch_limit() == 4
        await bulk("after")
        sizes = {tag: [len(batch) for batch in b.stats.log if batch[0][0] == tag] for tag in ("before", "during", "after")}
        assert sizes == {"before": [4, 4], "during": [2, 2, 2, 2], "after": [4, 4]}, sizes
        with pytest.raises(ValueError):
            MicroBatcher(executors, max_batch=4, max_wait_ms=20, active_s=-1)
    finally:
        await b.close()
        executors.shutdown()
