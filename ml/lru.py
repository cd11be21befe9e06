"""One bounded, thread-safe LRU map, bounded in bytes (and optionally in entries), with counters.

The worker keeps three caches of derived data: class text embeddings (``ml.text_cache``), image embeddings
by content hash (``ml.embedding_cache``) and fitted few-shot heads (``ml.fewshot.FewShotHeadCache``). They
differ only in their keys and in what an entry costs, so all three are this class with a ``cost`` function.
An entry costing more than ``max_bytes`` alone is not stored; ``max_bytes`` 0 (or ``max_entries`` 0)
disables the cache. Returned values are shared: callers must not modify them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["ByteBoundedLRU"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteBoundedLRU(Generic[K, V]):
    """LRU map ``K -> V``: at most ``max_bytes`` of ``cost(key, value)`` in all (None: no byte bound) and at
    most ``max_entries`` entries (None: no count bound)."""

    def __init__(self, cost: Callable[[K, V], int], max_bytes: int | None, max_entries: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        if max_entries is not None and max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self._cost = cost
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value for ``key`` (marked most recently used), or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def peek(self, key: K) -> V | None:
        """The value for ``key`` or None, without counting or reordering."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry[0]

    def put(self, key: K, value: V) -> bool:
        """Store ``value`` under ``key``, evicting least recently used entries beyond the bounds; False when the
        cache is disabled or the entry alone exceeds ``max_bytes`` (then nothing is stored or evicted)."""
        if self.max_entries == 0 or self.max_bytes == 0:
            return False
        cost = self._cost(key, value)
        if self.max_bytes is not None and cost > self.max_bytes:
            return False
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self.bytes -= previous[1]
            self._entries[key] = (value, cost)
            self.bytes += cost
            while (self.max_entries is not None and len(self._entries) > self.max_entries) or \
                    (self.max_bytes is not None and self.bytes > self.max_bytes):
                _, (_, evicted) = self._entries.popitem(last=False)
                self.bytes -= evicted
                self.evictions += 1
        return True

    def clear(self) -> None:
        """Drop all entries (counters are kept)."""
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries
