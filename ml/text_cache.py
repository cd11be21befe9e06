"""A bounded, thread-safe LRU cache of class text embeddings."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import torch

__all__ = ["TextEmbeddingCache", "text_cache_key"]


def text_cache_key(model_key: Hashable, classes: Sequence[str], templates: Sequence[str]) -> tuple[Hashable, ...]:
    """The cache key of one text-embedding request: the model's identity, the classes, the templates."""
    return (model_key, tuple(classes), tuple(templates))


class TextEmbeddingCache:
    """LRU map from :func:`text_cache_key` to a ``[C, D]`` CPU tensor, with hit/miss counters.

    ``maxsize`` bounds the number of entries (0 disables caching). Safe to use from several threads.
    Returned tensors are shared: callers must not modify them in place.
    """

    def __init__(self, maxsize: int = 256) -> None:
        if maxsize < 0:
            raise ValueError("maxsize must be >= 0")
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> torch.Tensor | None:
        """The cached value for ``key`` (marked most recently used), or None; counts a hit or a miss."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def peek(self, key: Hashable) -> torch.Tensor | None:
        """The cached value for ``key`` or None, without counting or reordering."""
        with self._lock:
            return self._entries.get(key)

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        """Store ``value`` under ``key``, evicting the least recently used entries beyond ``maxsize``."""
        if self.maxsize == 0:
            return
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
                self.evictions += 1

    def clear(self) -> None:
        """Drop all entries (counters are kept)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries
