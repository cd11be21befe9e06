"""Micro-batching of images from concurrent requests into one model forward.

Images are queued per model; a batch closes when it reaches ``max_batch`` images or ``max_wait_ms``
after its first image, and runs on the GPU thread while the next batch fills up (fetching and
decoding go on concurrently on the event loop and the CPU pool). The next batch is staged meanwhile on the
CPU pool (the model's ``stage``: stacked and, on CUDA, copied from pinned memory on a side stream), so its
host-to-device copy overlaps the running forward; the GPU thread only ever waits on CUDA events.

Scheduling: interactive images are taken first (a person waits for them); bulk images are taken round
robin by request, so a second bulk request is not stuck behind the first. A batch that starts with an
interactive image takes interactive images only, and interactive images that arrive while a batch runs go
before the bulk batch staged behind it: an interactive image waits at most for the forward already running
plus its own short one (not a full bulk forward or two: the p95 under load was idle + about two bulk
forwards). One that arrives while a bulk batch is being gathered joins it like any other image. A bulk
batch waits up to ``max_wait_ms`` for more images; an interactive one only until its first image has waited
that long (it waited behind the running batch already). While a person is active (an interactive image was
submitted in the last ``active_s`` seconds), bulk batches hold at most ``active_batch`` images (default three quarters of
``max_batch``): the forward an interactive image may wait for is shorter, for a small cost in bulk throughput
(measured on a 2-core CPU with ViT-B-32, 24 of 32: interactive p95 under load 2.06 s against 3.10 s with full
batches, bulk throughput within 3%; 16 of 32: p95 1.50 s but bulk images/s 14-26% lower); without
interactive traffic bulk batches are full.

A lane exists only while it has work: it ends when its queue is empty after a batch, and it is never
cancelled from outside, so every queued image gets its result or its error. A lane holds the forward
of the newest submit for its key: when a model is evicted and loaded again, the images still queued run
on the reloaded instance, and an evicted model is referenced by no idle lane (the cache bound holds).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch

from handlers.executor import Executors
from ml.device import stack_rows

log = structlog.get_logger("cls.batcher")


_CONTINUATION_STEPS = 8
"""Event-loop turns from an image's result to its request queueing its scoring on the model thread (the
waiter's task, the handler's gather, the handler; 3 today), with room to spare; they cost microseconds."""


@dataclass
class _Item:
    pixels: torch.Tensor
    request_id: str
    future: asyncio.Future[torch.Tensor]
    priority: str = "bulk"
    queued_at: float = field(default_factory=time.monotonic)


class _Schedule:
    """A lane's waiting images: interactive first (FIFO), then bulk round robin by request. With
    ``interactive_only`` the getters see the interactive images alone."""

    def __init__(self) -> None:
        self.interactive: collections.deque[_Item] = collections.deque()
        self.bulk: collections.OrderedDict[str, collections.deque[_Item]] = collections.OrderedDict()
        self._size = 0
        self._ready = asyncio.Event()
        self._interactive_ready = asyncio.Event()

    def put_nowait(self, item: _Item) -> None:
        if item.priority == "interactive":
            self.interactive.append(item)
            self._interactive_ready.set()
        else:
            self.bulk.setdefault(item.request_id, collections.deque()).append(item)
        self._size += 1
        self._ready.set()

    def empty(self, interactive_only: bool = False) -> bool:
        return not self.interactive if interactive_only else self._size == 0

    def get_nowait(self, interactive_only: bool = False) -> _Item:
        if self.interactive:
            item = self.interactive.popleft()
            if not self.interactive:
                self._interactive_ready.clear()
        elif interactive_only or not self.bulk:
            raise IndexError("no image waiting")
        else:
            request_id, queue = next(iter(self.bulk.items()))
            item = queue.popleft()
            del self.bulk[request_id]
            if queue:  # round robin: this request goes to the back
                self.bulk[request_id] = queue
        self._size -= 1
        if not self._size:
            self._ready.clear()
        return item

    async def get(self, interactive_only: bool = False) -> _Item:
        ready = self._interactive_ready if interactive_only else self._ready
        while self.empty(interactive_only):
            await ready.wait()
        return self.get_nowait(interactive_only)


@dataclass
class BatchStats:
    batches: int = 0
    images: int = 0
    multi_request_batches: int = 0
    # the last batches, each as the (request id, priority) of its images in the order they were taken
    log: collections.deque[list[tuple[str, str]]] = field(default_factory=lambda: collections.deque(maxlen=1000))
    # request id -> number of its batches that also carried images of other requests
    shared_batches: dict[str, int] = field(default_factory=dict)


class _Lane:
    """The queue and the batching loop of one model key; ends itself when its queue is empty."""

    def __init__(self, batcher: "MicroBatcher", key: Any, forward: Callable[[Any], torch.Tensor],
                 stage: Callable[[list[torch.Tensor]], Any] | None = None) -> None:
        self.batcher = batcher
        self.key = key
        self.forward: Callable[[Any], torch.Tensor] | None = forward
        self.stage = stage
        self.queue = _Schedule()
        self._interactive_done = False  # the batch that just ran held interactive images
        self.task = asyncio.create_task(self._loop(), name=f"batcher-{key}")

    async def _loop(self) -> None:
        running: asyncio.Task[None] | None = None  # the batch on the model thread while the next one is gathered
        try:
            while True:
                if self.queue.empty():
                    if running is None:
                        break
                    await self._finish(running)  # images may arrive meanwhile: look at the queue again
                    running = None
                    continue
                items = await self._gather()
                if not items:
                    continue
                # Stage this batch (stack; on CUDA its copy from pinned memory on a side stream) on the CPU pool
                # while the previous batch runs on the model thread; the model thread never waits for the loop.
                staged = asyncio.ensure_future(self._stage(items))
                if running is not None:
                    try:
                        await self._finish(running)
                        if items[0].priority != "interactive" and not self.queue.empty(interactive_only=True):
                            # interactive images came while the previous batch ran: they go before this bulk one
                            urgent = self._take_interactive()
                            running = asyncio.ensure_future(self._run(urgent, asyncio.ensure_future(self._stage(urgent))))
                            await self._finish(running)
                    except asyncio.CancelledError:
                        staged.cancel()
                        for item in items:
                            item.future.cancel()
                        raise
                running = asyncio.ensure_future(self._run(items, staged))
        finally:
            # No await between the empty check and here: a submit either saw this lane's queue before it
            # was emptied (and the loop took its image) or finds no lane and starts a new one.
            if running is not None and not running.done():  # only on close()
                running.cancel()
            if self.batcher._lanes.get(self.key) is self:
                del self.batcher._lanes[self.key]
            self.forward = None  # let the model go
            for item in _drain(self.queue):  # only on close(): cancelled with its waiter
                item.future.cancel()

    async def _finish(self, running: asyncio.Task[None]) -> None:
        """Wait for the running batch; after one with interactive images, let their requests go on first: their
        scoring is queued on the model thread before the next (bulk) forward, not a whole forward after it."""
        await running
        if self._interactive_done:
            self._interactive_done = False
            for _ in range(_CONTINUATION_STEPS):
                await asyncio.sleep(0)

    async def _gather(self) -> list[_Item]:
        """The next batch from the queue (not empty): up to ``max_batch`` images (``active_batch`` for a bulk batch
        while a person is active); a batch opened by an interactive image takes interactive images only, and waits
        for more only until that image has waited ``max_wait_ms``."""
        first = self.queue.get_nowait()
        items = [first]
        only = first.priority == "interactive"
        max_batch = self.batcher.max_batch if only else self.batcher.bulk_batch_limit()
        deadline = (first.queued_at if only else time.monotonic()) + self.batcher.max_wait_ms / 1000
        while len(items) < max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # take whatever is already queued without waiting
                while len(items) < max_batch and not self.queue.empty(only):
                    items.append(self.queue.get_nowait(only))
                break
            try:
                items.append(await asyncio.wait_for(self.queue.get(only), remaining))
            except TimeoutError:
                break
            except asyncio.CancelledError:  # close(): cancel the waiters of the batch being gathered
                for item in items:
                    item.future.cancel()
                raise
        return [item for item in items if not item.future.cancelled()]

    def _take_interactive(self) -> list[_Item]:
        """Every waiting interactive image (up to ``max_batch``): they waited for the running batch already."""
        items = []
        while len(items) < self.batcher.max_batch and not self.queue.empty(interactive_only=True):
            item = self.queue.get_nowait(interactive_only=True)
            if not item.future.cancelled():
                items.append(item)
        return items

    async def _stage(self, items: list[_Item]) -> Any:
        rows = [item.pixels for item in items]
        if self.stage is None:
            return rows  # stacked on the model thread by _stack_and_forward
        executors = self.batcher.executors
        run = executors.on_cpu_first if any(item.priority == "interactive" for item in items) else executors.on_cpu
        return await run(self.stage, rows)  # an interactive batch is not staged behind bulk decodes

    async def _run(self, items: list[_Item], staged: asyncio.Future[Any]) -> None:
        stats = self.batcher.stats
        requests = {item.request_id for item in items}
        stats.batches += 1
        stats.images += len(items)
        stats.log.append([(item.request_id, item.priority) for item in items])
        if len(requests) > 1:
            stats.multi_request_batches += 1
            for rid in requests:
                stats.shared_batches[rid] = stats.shared_batches.get(rid, 0) + 1
        self.batcher.observe(len(items), len(requests))
        forward = self.forward
        assert forward is not None
        lane = "interactive" if any(item.priority == "interactive" for item in items) else "bulk"
        try:
            outputs, seconds = await self.batcher.executors.on_gpu(_stack_and_forward, forward, await staged)
            self.batcher.observe_forward(lane, seconds)
        except asyncio.CancelledError:  # close(): the waiters are cancelled, never left waiting
            for item in items:
                item.future.cancel()
            raise
        except Exception as exc:  # the whole batch failed: every waiter gets the error
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        for item, row in zip(items, outputs, strict=True):
            if not item.future.done():
                item.future.set_result(row)
        self._interactive_done = lane == "interactive"


def _drain(queue: _Schedule) -> list[_Item]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def _stack_and_forward(forward: Callable[[Any], torch.Tensor], batch: Any) -> tuple[torch.Tensor, float]:
    """The batch's outputs and the seconds the model thread spent on them."""
    started = time.perf_counter()
    if isinstance(batch, list):  # not staged: stacked here, on the GPU thread (no tensor work on the event loop)
        batch = stack_rows(batch)
    return forward(batch), time.perf_counter() - started


