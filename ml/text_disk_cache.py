"""Class text embeddings on local disk, bounded in bytes, shared by the processes of one node.

One file per (model identity, class name, template list): the class's ensemble embedding (``[D]`` float32),
so a request with classes some of which are known computes only the others, and a restarted worker (or a
second worker on the node) reads instead of running the text tower. The model identity names the family,
variant, weights spec and a digest of the loaded weights (``ml.zeroshot.ZeroShotEmbeddingModel.identity``),
so other weights under the same name never read these entries.

Rules that make sharing safe:

- a file is written to a temporary name in its folder and moved into place with ``os.replace`` (atomic on
  one filesystem): a reader sees the old file, the new file or none, never half of one;
- every file carries a magic, a JSON header naming its key, and a CRC32 of its payload: a truncated,
  corrupt or colliding file is a miss (and removed), never an exception or a wrong embedding;
- the bound is kept by whoever writes: when its running estimate goes over ``max_bytes``, it scans the
  folder and removes the least recently used files (mtime; a hit refreshes it at most once a minute) down to
  80%; a file another process removed first is simply gone. Temporary files older than an hour (a writer
  that died) are removed by the same scan.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["DiskTextCache"]

MAGIC = b"CLSTEXT1"
SUFFIX = ".emb"
TMP_PREFIX = ".tmp-"
MAX_HEADER_BYTES = 1 << 20  # a class name and a template digest: far less
MAX_DIM = 1 << 16
STALE_TMP_S = 3600.0
TOUCH_EVERY_S = 60.0
EVICT_TO = 0.8


def templates_digest(templates: Sequence[str]) -> str:
    """The digest of a template list, in the order given (the ensemble depends on the set, the key on the list)."""
    return hashlib.sha256(json.dumps(list(templates), ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()


class DiskTextCache:
    """``(identity, class, templates) -> [D] float32`` files under ``directory``; ``max_bytes`` 0 disables it.

    Safe to use from several threads and several processes at once (see the module docstring). Counters
    ``hits``, ``misses``, ``writes``, ``evictions``, ``corrupt`` are this process's.
    """

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.directory = Path(directory).expanduser()
        self.max_bytes = max_bytes
        self.hits = self.misses = self.writes = self.evictions = self.corrupt = 0
        self._estimate: int | None = None  # bytes under the folder as this process last knew it
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    # -- keys -----------------------------------------------------------------------------------------------
    @staticmethod
    def _header(identity: str, class_name: str, templates_sha: str) -> dict[str, str]:
        return {"identity": identity, "class": class_name, "templates": templates_sha}

    def path_for(self, identity: str, class_name: str, templates_sha: str) -> Path:
        raw = json.dumps([identity, class_name, templates_sha], ensure_ascii=False).encode("utf-8", "surrogatepass")
        digest = hashlib.sha256(raw).hexdigest()
        return self.directory / digest[:2] / f"{digest}{SUFFIX}"

    # -- reads ----------------------------------------------------------------------------------------------
    def get_many(self, identity: str, classes: Sequence[str], templates: Sequence[str]) -> list[torch.Tensor | None]:
        """Per class its stored embedding, or None (missing, corrupt, or the cache disabled)."""
        if not self.enabled:
            return [None] * len(classes)
        sha = templates_digest(templates)
        found = [self._read(self.path_for(identity, name, sha), self._header(identity, name, sha)) for name in classes]
        with self._lock:
            hits = sum(1 for f in found if f is not None)
            self.hits += hits
            self.misses += len(found) - hits
        return found

    def _read(self, path: Path, expected: dict[str, str]) -> torch.Tensor | None:
        try:
            with open(path, "rb") as f:
                data = f.read(len(MAGIC) + 4 + MAX_HEADER_BYTES + 4 * MAX_DIM + 1)
                mtime = os.fstat(f.fileno()).st_mtime
        except OSError:  # missing, removed by an evictor, unreadable
            return None
        embedding = self._decode(data, expected)
        if embedding is None:
            with self._lock:
                self.corrupt += 1
            self._remove(path)
            return None
        if time.time() - mtime > TOUCH_EVERY_S:  # least recently used = oldest mtime
            try:
                os.utime(path)
            except OSError:
                pass
        return embedding

    @staticmethod
    def _decode(data: bytes, expected: dict[str, str]) -> torch.Tensor | None:
        head = len(MAGIC) + 4
        if len(data) < head or data[: len(MAGIC)] != MAGIC:
            return None
        (header_len,) = struct.unpack("<I", data[len(MAGIC):head])
        if header_len > MAX_HEADER_BYTES or len(data) < head + header_len:
            return None
        try:
            header = json.loads(data[head:head + header_len].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None
        if not isinstance(header, dict) or any(header.get(k) != v for k, v in expected.items()):
            return None
        payload = data[head + header_len:]
        dim = header.get("dim")
        if not isinstance(dim, int) or not 0 < dim <= MAX_DIM or len(payload) != 4 * dim:
            return None
        if zlib.crc32(payload) != header.get("crc32"):
            return None
        return torch.frombuffer(bytearray(payload), dtype=torch.float32)

    # -- writes ---------------------------------------------------------------------------------------------
    def put_many(self, identity: str, classes: Sequence[str], templates: Sequence[str],
                 embeddings: torch.Tensor) -> None:
        """Store row ``i`` of ``embeddings`` (``[C, D]``) for ``classes[i]``; I/O errors are ignored (a cache)."""
        if not self.enabled:
            return
        sha = templates_digest(templates)
        rows = embeddings.detach().to("cpu", torch.float32).contiguous()
        written = 0
        for name, row in zip(classes, rows, strict=True):
            written += self._write(self.path_for(identity, name, sha), self._header(identity, name, sha), row)
        if written:
            self._account(written)

    def _write(self, path: Path, header: dict[str, str], row: torch.Tensor) -> int:
        payload = row.numpy().astype("<f4").tobytes()
        meta = json.dumps({**header, "dim": int(row.numel()), "crc32": zlib.crc32(payload)}).encode("ascii")
        if len(meta) > MAX_HEADER_BYTES or row.numel() > MAX_DIM:
            return 0
        data = MAGIC + struct.pack("<I", len(meta)) + meta + payload
        if len(data) > self.max_bytes:
            return 0
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            tmp = None
        except OSError:
            return 0
        finally:
            if tmp is not None:
                self._remove(Path(tmp))
        with self._lock:
            self.writes += 1
        return len(data)

    def _account(self, written: int) -> None:
        with self._lock:
            if self._estimate is None:  # first write of this process: learn what the folder holds
                need_scan = True
            else:
                self._estimate += written
                need_scan = self._estimate > self.max_bytes
        if need_scan:
            self.evict()

    def evict(self) -> int:
        """Scan the folder; remove stale temporary files, then the least recently used files until the total is
        within 80% of ``max_bytes`` (when over ``max_bytes``). Returns the bytes left."""
        now = time.time()
        files: list[tuple[float, int, Path]] = []
        try:
            subdirs = [d for d in self.directory.iterdir() if d.is_dir()]
        except OSError:
            return 0
        for sub in subdirs:
            try:
                entries = list(os.scandir(sub))
            except OSError:
                continue
            for entry in entries:
                try:
                    st = entry.stat()
                except OSError:
                    continue
                if entry.name.startswith(TMP_PREFIX):
                    if now - st.st_mtime > STALE_TMP_S:
                        self._remove(Path(entry.path))
                elif entry.name.endswith(SUFFIX):
                    files.append((st.st_mtime, st.st_size, Path(entry.path)))
        total = sum(size for _, size, _ in files)
        if total > self.max_bytes:
            target = int(self.max_bytes * EVICT_TO)
            files.sort(key=lambda f: f[0])
            for _, size, path in files:
                if total <= target:
                    break
                if self._remove(path):
                    with self._lock:
                        self.evictions += 1
                total -= size
        with self._lock:
            self._estimate = total
        return total

    @staticmethod
    def _remove(path: Path) -> bool:
        try:
            path.unlink()
            return True
        except OSError:
            return False
