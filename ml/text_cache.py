"""A bounded, thread-safe LRU cache of class text embeddings, bounded in entries and in bytes (``ml.lru``)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from ml.lru import ByteBoundedLRU

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


class TextEmbeddingCache(ByteBoundedLRU[Hashable, torch.Tensor]):
    """LRU map from :func:`text_cache_key` to a ``[C, D]`` CPU tensor, with hit/miss counters.

    ``maxsize`` bounds the number of entries (0 disables caching); ``max_bytes`` (None: no byte bound)
    bounds what the entries cost (:func:`entry_bytes`: tensors and key strings); an entry larger than
    ``max_bytes`` alone is not cached. Safe to use from several threads. Returned tensors are shared:
    callers must not modify them in place.
    """

    def __init__(self, maxsize: int = 256, max_bytes: int | None = None) -> None:
        if maxsize < 0:
            raise ValueError("maxsize must be >= 0")
        super().__init__(entry_bytes, max_bytes=max_bytes, max_entries=maxsize)
        self.maxsize = maxsize
