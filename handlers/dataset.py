"""A training request's dataset: labels resolved, images downloaded into a local cache, bad ones counted.

Entries are ``{"url", "label"}`` objects or plain URLs labeled by their parent folder
(``.../<class>/<file>``, the ImageFolder convention); ``manifest_url`` points to a JSON Lines file of
``{"url", "label", "split"}``. A multi-label job's entries and lines are ``{"url", "labels": [...]}`` (an empty list
is an image with none of the tags); an entry or line that does not fit the job (a plain URL, ``label`` instead of
``labels`` or the reverse, a repeated or unknown tag) is ``invalid_request`` naming it. Images go through the same fetching and decoding as annotation (size and
pixel limits, private-network rule) and are kept in a cache shared by jobs: files named by the hash of
their content, found again by the hash of their URL. Downloads run in a bounded pool (the fetch
concurrency setting), so a manifest of hundreds of thousands of images never means as many tasks, and
the pool stops fetching as soon as the job's outcome is known (too many bad images, another error, a
cancel).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from handlers import manifests
from handlers.errors import ImageError, PermanentError
from handlers.executor import Executors
from handlers.fetch import Fetcher
from handlers.images import DecodeLimits, decoded
from handlers.lifecycle import Stopped
from schemas.training import LabeledUrl, TrainingDataset, multi_label_entry_problem

INVALID_DATASET = "invalid_dataset"
TOO_MANY_BAD_IMAGES = "too_many_bad_images"
MAX_MANIFEST_BYTES = manifests.MAX_MANIFEST_BYTES


@dataclass
class PreparedDataset:
    """Local samples ``(path, class index)``; multi-label: ``(path, tuple of class indices)``."""

    train: list[tuple[str, int | tuple[int, ...]]]
    val: list[tuple[str, int | tuple[int, ...]]]
    bad: list[tuple[str, str]] = field(default_factory=list)  # (url, error code: message)
    total: int = 0


def label_of(entry: LabeledUrl | str) -> tuple[str, str]:
    """(url, label) of an entry; a plain URL's label is its parent folder name."""
    if isinstance(entry, LabeledUrl):
        return entry.url, entry.label
    path = unquote(urlsplit(entry).path).rstrip("/")
    parts = path.split("/")
    if len(parts) < 2 or not parts[-2]:
        raise PermanentError(INVALID_DATASET, f"cannot take a label from {entry!r}: expected .../<class>/<file>")
    return entry, parts[-2]


class DatasetCache:
    """Local image cache shared by jobs (content-addressed files, URL index)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "urls").mkdir(parents=True, exist_ok=True)

    def _index(self, url: str) -> Path:
        return self.root / "urls" / hashlib.sha256(url.encode()).hexdigest()

    def lookup(self, url: str) -> str | None:
        index = self._index(url)
        try:
            path = self.root / "objects" / index.read_text().strip()
        except OSError:
            return None
        return str(path) if path.exists() else None

    def store(self, url: str, data: bytes, suffix: str) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.root / "objects" / f"{digest}{suffix}"
        if not path.exists():
            tmp = path.with_suffix(path.suffix + f".{uuid.uuid4().hex}.tmp")  # unique: threads share the pid
            tmp.write_bytes(data)
            os.replace(tmp, path)
        index = self._index(url)
        tmp_index = index.with_suffix(f".{uuid.uuid4().hex}.tmp")
        tmp_index.write_text(path.name)
        os.replace(tmp_index, index)
        return str(path)


def _normalise(data: bytes, limits: DecodeLimits) -> tuple[bytes, str]:
    """Decode (all the odd formats handled once, here) and keep a file training can read as RGB."""
    with decoded(data, limits) as image:  # the decode budget is held until the image is re-encoded
        if data[:3] == b"\xff\xd8\xff" and image.mode == "RGB" and not _has_exif_rotation(data):
            return data, ".jpg"  # already a plain RGB JPEG: keep the original bytes
        out = io.BytesIO()
        image.save(out, "PNG", compress_level=1)
        return out.getvalue(), ".png"


def _has_exif_rotation(data: bytes) -> bool:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.getexif().get(0x0112, 1) != 1


class _ManifestLine(LabeledUrl):
    split: object = "train"


async def read_manifest(fetcher: Fetcher, url: str, multi_label: bool = False,
                        class_names: list[str] | None = None) -> tuple[list[LabeledUrl], list[LabeledUrl]]:
    """Entries of a JSON Lines manifest, split into (train, val) by their ``split`` field. A line that does not fit
    a multi-label (or single-label) job is ``invalid_request`` naming its line number."""
    lines = await manifests.read_manifest(fetcher, url, _ManifestLine, error_code=INVALID_DATASET,
                                          max_bytes=MAX_MANIFEST_BYTES)
    names = set(class_names or [])
    train, val = [], []
    for number, line in enumerate(lines, 1):
        problem = multi_label_entry_problem(line, multi_label, names)
        if problem:
            raise PermanentError("invalid_request", f"manifest {url} entry {number} {problem}"[:1000])
        entry = LabeledUrl(url=line.url, label=line.label, labels=line.labels)
        (val if str(line.split).lower() in ("val", "valid", "validation") else train).append(entry)
    return train, val


async def prepare_dataset(dataset: TrainingDataset, *, fetcher: Fetcher, executors: Executors, cache: DatasetCache,
                          limits: DecodeLimits, max_bad_fraction: float, concurrency: int = 16,
                          should_stop: Callable[[], str | None] | None = None,
                          multi_label: bool = False) -> PreparedDataset:
    """Resolve labels, download and check every image (``concurrency`` at a time); fail as soon as too many
    are unusable. ``should_stop`` is asked before each image: a reason (``"cancel"``, ``"preempt"``) ends
    the downloads with ``handlers.lifecycle.Stopped``. ``multi_label``: entries carry ``labels`` (checked by the
    request schema inline, here for manifest lines) and samples get tuples of class indices."""
    train_entries = list(dataset.train_urls)
    val_entries = list(dataset.val_urls)
    if dataset.manifest_url:
        extra_train, extra_val = await read_manifest(fetcher, dataset.manifest_url, multi_label, dataset.class_names)
        train_entries += extra_train
        val_entries += extra_val
    index = {name: i for i, name in enumerate(dataset.class_names)}
    labeled: list[tuple[str, str, str | tuple[str, ...]]] = []  # split, url, label (multi-label: tags)
    unknown: list[str] = []
    for split, entries in (("train", train_entries), ("val", val_entries)):
        for entry in entries:
            if multi_label:
                assert isinstance(entry, LabeledUrl) and entry.labels is not None  # checked by schema / manifest
                labeled.append((split, entry.url, tuple(entry.labels)))
                continue
            url, label = label_of(entry)
            if label not in index:
                unknown.append(f"{label!r} ({url})")
            labeled.append((split, url, label))
    if unknown:
        raise PermanentError(
            INVALID_DATASET,
            f"{len(unknown)} image(s) have labels not in class_names {dataset.class_names[:20]}: {unknown[:5]}",
        )
    if not labeled:
        raise PermanentError(INVALID_DATASET, "the dataset has no images")

    total = len(labeled)
    urls = [url for _, url, _ in labeled]
    paths = await _download_all(urls, fetcher=fetcher, executors=executors, cache=cache, limits=limits,
                                concurrency=concurrency, max_bad_fraction=max_bad_fraction, should_stop=should_stop)
    prepared = PreparedDataset(train=[], val=[], total=total)
    for (split, url, label), path in zip(labeled, paths, strict=True):
        if isinstance(path, ImageError):
            prepared.bad.append((url, f"{path.code}: {path.message}"))
            continue
        target = tuple(sorted(index[t] for t in label)) if isinstance(label, tuple) else index[label]
        (prepared.train if split == "train" else prepared.val).append((path, target))
    return prepared


async def _download_all(urls: list[str], *, fetcher: Fetcher, executors: Executors, cache: DatasetCache,
                        limits: DecodeLimits, concurrency: int, max_bad_fraction: float,
                        should_stop: Callable[[], str | None] | None) -> list[str | ImageError]:
    """Every image cached (its local path) or its ``ImageError``, by ``concurrency`` workers taking URLs in
    order. The job ends at the first error that is not one image's, at a stop request, or as soon as more
    than ``max_bad_fraction`` of them are bad; then nothing more is fetched and the workers still running are
    cancelled."""
    results: list[str | ImageError | None] = [None] * len(urls)
    bad: list[tuple[str, ImageError]] = []
    positions = iter(range(len(urls)))  # shared: each position is taken by exactly one worker

    async def one(url: str) -> str | ImageError:
        cached = cache.lookup(url)
        if cached is not None:
            return cached
        try:
            data = await fetcher.fetch(url)
            normalised, suffix = await executors.on_cpu(_normalise, data, limits)
        except ImageError as exc:
            return exc
        return await executors.on_cpu(cache.store, url, normalised, suffix)

    async def worker() -> None:
        for position in positions:
            reason = should_stop() if should_stop is not None else None
            if reason is not None:
                raise Stopped(reason)
            result = await one(urls[position])
            results[position] = result
            if isinstance(result, ImageError):
                bad.append((urls[position], result))
                if len(bad) > max_bad_fraction * len(urls):
                    examples = "; ".join(f"{url} -> {exc.code}: {exc.message}" for url, exc in bad[:5])
                    raise PermanentError(
                        TOO_MANY_BAD_IMAGES,
                        f"{len(bad)} of {len(urls)} images unusable (max_bad_fraction {max_bad_fraction}); "
                        f"e.g. {examples}"[:2000],
                    )

    workers = [asyncio.ensure_future(worker()) for _ in range(max(1, min(concurrency, len(urls))))]
    try:
        done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    assert all(result is not None for result in results)
    return results  # type: ignore[return-value]
