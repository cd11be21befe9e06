"""The training image cache: bounded in bytes (least recently used files removed, never the job's own), and a
cached image is served only for a URL its fences still allow."""

from __future__ import annotations

import io
import os
import time

import pytest
from PIL import Image

from handlers.dataset import DatasetCache, prepare_dataset
from handlers.errors import PermanentError
from handlers.executor import Executors
from handlers.fetch import Fetcher

from schemas.training import TrainingDataset
from testkit.configs import dataset_options, decode_limits


def _files(cache: DatasetCache) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in cache.images.iterdir() if not p.name.startswith(".")}


def test_cache_stays_within_its_bytes_and_evicts_least_recently_used(tmp_path):
    first = DatasetCache(tmp_path, max_bytes=10_000)
    paths = [first.store(f"https://x/{i}.png", bytes(1000), ".png") for i in range(8)]
    old = time.time() - 3600
    for k, path in enumerate(paths):
        os.utime(path, (old + k, old + k))  # 0 is the least recently used
    assert first.lookup("https://x/5.png") == paths[5]  # a hit: most recently used now
    second = DatasetCache(tmp_path, max_bytes=10_000)  # the next job
    for i in range(5):
        second.store(f"https://y/{i}.png", bytes(1000), ".png")
        assert sum(_files(second).values()) <= 10_000
    left = _files(second)
    assert os.path.basename(paths[0]) not in left and os.path.basename(paths[5]) in left
    assert second.lookup("https://x/0.png") is None and second.lookup("https://y/0.png") is not None


def test_a_job_whose_own_images_do_not_fit_fails_with_too_large(tmp_path):
    cache = DatasetCache(tmp_path, max_bytes=3_000)
    for i in range(3):
        cache.store(f"https://x/{i}.png", bytes(1000), ".png")
    with pytest.raises(PermanentError) as err:
        cache.store("https://x/3.png", bytes(1000), ".png")
    assert err.value.code == "too_large" and "CLS_DATASET_CACHE_MB" in err.value.message
    assert sum(_files(cache).values()) <= 3_000


def test_the_legacy_unbounded_layout_is_removed(tmp_path):
    (tmp_path / "objects").mkdir()
    (tmp_path / "objects" / "old.png").write_bytes(bytes(5000))
    DatasetCache(tmp_path, max_bytes=1_000).store("https://x/a.png", bytes(500), ".png")
    cache = DatasetCache(tmp_path, max_bytes=1_000)
    cache.store("https://x/b.png", bytes(600), ".png")  # over the budget: the disk is scanned
    assert not (tmp_path / "objects").exists()


async def test_a_cached_image_is_not_served_once_its_url_is_fenced_off(http_server, tmp_path):
    out = io.BytesIO()
    Image.new("RGB", (20, 16), (200, 0, 0)).save(out, "PNG")
    urls = [http_server.add(f"fenced/{c}/1.png", out.getvalue(), content_type="image/png") for c in ("a", "b")]
    dataset = TrainingDataset.model_validate({"train_urls": urls, "class_names": ["a", "b"]})
    executors = Executors(cpu_workers=1)
    cache = DatasetCache(tmp_path / "cache")
    try:
        async with Fetcher(http_server.fetch_limits()) as fetcher:  # private networks allowed (the test server)
            prepared = await prepare_dataset(dataset, fetcher=fetcher, executors=executors, cache=cache,
                                             limits=decode_limits(), max_bad_fraction=0.0, **dataset_options())
        assert len(prepared.train) == 2 and cache.lookup(urls[0]) is not None
        hits = http_server.hits("fenced/")
        tightened = http_server.fetch_limits().__class__(**{**vars(http_server.fetch_limits()),
                                                           "allow_private_networks": False})
        async with Fetcher(tightened) as fetcher:
            prepared = await prepare_dataset(dataset, fetcher=fetcher, executors=executors,
                                             cache=DatasetCache(tmp_path / "cache"), limits=decode_limits(),
                                             max_bad_fraction=1.0, **dataset_options())
    finally:
        executors.shutdown()
    assert prepared.train == [] and [code.split(":")[0] for _, code in prepared.bad] == ["blocked_url"] * 2
    assert http_server.hits("fenced/") == hits
