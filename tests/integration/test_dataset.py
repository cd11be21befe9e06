"""Training datasets: folder labels, {url,label} entries, a JSON Lines manifest, the shared image cache,
bad images counted against max_bad_fraction, labels checked against class_names."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from PIL import Image

from handlers.dataset import DatasetCache, label_of, prepare_dataset
from handlers.lifecycle import Stopped
from handlers.errors import PermanentError
from handlers.executor import Executors
from handlers.fetch import Fetcher

from handlers.storage import ObjectStore
from schemas.training import LabeledUrl, TrainingDataset
from testkit.configs import dataset_options, decode_limits, fetch_limits

pytestmark = pytest.mark.s3


def png(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (20, 16), color).save(out, "PNG")
    return out.getvalue()


def test_folder_labels():
    assert label_of("s3://b/data/cat/1.png") == ("s3://b/data/cat/1.png", "cat")
    assert label_of("https://x/a%20b/2.jpg")[1] == "a b"
    assert label_of(LabeledUrl(url="s3://b/x.png", label="dog")) == ("s3://b/x.png", "dog")
    with pytest.raises(PermanentError):
        label_of("s3://b/x.png")


async def test_manifest_cache_and_bad_images(http_server, s3_server, s3_bucket, tmp_path):
    red = http_server.add("ds/red/1.png", png((255, 0, 0)), content_type="image/png")
    blue = http_server.add("ds/blue/1.png", png((0, 0, 255)), content_type="image/png")
    manifest = "\n".join(json.dumps(line) for line in [
        {"url": http_server.add("ds/m1.png", png((250, 5, 5)), content_type="image/png"), "label": "red", "split": "train"},
        {"url": http_server.add("ds/m2.png", png((5, 5, 250)), content_type="image/png"), "label": "blue", "split": "val"},
    ])
    async with s3_server.client() as client:
        await client.put_object(Bucket=s3_bucket, Key="manifest.jsonl", Body=manifest.encode())
    dataset = TrainingDataset.model_validate({
        "train_urls": [red, blue, {"url": http_server.urls["not_found"], "label": "red"}],
        "class_names": ["red", "blue"], "manifest_url": f"s3://{s3_bucket}/manifest.jsonl"})
    executors = Executors(cpu_workers=2)
    cache = DatasetCache(tmp_path / "cache")
    try:
        async with ObjectStore(endpoint_url=s3_server.endpoint_url) as store, \
                Fetcher(http_server.fetch_limits(), store=store) as fetcher:
            with pytest.raises(PermanentError) as err:  # 1 of 5 bad > 5 %
                await prepare_dataset(dataset, fetcher=fetcher, executors=executors, cache=cache,
                                      limits=decode_limits(), max_bad_fraction=0.05, **dataset_options())
            assert err.value.code == "too_many_bad_images" and "HTTP 404" in err.value.message
            prepared = await prepare_dataset(dataset, fetcher=fetcher, executors=executors, cache=cache,
                                             limits=decode_limits(), max_bad_fraction=0.25, **dataset_options())
            assert len(prepared.train) == 3 and len(prepared.val) == 1 and len(prepared.bad) == 1
            assert sorted(label for _, label in prepared.train) == [0, 0, 1]
            # the cache is reused: a second job finds every good image without fetching
            assert cache.lookup(red) is not None and cache.lookup(http_server.urls["not_found"]) is None
            for path, _ in prepared.train + prepared.val:
                assert Image.open(path).convert("RGB").size == (20, 16)
            unknown = TrainingDataset.model_validate({"train_urls": [red, "https://x/green/1.png"],
                                                      "class_names": ["red", "blue"]})
            with pytest.raises(PermanentError) as err:
                await prepare_dataset(unknown, fetcher=fetcher, executors=executors, cache=cache,
                                      limits=decode_limits(), max_bad_fraction=0.5, **dataset_options())
            assert err.value.code == "invalid_dataset" and "'green'" in err.value.message
    finally:
        executors.shutdown()


@pytest.mark.parametrize("line", [
    {"url": "s3://b/red/1.png", "label": "SECRET-TOKEN-" + "x" * 300},  # label too long
    {"url": "SECRET-TOKEN-not-a-url", "label": "red"},
    {"label": "red", "SECRET-TOKEN": "value"},  # no url
    "SECRET-TOKEN not json at all",
    ["SECRET-TOKEN"],
])
async def test_manifest_errors_never_echo_the_object(s3_server, s3_bucket, line):
    body = line if isinstance(line, str) else json.dumps(line)
    async with s3_server.client() as client:
        await client.put_object(Bucket=s3_bucket, Key="manifest.jsonl", Body=body.encode())
    dataset = TrainingDataset.model_validate({"class_names": ["red", "blue"],
                                              "manifest_url": f"s3://{s3_bucket}/manifest.jsonl"})
    executors = Executors(cpu_workers=1)
    try:
        async with ObjectStore(endpoint_url=s3_server.endpoint_url) as store, Fetcher(fetch_limits(), store=store) as fetcher:
            with pytest.raises(PermanentError) as err:
                await prepare_dataset(dataset, fetcher=fetcher, executors=executors, cache=DatasetCache("/nonexistent"),
                                      limits=decode_limits(), max_bad_fraction=0.0, **dataset_options())
    finally:
        executors.shutdown()
    assert err.value.code == "invalid_dataset" and "line 1" in err.value.message
    assert "SECRET" not in err.value.message and "SECRET" not in str(err.value)


async def _watch_tasks(peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], len(asyncio.all_tasks()))
        await asyncio.sleep(0.002)


async def test_large_manifest_downloads_stay_bounded_and_stop_with_the_job(http_server, tmp_path):
    """20,000 images: a bounded pool of downloads; the first bad one (max_bad_fraction 0) or a cancel ends
    the job and nothing more reaches the server."""
    concurrency = 4
    urls = [http_server.url(f"custom/big/c{i % 2}/{i}.png") for i in range(20_000)]
    for i in range(12):
        if i != 5:  # position 5 answers 404: with max_bad_fraction 0 the job's outcome is known there
            http_server.add(f"big/c{i % 2}/{i}.png", png((i * 20, 0, 0)), content_type="image/png")
    dataset = TrainingDataset.model_validate({"train_urls": urls, "class_names": ["c0", "c1"]})
    executors = Executors(cpu_workers=2)
    cache = DatasetCache(tmp_path / "cache")
    try:
        async with Fetcher(http_server.fetch_limits()) as fetcher:
            baseline = len(asyncio.all_tasks())
            peak, stop = [0], asyncio.Event()
            watcher = asyncio.ensure_future(_watch_tasks(peak, stop))
            with pytest.raises(PermanentError) as err:
                await prepare_dataset(dataset, fetcher=fetcher, executors=executors, cache=cache,
                                      limits=decode_limits(), max_bad_fraction=0.0, **dataset_options(concurrency=concurrency))
            stop.set()
            await watcher
            assert err.value.code == "too_many_bad_images" and "/big/c1/5.png" in err.value.message
            await asyncio.sleep(0.3)  # a request sent just before the failure may reach the server a moment later
            hits = http_server.hits("big/")
            await asyncio.sleep(0.5)
            assert http_server.hits("big/") == hits  # nothing left running after the failure
            assert 6 <= hits <= 6 + 2 * concurrency, hits
            assert peak[0] <= baseline + 1 + concurrency, (peak[0], baseline)

            # a cancel while downloading: Stopped, and again nothing more is fetched
            cancel_urls = [http_server.url(f"custom/cancel/c{i % 2}/{i}.png") for i in range(20_000)]
            cancelling = TrainingDataset.model_validate({"train_urls": cancel_urls, "class_names": ["c0", "c1"]})
            with pytest.raises(Stopped) as stopped:
                await prepare_dataset(cancelling, fetcher=fetcher, executors=executors, cache=cache,
                                      limits=decode_limits(), max_bad_fraction=1.0, **dataset_options(concurrency=concurrency),
                                      should_stop=lambda: "cancel" if http_server.hits("cancel/") >= 30 else None)
            assert stopped.value.reason == "cancel"
            await asyncio.sleep(0.3)  # a request sent just before the stop may reach the server a moment later
            hits = http_server.hits("cancel/")
            await asyncio.sleep(0.5)
            assert http_server.hits("cancel/") == hits and 30 <= hits <= 30 + concurrency, hits
    finally:
        executors.shutdown()
