"""A training request's dataset: labels resolved, images downloaded into a local cache, bad ones counted.

Entries are ``{"url", "label"}`` objects or plain URLs labeled by their parent folder
(``.../<class>/<file>``, the ImageFolder convention); ``manifest_url`` points to a JSON Lines file of
``{"url", "label", "split"}``. A multi-label job's entries and lines are ``{"url", "labels": [...]}`` (an empty list
is an image with none of the tags); an entry or line that does not fit the job (a plain URL, ``label`` instead of
``labels`` or the reverse, a repeated or unknown tag) is ``invalid_request`` naming it. Images go through the same fetching and decoding as annotation (size and
pixel limits, private-network rule) and are kept in a cache shared by jobs, bounded in bytes
(:class:`DatasetCache`), served only for URLs their fences still allow. Downloads run in a bounded pool (the fetch
concurrency setting), so a manifest of hundreds of thousands of images never means as many tasks, and
the pool stops fetching as soon as the job's outcome is known (too many bad images, another error, a
cancel).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from handlers import manifests
from handlers.errors import TOO_LARGE, ImageError, PermanentError
from handlers.executor import Executors
from handlers.fetch import Fetcher
from handlers.images import DecodeLimits, decoded
from handlers.lifecycle import Stopped
from schemas.training import LabeledUrl, TrainingDataset, multi_label_entry_problem

INVALID_DATASET = "invalid_dataset"
TOO_MANY_BAD_IMAGES = "too_many_bad_images"


@dataclass
class PreparedDataset:
    """Local samples ``(path, class index)``; multi-label: ``(path, tuple of class indices)``."""

    train: list[tuple[str, int | tuple[int, ...]]]
    val: list[tuple[str, int | tuple[int, ...]]]
    bad: list[tuple[str, str]] = field(default_factory=list)  # (url, error code: message)
    total: int = 0


def label_of(entry: LabeledUrl | str | tuple[str, str]) -> tuple[str, str]:
    """(url, label) of an entry; a plain URL's label is its parent folder name."""
    if isinstance(entry, LabeledUrl):
        return entry.url, entry.label
    if isinstance(entry, tuple):
        return entry
    path = unquote(urlsplit(entry).path).rstrip("/")
    parts = path.split("/")
    if len(parts) < 2 or not parts[-2]:
        raise PermanentError(INVALID_DATASET, f"cannot take a label from {entry!r}: expected .../<class>/<file>")
    return entry, parts[-2]


class DatasetCache:
    """Local image cache shared by jobs: one file per URL (named by the hash of the URL), at most ``max_bytes``
    on disk (``CLS_DATASET_CACHE_MB``; None: unbounded).

    When a new file would not fit, the least recently used files (by modification time: a hit touches its
    file) are removed until the cache is at nine tenths of its budget, never a file this cache object
    handed out or stored (one object per job: its images stay until it is done). A job whose own images do
    not fit fails with ``too_large``. The files on disk are rescanned whenever the budget is reached, so
    workers sharing the directory see each other's files. Callers check a URL's fences before asking
    (``Fetcher.check``): a cached file is served only for a URL that may still be fetched.
    """

    def __init__(self, root: str | Path, max_bytes: int | None = None) -> None:
        self.root = Path(root).expanduser()
        self.images = self.root / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()  # store() runs in the CPU pool's threads
        self._sizes: dict[str, int] | None = None  # file name -> bytes, once scanned
        self._used: set[str] = set()  # files this cache handed out or stored (its job's images)

    def _name(self, url: str, suffix: str) -> str:
        return hashlib.sha256(url.encode()).hexdigest() + suffix

    def lookup(self, url: str) -> str | None:
        for suffix in SUFFIXES:
            path = self.images / self._name(url, suffix)
            try:
                os.utime(path)  # most recently used now
            except OSError:
                continue
            self._used.add(path.name)
            return str(path)
        return None

    def store(self, url: str, data: bytes, suffix: str) -> str:
        path = self.images / self._name(url, suffix)
        with self._lock:
            self._used.add(path.name)
            if self.max_bytes is not None:
                self._make_room(path.name, len(data))
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # unique: threads share the pid
            tmp.write_bytes(data)
            os.replace(tmp, path)
            if self._sizes is not None:
                self._sizes[path.name] = len(data)
        return str(path)

    def _scan(self) -> dict[str, int]:
        for legacy in ("objects", "urls"):  # the layout before the cache was bounded: never counted, removed
            shutil.rmtree(self.root / legacy, ignore_errors=True)
        sizes: dict[str, int] = {}
        with os.scandir(self.images) as entries:
            for entry in entries:
                try:
                    if entry.is_file() and not entry.name.startswith("."):
                        sizes[entry.name] = entry.stat().st_size
                except OSError:
                    continue
        return sizes

    def _make_room(self, name: str, size: int) -> None:
        assert self.max_bytes is not None
        if self._sizes is None:
            self._sizes = self._scan()
        if sum(self._sizes.values()) - self._sizes.get(name, 0) + size <= self.max_bytes:
            return
        self._sizes = self._scan()  # the disk as it is now (other jobs, other workers)
        total = sum(self._sizes.values()) - self._sizes.pop(name, 0)
        if total + size <= self.max_bytes:
            return
        low_water = int(self.max_bytes * 0.9) - size
        mtimes: list[tuple[float, str]] = []
        for other in self._sizes:
            if other not in self._used:
                try:
                    mtimes.append(((self.images / other).stat().st_mtime, other))
                except OSError:
                    continue
        for _, other in sorted(mtimes):
            if total <= low_water:
                break
            with contextlib.suppress(OSError):
                (self.images / other).unlink()
            total -= self._sizes.pop(other)
        if total + size > self.max_bytes:
            mine = sum(self._sizes.get(n, 0) for n in self._used) + size
            raise PermanentError(TOO_LARGE, f"the job's images need more than {mine} bytes of local cache; the cache "
                                            f"holds at most {self.max_bytes} (CLS_DATASET_CACHE_MB)")


