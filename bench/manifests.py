"""Reading a training manifest: peak Python memory and the longest event-loop stall, streamed (the workers'
``handlers.dataset.read_manifest``) against the whole-document baseline (bytes read whole, decoded, split into
lines, each line validated and rebuilt on the event loop: what the workers did before), on the same file.

    python -m bench.manifests [--mb 16]

Memory is what ``tracemalloc`` sees (Python allocations, both ways the same), the stall the largest gap of a
10 ms ticker on the loop while the manifest is read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import tracemalloc
from pathlib import Path

from handlers.dataset import _ManifestLine, read_manifest
from handlers.executor import Executors
from handlers.fetch import Fetcher
from schemas.training import LabeledUrl
from testkit.configs import fetch_limits, manifest_limits


def write_manifest(path: Path, megabytes: int) -> int:
    line_no = 0
    with open(path, "wb") as out:
        while out.tell() < megabytes * 1024 * 1024:
            out.write(json.dumps({"url": f"https://images.example.com/datasets/set-a/{line_no:08d}.jpg",
                                  "label": f"class-{line_no % 100}",
                                  "split": "val" if line_no % 10 == 0 else "train"}).encode() + b"\n")
            line_no += 1
    return line_no


async def whole_document(path: Path) -> int:
    """The baseline: the whole object read (once, in a thread), decoded, split, validated and rebuilt line by
    line on the loop."""
    raw = await asyncio.to_thread(path.read_bytes)
    lines = [_ManifestLine.model_validate(json.loads(line))
             for line in raw.decode("utf-8", "replace").splitlines() if line.strip()]
    train = [LabeledUrl(url=line.url, label=line.label) for line in lines if line.split != "val"]
    val = [LabeledUrl(url=line.url, label=line.label) for line in lines if line.split == "val"]
    return len(train) + len(val)


async def measure(name: str, read) -> tuple[float, float, float]:  # noqa: ANN001
    gaps = [0.0]
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last - 0.01)
            last = now

    tracemalloc.start()
    tick = asyncio.ensure_future(ticker())
    started = time.monotonic()
    count = await read()
    seconds = time.monotonic() - started
    _, peak = tracemalloc.get_traced_memory()
    done.set()
    await tick
    tracemalloc.stop()
    print(f"{name:>16}: {count} entries, peak {peak / 2**20:7.1f} MiB, longest loop stall {max(gaps):6.2f} s, "
          f"{seconds:6.2f} s")
    return peak, max(gaps), seconds


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=16)
    args = parser.parse_args()
    from handlers.storage import ObjectStore

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.jsonl"
        lines = write_manifest(path, args.mb)
        size = path.stat().st_size
        print(f"manifest: {size / 2**20:.1f} MiB, {lines} lines (cores in use: shared machine, numbers are relative)")
        executors = Executors(cpu_workers=2)
        store = ObjectStore(allow_file_urls=True, file_root=tmp)
        try:
            async with Fetcher(fetch_limits(allow_file_urls=True, file_root=tmp), store=store) as fetcher:
                url = path.as_uri()
                base_peak, base_stall, base_s = await measure("whole document", lambda: whole_document(path))
                peak, stall, seconds = await measure("streamed", lambda: _count(read_manifest(fetcher, url, executors, manifest_limits())))
        finally:
            executors.shutdown()
    print(f"peak memory: streamed / whole = {peak / base_peak:.2f} ({peak / size:.1f}x vs {base_peak / size:.1f}x the "
          f"manifest); longest stall: streamed / whole = {stall / max(base_stall, 1e-9):.3f}; "
          f"time: streamed / whole = {seconds / base_s:.2f}")


async def _count(reading) -> int:  # noqa: ANN001
    train, val = await reading
    return len(train) + len(val)


if __name__ == "__main__":
    asyncio.run(main())
