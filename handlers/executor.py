"""The bridges from the event loop to synchronous work: one GPU thread, one CPU pool."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Executors:
    """``gpu``: the single thread that owns the models (torch never runs on the event loop);
    ``cpu``: a pool for decoding and preprocessing images; ``cpu_first``: one thread for the decoding of
    interactive images, so they never wait behind a bulk request's; ``fit``: a small pool of its own for few-shot
    fits (CPU-heavy for seconds to minutes), so they never hold the threads that decode images."""

    def __init__(self, cpu_workers: int | None = None, fit_workers: int = 1) -> None:
        self.gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cls-gpu")
        self.cpu = ThreadPoolExecutor(max_workers=cpu_workers or min(8, (os.cpu_count() or 2)), thread_name_prefix="cls-cpu")
        # CPU work a person waits for (an interactive request's decode): its own thread, never queued behind the
        # bulk decodes that fill ``cpu``
        self.cpu_first = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cls-cpu-first")
        self.fit = ThreadPoolExecutor(max_workers=fit_workers, thread_name_prefix="cls-fit")

    async def on_gpu(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await _run(self.gpu, fn, *args, **kwargs)

    def submit_gpu(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Queue ``fn`` on the GPU thread; the future is done only when ``fn`` has returned (or never ran)."""
        ctx = contextvars.copy_context()
        return self.gpu.submit(ctx.run, fn, *args, **kwargs)

    async def on_cpu(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await _run(self.cpu, fn, *args, **kwargs)

    async def on_cpu_first(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``on_cpu`` for work a person waits for: on its own thread, not behind the pool's queue."""
        return await _run(self.cpu_first, fn, *args, **kwargs)

    async def on_fit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``on_cpu`` for few-shot fits: their own bounded pool (cancelling the await drops a fit not yet started;
        one running stops only when ``fn`` checks a stop flag)."""
        return await _run(self.fit, fn, *args, **kwargs)

    def shutdown(self) -> None:
        self.gpu.shutdown(wait=True, cancel_futures=True)
        self.cpu.shutdown(wait=True, cancel_futures=True)
        self.cpu_first.shutdown(wait=True, cancel_futures=True)
        self.fit.shutdown(wait=True, cancel_futures=True)


async def _run(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    ctx = contextvars.copy_context()  # keep structlog's bound request id in worker-thread logs
    call = functools.partial(ctx.run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(pool, call)