class MicroBatcher:
    """Collects single images from any number of requests into batched forwards, per model."""

    def __init__(self, executors: Executors, *, max_batch: int, max_wait_ms: float,
                 observe: Callable[[int, int], None] | None = None,
                 observe_forward: Callable[[str, float], None] | None = None,
                 active_batch: int | None = None, active_s: float = 10.0) -> None:
        if active_s < 0:
            raise ValueError("active_s must be >= 0")
        self.executors = executors
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        # bulk batches while a person is active (an interactive image within active_s): shorter forwards to wait for
        self.active_batch = max(1, min(max_batch, active_batch if active_batch is not None else (3 * max_batch) // 4))
        self.active_s = active_s
        self._last_interactive = float("-inf")
        self.stats = BatchStats()
        self._lanes: dict[Any, _Lane] = {}
        self.observe = observe or (lambda size, requests: None)
        # (lane, seconds) of every forward; lane "interactive" when the batch holds an interactive image
        self.observe_forward = observe_forward or (lambda lane, seconds: None)

    async def submit(self, key: Any, forward: Callable[[Any], torch.Tensor], pixels: torch.Tensor,
                     request_id: str, priority: str = "bulk",
                     stage: Callable[[list[torch.Tensor]], Any] | None = None) -> torch.Tensor:
        """Queue one preprocessed image for model ``key``; returns its row of the batched output.

        ``forward`` is the key's current model: a batch that has not started yet runs on the newest one
        submitted (a reloaded model), a running batch finishes on the model it started with. ``stage``
        (optional) turns a batch's rows into what ``forward`` takes, on the CPU pool, while the previous batch
        runs (``ml.device.stage_batch``: the host-to-device copy overlaps the previous forward).
        """
        if priority == "interactive":
            self._last_interactive = time.monotonic()
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(self, key, forward, stage)
        else:
            lane.forward = forward
            lane.stage = stage
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        lane.queue.put_nowait(_Item(pixels, request_id, future, priority))
        return await future

    def person_active(self) -> bool:
        """An interactive image was submitted within the last ``active_s`` seconds."""
        return time.monotonic() - self._last_interactive < self.active_s

    def bulk_batch_limit(self) -> int:
        """How many images the next bulk batch may hold: ``active_batch`` while a person is active, else ``max_batch``."""
        return self.active_batch if self.person_active() else self.max_batch

    def lanes(self) -> int:
        """Lanes with work now (an idle batcher holds no lane and no model)."""
        return len(self._lanes)

    def forget(self, request_id: str) -> int:
        """Pop and return how many batches of ``request_id`` were shared with other requests."""
        return self.stats.shared_batches.pop(request_id, 0)

    async def close(self) -> None:
        lanes = list(self._lanes.values())
        for lane in lanes:
            lane.task.cancel()
        await asyncio.gather(*(lane.task for lane in lanes), return_exceptions=True)
        self._lanes.clear()
