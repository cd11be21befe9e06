"""A request's images handled in parts, in order, one part ahead (shared by classify and embed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


async def parts_in_order(parts: Sequence[Sequence[T]],
                         handle: Callable[[T], Awaitable[R]]) -> AsyncIterator[tuple[int, Sequence[T], list[R]]]:
    """Yield ``(k, part k's items, their outputs)`` for each part in order.

    Part k+1's items are started when part k is awaited, so fetching and decoding overlap the model
    (admission is bounded by the caller's ``handle``: its window and budgets). When a part fails, or the
    consumer stops early (use ``contextlib.aclosing``), every task still pending is cancelled.
    """
    tasks: dict[int, list[asyncio.Task[R]]] = {}

    def start(k: int) -> None:
        tasks[k] = [asyncio.ensure_future(handle(item)) for item in parts[k]]

    try:
        if parts:
            start(0)
        for k, items in enumerate(parts):
            if k + 1 < len(parts):
                start(k + 1)
            current = tasks.pop(k)
            try:
                outputs = list(await asyncio.gather(*current))
            except BaseException:
                for task in current:
                    task.cancel()
                raise
            yield k, items, outputs
    finally:
        for pending in tasks.values():
            for task in pending:
                task.cancel()