SUFFIXES = (".jpg", ".png")
"""The files the cache keeps: a plain RGB JPEG as fetched, anything else re-encoded as PNG."""


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


VAL_SPLITS = ("val", "valid", "validation")


def _compact(line: _ManifestLine) -> tuple[str, str | tuple[str, ...], bool]:
    """A manifest line as kept while the manifest streams: (url, label (a multi-label line: its tags as a tuple),
    is it a validation image)."""
    label = line.label if line.labels is None else tuple(line.labels)
    return line.url, label, isinstance(line.split, str) and line.split.lower() in VAL_SPLITS


async def read_manifest(fetcher: Fetcher, url: str, executors: Executors, limits: manifests.ManifestLimits,
                        ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Entries of a JSON Lines manifest as (url, label), split into (train, val) by their ``split`` field;
    streamed and parsed in the CPU pool (``handlers.manifests``), at most CLS_MANIFEST_MAX_LINES entries."""
    lines = await manifests.read_manifest(fetcher, url, _ManifestLine, executors=executors, error_code=INVALID_DATASET,
                                          limits=limits, convert=_compact)
    train = [(line_url, label) for line_url, label, is_val in lines if not is_val]
    val = [(line_url, label) for line_url, label, is_val in lines if is_val]
    return train, val


async def prepare_dataset(dataset: TrainingDataset, *, fetcher: Fetcher, executors: Executors, cache: DatasetCache,
                          limits: DecodeLimits, max_bad_fraction: float, concurrency: int,
                          manifest_limits: manifests.ManifestLimits,
                          should_stop: Callable[[], str | None] | None = None,
                          multi_label: bool = False) -> PreparedDataset:
    """Resolve labels, download and check every image (``concurrency`` at a time); fail as soon as too many
    are unusable. ``should_stop`` is asked before each image: a reason (``"cancel"``, ``"preempt"``) ends
    the downloads with ``handlers.lifecycle.Stopped``. ``multi_label``: entries carry ``labels`` (checked by the
    request schema inline, here for manifest lines) and samples get tuples of class indices."""
    train_entries: list[LabeledUrl | str | tuple[str, str]] = list(dataset.train_urls)
    val_entries: list[LabeledUrl | str | tuple[str, str]] = list(dataset.val_urls)
    if dataset.manifest_url:
        extra_train, extra_val = await read_manifest(fetcher, dataset.manifest_url, executors, manifest_limits)
        names = set(dataset.class_names)
        for number, (line_url, label) in enumerate(extra_train + extra_val, 1):
            entry = LabeledUrl(url=line_url, labels=list(label)) if isinstance(label, tuple) else LabeledUrl(
                url=line_url, label=label)
            problem = multi_label_entry_problem(entry, multi_label, names)
            if problem:
                raise PermanentError("invalid_request", f"manifest {dataset.manifest_url} entry {number} ({line_url}) "
                                                        f"{problem}"[:1000])
        train_entries += extra_train
        val_entries += extra_val
    index = {name: i for i, name in enumerate(dataset.class_names)}
    labeled: list[tuple[str, str, str | tuple[str, ...]]] = []  # split, url, label (multi-label: tags)
    unknown: list[str] = []
    for split, entries in (("train", train_entries), ("val", val_entries)):
        for entry in entries:
            if multi_label:  # checked by the schema (inline) or above (manifest)
                if isinstance(entry, tuple):
                    labeled.append((split, entry[0], tuple(entry[1])))
                else:
                    assert isinstance(entry, LabeledUrl) and entry.labels is not None
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
        try:
            await fetcher.check(url)  # the fences first: a cached file only for a URL that may still be fetched
        except ImageError as exc:
            return exc
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
