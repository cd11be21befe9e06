"""The disk cache of class text embeddings: round trip, keys, corrupt files, the byte bound, several processes."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch

from ml.text_disk_cache import DiskTextCache, templates_digest

IDENTITY = "clip|ViT-B-32|random|cpu|0123"
TEMPLATES = ["a photo of a {}.", "art of a {}."]


def _rows(n: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.emb"))


def test_round_trip_per_class_and_key_parts(tmp_path):
    cache = DiskTextCache(tmp_path, 10_000_000)
    rows = _rows(3)
    cache.put_many(IDENTITY, ["cat", "dog", "bird"], TEMPLATES, rows)
    assert len(_files(tmp_path)) == 3 and cache.writes == 3
    got = cache.get_many(IDENTITY, ["dog", "fish", "cat"], TEMPLATES)
    assert torch.equal(got[0], rows[1]) and got[1] is None and torch.equal(got[2], rows[0])
    assert (cache.hits, cache.misses) == (2, 1)
    # another model identity, another template list (or order): misses
    assert cache.get_many(IDENTITY.replace("0123", "4567"), ["cat"], TEMPLATES) == [None]
    assert cache.get_many(IDENTITY, ["cat"], list(reversed(TEMPLATES))) == [None]
    assert templates_digest(TEMPLATES) != templates_digest(list(reversed(TEMPLATES)))
    # a second instance (another process, a restart) reads the same files
    assert torch.equal(DiskTextCache(tmp_path, 10_000_000).get_many(IDENTITY, ["bird"], TEMPLATES)[0], rows[2])


def test_strange_class_names_are_keys_not_paths(tmp_path):
    cache = DiskTextCache(tmp_path / "cache", 10_000_000)
    names = ["../../etc/passwd", "a/b\\c", "\x00nul", "é" * 500, "\ud800 lone surrogate", ""]
    cache.put_many(IDENTITY, names, TEMPLATES, _rows(len(names)))
    assert all(p.is_relative_to(tmp_path / "cache") for p in (tmp_path).rglob("*") if p.is_file())
    assert all(row is not None for row in cache.get_many(IDENTITY, names, TEMPLATES))


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "garbage", "empty", "other_key", "huge_header"])
def test_a_corrupt_file_is_a_miss_and_is_removed(tmp_path, damage):
    cache = DiskTextCache(tmp_path, 10_000_000)
    cache.put_many(IDENTITY, ["cat", "dog"], TEMPLATES, _rows(2))
    path = cache.path_for(IDENTITY, "cat", templates_digest(TEMPLATES))
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-7])
    elif damage == "flip_payload":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    elif damage == "garbage":
        path.write_bytes(os.urandom(300))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "other_key":  # a valid file of another class under this name (a collision, a bad copy)
        path.write_bytes(cache.path_for(IDENTITY, "dog", templates_digest(TEMPLATES)).read_bytes())
    else:
        path.write_bytes(data[:8] + (2**31).to_bytes(4, "little") + data[12:])
    got = cache.get_many(IDENTITY, ["cat", "dog"], TEMPLATES)
    assert got[0] is None and got[1] is not None
    assert cache.corrupt == 1 and not path.exists()


def test_bounded_in_bytes_least_recently_used_out(tmp_path):
    probe = DiskTextCache(tmp_path / "probe", 10_000_000)
    probe.put_many(IDENTITY, ["x"], TEMPLATES, _rows(1, dim=256))
    size = _files(tmp_path / "probe")[0].stat().st_size
    cache = DiskTextCache(tmp_path / "c", 10 * size)
    old = time.time() - 1000
    for i in range(30):
        cache.put_many(IDENTITY, [f"class {i}"], TEMPLATES, _rows(1, dim=256, seed=i))
        path = cache.path_for(IDENTITY, f"class {i}", templates_digest(TEMPLATES))
        os.utime(path, (old + i, old + i))  # write order = age order
        if i == 3:
            cache.get_many(IDENTITY, ["class 0"], TEMPLATES)  # an old hit refreshes its file
        total = sum(p.stat().st_size for p in _files(tmp_path / "c"))
        assert total <= 10 * size, (i, total)
    left = cache.get_many(IDENTITY, [f"class {i}" for i in range(30)], TEMPLATES)
    assert left[29] is not None and left[1] is None and left[0] is not None
    assert cache.evictions >= 15


def test_stale_temporary_files_are_swept_fresh_ones_kept(tmp_path):
    cache = DiskTextCache(tmp_path, 10_000_000)
    cache.put_many(IDENTITY, ["cat"], TEMPLATES, _rows(1))
    sub = _files(tmp_path)[0].parent
    stale, fresh = sub / ".tmp-dead", sub / ".tmp-writing"
    stale.write_bytes(b"x" * 100)
    fresh.write_bytes(b"x" * 100)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    cache.evict()
    assert not stale.exists() and fresh.exists()


def test_disabled_with_zero_bytes(tmp_path):
    cache = DiskTextCache(tmp_path / "off", 0)
    cache.put_many(IDENTITY, ["cat"], TEMPLATES, _rows(1))
    assert cache.get_many(IDENTITY, ["cat"], TEMPLATES) == [None] and not (tmp_path / "off").exists()
    with pytest.raises(ValueError):
        DiskTextCache(tmp_path, -1)


def _hammer(directory: str, seed: int, rounds: int, queue) -> None:
    cache = DiskTextCache(directory, 8_000)  # small: evictions race with the other process's reads and writes
    bad = 0
    for r in range(rounds):
        names = [f"c{(seed * 7 + r + j) % 40}" for j in range(5)]
        expected = torch.stack([_rows(1, dim=64, seed=int(n[1:]))[0] for n in names])
        cache.put_many(IDENTITY, names, TEMPLATES, expected)
        for name, row in zip(names, cache.get_many(IDENTITY, names, TEMPLATES), strict=True):
            if row is not None and not torch.equal(row, _rows(1, dim=64, seed=int(name[1:]))[0]):
                bad += 1
    queue.put((bad, cache.corrupt, cache.evictions))


def test_two_processes_share_a_folder_without_torn_reads(tmp_path):
    ctx = multiprocessing.get_context("fork")  # tiny tensors only in the children: no thread pool after the fork
    queue = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), seed, 150, queue)) for seed in (1, 2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    assert [r[:2] for r in results] == [(0, 0), (0, 0)]  # never a wrong row, never a half-written file
    assert all(r[2] > 0 for r in results)  # both evicted while the other wrote and read
    assert sum(p.stat().st_size for p in _files(tmp_path)) <= 8_000
    assert not list(tmp_path.rglob(".tmp-*"))
