"""A bounded, thread-safe LRU cache of image embeddings keyed by (image content hash, model identity).

Shared by every request kind that embeds images with a backbone (zero-shot classify, embed, few-shot),
so the same image bytes are never embedded twice by the same model while they stay cached. Bounded in
bytes (the vectors plus a fixed per-entry overhead); 0 bytes disables it. Stored rows are CPU float32
tensors, returned as they were stored (callers must not modify them).
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

from ml.lru import ByteBoundedLRU

__all__ = ["ENTRY_OVERHEAD_BYTES", "EmbeddingCache"]

ENTRY_OVERHEAD_BYTES = 256
"""Per-entry cost besides the vector: the key (64-hex-digit hash, model identity), dict and tensor headers."""


class EmbeddingCache:
    """LRU map ``(content_sha256, model_key) -> [D]`` float32 CPU tensor, at most ``max_bytes`` in all."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._lru: ByteBoundedLRU[tuple[str, Hashable], torch.Tensor] = ByteBoundedLRU(
            lambda _key, vector: self.cost(vector), max_bytes=max_bytes)

    @staticmethod
    def cost(vector: torch.Tensor) -> int:
        return vector.element_size() * vector.nelement() + ENTRY_OVERHEAD_BYTES

    @property
    def bytes(self) -> int:
        return self._lru.bytes

    @property
    def hits(self) -> int:
        return self._lru.hits

    @property
    def misses(self) -> int:
        return self._lru.misses

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, content_hash: str, model_key: Hashable) -> torch.Tensor | None:
        return self._lru.get((content_hash, model_key))

    def put(self, content_hash: str, model_key: Hashable, vector: torch.Tensor) -> None:
        self._lru.put((content_hash, model_key), vector.detach().to("cpu", torch.float32).reshape(-1).clone())
