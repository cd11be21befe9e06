"""ml.lru.ByteBoundedLRU: the one bounded LRU behind the text, image-embedding and few-shot head caches."""

from __future__ import annotations

import threading

import pytest

from ml.lru import ByteBoundedLRU


def _sized(_key: str, value: bytes) -> int:
    return len(value)


def test_byte_bound_evicts_least_recently_used_first() -> None:
    cache: ByteBoundedLRU[str, bytes] = ByteBoundedLRU(_sized, max_bytes=10)
    assert cache.put("a", b"xxxx") and cache.put("b", b"yyyy")
    assert cache.get("a") == b"xxxx"  # a is now the most recently used
    assert cache.put("c", b"zzzz")  # 12 bytes > 10: b goes, not a
    assert "b" not in cache and cache.peek("a") == b"xxxx" and cache.peek("c") == b"zzzz"
    assert cache.bytes == 8 and cache.evictions == 1 and (cache.hits, cache.misses) == (1, 0)


def test_entry_bound_and_replacing_a_key_keeps_the_byte_count() -> None:
    cache: ByteBoundedLRU[str, bytes] = ByteBoundedLRU(_sized, max_bytes=None, max_entries=2)
    cache.put("a", b"1")
    cache.put("a", b"123")
    assert len(cache) == 1 and cache.bytes == 3
    cache.put("b", b"1")
    cache.put("c", b"1")
    assert len(cache) == 2 and "a" not in cache and cache.bytes == 2


def test_an_entry_larger_than_the_bound_is_refused_without_evicting_anything() -> None:
    cache: ByteBoundedLRU[str, bytes] = ByteBoundedLRU(_sized, max_bytes=10)
    cache.put("small", b"12345")
    assert not cache.put("huge", b"x" * 11)
    assert "huge" not in cache and cache.peek("small") == b"12345" and cache.evictions == 0


def test_zero_bounds_disable_the_cache_and_negative_ones_are_refused() -> None:
    assert not ByteBoundedLRU(_sized, max_bytes=0).put("a", b"")
    assert not ByteBoundedLRU(_sized, max_bytes=None, max_entries=0).put("a", b"1")
    with pytest.raises(ValueError):
        ByteBoundedLRU(_sized, max_bytes=-1)
    with pytest.raises(ValueError):
        ByteBoundedLRU(_sized, max_bytes=1, max_entries=-1)


def test_concurrent_puts_keep_the_bound_and_the_byte_count() -> None:
    cache: ByteBoundedLRU[int, bytes] = ByteBoundedLRU(_sized, max_bytes=1000)

    def writer(offset: int) -> None:
        for i in range(2000):
            cache.put(offset + i, b"x" * (1 + i % 50))
            cache.get(offset + i // 2)

    threads = [threading.Thread(target=writer, args=(n * 10_000,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert 950 <= cache.bytes <= 1000 and cache.evictions == 8000 - len(cache)
    assert cache.bytes == sum(len(cache.peek(k) or b"") for k in list(cache._entries))  # noqa: SLF001
