"""Class text embeddings for zero-shot requests: memory cache, then disk cache, then the text tower.

``TextPasses.full`` returns the embeddings of exactly the templates asked for: from the in-memory cache
(``ml.text_cache``), else per class from the disk cache (``ml.text_disk_cache``) with only the missing
classes computed. Identical concurrent requests share one computation. The tower's forwards run on the
model's thread (``Executors.on_gpu``), one chunk of prompts per call; rendering and tokenising on the CPU
pool; file I/O on the CPU pool: never on the event loop.

``TextPasses.interactive`` is for a person waiting: when the full ensemble is not ready it answers with the
quick template set (``ml.zeroshot.QUICK_TEMPLATES`` by default: a handful of prompts, a fraction of a
second), and ``start_background`` then computes the full ensemble so the next request gets it. Background
jobs are bounded: one per (model, classes, templates) (deduplicated with every other computation of the
same key), at most ``max_background`` at once (more are not started: a later request starts them), in
chunks of ``background_chunk`` prompts so an interactive forward waits for at most one small chunk; they
are cancelled by ``close`` at shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence
from typing import Any

import structlog
import torch

from handlers.executor import Executors
from ml.text_cache import text_cache_key

log = structlog.get_logger("cls.text")


class TextPasses:
    """Text embeddings for every zero-shot model of one worker (one instance, in the model registry)."""

    def __init__(self, executors: Executors, max_background: int = 4, background_chunk: int = 16) -> None:
        self.executors = executors
        self.max_background = max_background
        self.background_chunk = background_chunk
        self._pending: dict[Hashable, asyncio.Future[torch.Tensor]] = {}  # every computation in flight, by key
        self._background: dict[Hashable, asyncio.Task[Any]] = {}
        self.background_started = 0
        self.background_done = 0

    @property
    def background_jobs(self) -> int:
        """Background ensemble jobs running now."""
        return len(self._background)

    async def full(self, model: Any, classes: list[str], templates: list[str]) -> tuple[torch.Tensor, bool]:
        """``[C, D]`` embeddings of ``templates``; the bool says whether no text forward was needed for them
        (memory or disk cache, or an identical computation already running)."""
        key = text_cache_key(model.info, classes, templates)
        pending = self._pending.get(key)
        if pending is not None:  # an identical request (or a background job) computes them: share its result
            text = await asyncio.shield(pending)
            cached = model.text_cache.get(key)  # counted as the hit it is (None if too large to cache)
            return (text if cached is None else cached), True
        cached = model.text_cache.get(key)
        if cached is not None:
            return cached, True
        future = self._begin(key)
        return await self._compute(model, key, classes, templates, future, None, model.text_batch_size)

    async def interactive(self, model: Any, classes: list[str], templates: list[str],
                          quick: list[str]) -> tuple[torch.Tensor, bool, bool]:
        """The full ensemble if it is ready (memory or disk), else the ``quick`` set's embeddings.

        Returns (embeddings, cache hit, quick used). When quick is used, the caller calls
        :meth:`start_background` once its answer is out."""
        key = text_cache_key(model.info, classes, templates)
        cached = model.text_cache.peek(key)
        if cached is not None:
            model.text_cache.get(key)  # count the hit
            return cached, True, False
        if key not in self._pending:
            stored = await self.executors.on_cpu(model.read_disk, classes, templates)
            if all(row is not None for row in stored):
                text = await self.executors.on_cpu(_stack, stored)
                model.text_cache.put(key, text)
                return text, True, False
        text, hit = await self.full(model, classes, quick)
        return text, hit, True

    def start_background(self, model: Any, classes: list[str], templates: list[str]) -> bool:
        """Compute the full ensemble of ``classes`` in the background unless it is cached, being computed, or
        ``max_background`` jobs already run. True when a job started."""
        key = text_cache_key(model.info, classes, templates)
        if key in self._pending or model.text_cache.peek(key) is not None:
            return False
        if len(self._background) >= self.max_background:
            log.info("text_background_skipped", running=len(self._background), classes=len(classes))
            return False
        future = self._begin(key)
        task = asyncio.create_task(self._background_job(model, key, classes, templates, future))
        self._background[key] = task
        self.background_started += 1
        task.add_done_callback(lambda _: self._background.pop(key, None))
        return True

    async def close(self) -> None:
        """Cancel the background jobs (worker shutdown) and wait until they have unwound."""
        tasks = list(self._background.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- internals ------------------------------------------------------------------------------------------
    def _begin(self, key: Hashable) -> asyncio.Future[torch.Tensor]:
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        return future

    async def _background_job(self, model: Any, key: Hashable, classes: list[str], templates: list[str],
                              future: asyncio.Future[torch.Tensor]) -> None:
        try:
            await self._compute(model, key, classes, templates, future, None, self.background_chunk)
            self.background_done += 1
            log.info("text_background_done", classes=len(classes), templates=len(templates))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the next request tries again
            log.warning("text_background_failed", error=f"{type(exc).__name__}: {exc}")

    async def _compute(self, model: Any, key: Hashable, classes: list[str], templates: list[str],
                       future: asyncio.Future[torch.Tensor], stored: list[torch.Tensor | None] | None,
                       chunk: int) -> tuple[torch.Tensor, bool]:
        """Disk first, then the missing classes through the tower; resolves ``future`` either way."""
        try:
            if stored is None:
                stored = await self.executors.on_cpu(model.read_disk, classes, templates)
            missing = [i for i, row in enumerate(stored) if row is None]
            computed = None
            if missing:
                names = [classes[i] for i in missing]
                computed = await self._forward(model, names, templates, chunk)
                await self.executors.on_cpu(model.write_disk, names, templates, computed)
            from ml.zeroshot import merge_class_rows

            text = await self.executors.on_cpu(merge_class_rows, stored, missing, computed)
            model.text_cache.put(key, text)
            future.set_result(text)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._pending[key]
        return text, not missing

    async def _forward(self, model: Any, classes: list[str], templates: list[str], chunk: int) -> torch.Tensor:
        """The text pass: tokenise chunk k+1 on the CPU pool while the model encodes chunk k on its thread."""
        executors = self.executors
        total = len(classes) * len(templates)
        chunks = [(start, min(start + chunk, total)) for start in range(0, total, chunk)]
        sums = None
        next_tokens = asyncio.ensure_future(executors.on_cpu(model.tokenize_prompts, classes, templates, *chunks[0]))
        try:
            for i, (start, _) in enumerate(chunks):
                tokens = await next_tokens
                if i + 1 < len(chunks):
                    next_tokens = asyncio.ensure_future(
                        executors.on_cpu(model.tokenize_prompts, classes, templates, *chunks[i + 1]))
                sums = await executors.on_gpu(model.add_text_features, sums, tokens, start, len(classes),
                                              len(templates))
        finally:
            next_tokens.cancel()
        return await executors.on_gpu(model.finish_text_embeddings, sums, len(templates))


def _stack(rows: Sequence[torch.Tensor | None]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.stack([r for r in rows if r is not None]).float()
