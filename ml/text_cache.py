"""A bounded, thread-safe LRU cache of class text embeddings, bounded in entries and in bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import torch

__all__ = ["TextEmbeddingCache", "entry_bytes", "text_cache_key"]

_STR_OVERHEAD = 64  # CPython's str header plus the tuple slot, rounded up


def text_cache_key(model_key: Hashable, classes: Sequence[str], templates: Sequence[str]) -> tuple[Hashable, ...]:
    """The cache key of one text-embedding request: the model's identity, the classes, the templates."""
    return (model_key, tuple(classes), tuple(templates))


def entry_bytes(key: Hashable, value: torch.Tensor) -> int:
    """What one entry costs: the tensor's bytes plus the strings its key holds (classes, templates)."""
    size = value.element_size() * value.nelement() + 256
    stack = [key]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            size += len(item.encode("utf-8", "surrogatepass")) + _STR_OVERHEAD
        elif isinstance(item, tuple):
            stack.extend(item)
            size += 8 * len(item) + _STR_OVERHEAD
    return size


class TextEmbeddingCache:
    """LRU map from :func:`text_cache_key` to a ``[C, D]`` CPU tensor, with hit/miss counters.

    ``maxsize`` bounds the number of entries (0 disables caching); ``max_bytes`` (None: no byte bound)
    bounds what the entries cost (:func:`entry_bytes`: tensors and key strings); an entry larger than
    ``max_bytes`` alone is not cached. Safe to use from several threads. Returned tensors are shared:
    callers must not modify them in place.
    """

    def __init__(self, maxsize: int = 256, max_bytes: int | None = None) -> None:
        if maxsize < 0:
            raise ValueError("maxsize must be >= 0")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._entries: OrderedDict[Hashable, tuple[torch.Tensor, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> torch.Tensor | None:
        """The cached value for ``key`` (marked most recently used), or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def peek(self, key: Hashable) -> torch.Tensor | None:
        """The cached value for ``key`` or None, without counting or reordering."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry[0]

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        """Store ``value`` under ``key``, evicting the least recently used entries beyond the bounds."""
        if self.maxsize == 0:
            return
        cost = entry_bytes(key, value)
        if self.max_bytes is not None and cost > self.max_bytes:
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self.bytes -= previous[1]
            self._entries[key] = (value, cost)
            self.bytes += cost
            while len(self._entries) > self.maxsize or (self.max_bytes is not None and self.bytes > self.max_bytes):
                _, (_, evicted_cost) = self._entries.popitem(last=False)
                self.bytes -= evicted_cost
                self.evictions += 1

    def clear(self) -> None:
        """Drop all entries (counters are kept)."""
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries
