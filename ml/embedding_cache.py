"""A bounded, thread-safe LRU cache of image embeddings keyed by (image content hash, model identity).

Shared by every request kind that embeds images with a backbone (zero-shot classify, embed, few-shot),
so the same image bytes are never embedded twice by the same model while they stay cached. Bounded in
bytes (the vectors plus a fixed per-entry overhead); 0 bytes disables it. Stored rows are CPU float32
tensors, returned as they were stored (callers must not modify them).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

import torch

__all__ = ["ENTRY_OVERHEAD_BYTES", "EmbeddingCache"]

ENTRY_OVERHEAD_BYTES = 256
"""Per-entry cost besides the vector: the key (64-hex-digit hash, model identity), dict and tensor headers."""


class EmbeddingCache:
    """LRU map ``(content_sha256, model_key) -> [D]`` float32 CPU tensor, at most ``max_bytes`` in all."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, Hashable], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def cost(vector: torch.Tensor) -> int:
        return vector.element_size() * vector.nelement() + ENTRY_OVERHEAD_BYTES

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, content_hash: str, model_key: Hashable) -> torch.Tensor | None:
        with self._lock:
            value = self._entries.get((content_hash, model_key))
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end((content_hash, model_key))
            self.hits += 1
            return value

    def put(self, content_hash: str, model_key: Hashable, vector: torch.Tensor) -> None:
        row = vector.detach().to("cpu", torch.float32).reshape(-1).clone()
        size = self.cost(row)
        if size > self.max_bytes:
            return
        key = (content_hash, model_key)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= self.cost(old)
            self._entries[key] = row
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= self.cost(evicted)
