"""JSON Lines manifests: one object per line, streamed through the fenced fetcher or the object store.

Used wherever a request names a large list by URL instead of inlining it: a training dataset's
``manifest_url`` (``{url, label, split}``), a few-shot support set's ``examples_url`` (``{url, label}``) and an
audit's ``manifest_url`` (``{id, url, label}``).

A manifest is never whole in memory, and never parsed on the event loop: its bytes arrive chunk by chunk,
are gathered into blocks of about a MiB and each block's complete lines are parsed and validated in the CPU
pool, so the memory is the entries kept (each as compact as its caller's ``convert`` makes it) plus one
block. Bounded (:class:`ManifestLimits`, settings ``CLS_MANIFEST_MAX_BYTES``, ``CLS_MANIFEST_MAX_LINE_BYTES``
and a caller's line limit): over a bound the read stops at once. A bad line is reported by its number and
what is wrong with it, never by its content (the object may hold anything); JSON nested too deeply is one
such problem, never an internal error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from handlers.errors import HandlerError, PermanentError
from handlers.executor import Executors
from handlers.fetch import Fetcher

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

BLOCK_BYTES = 1024 * 1024
"""Bytes gathered before a block of lines goes to the CPU pool (fewer hops than one per network chunk)."""


@dataclass(frozen=True)
class ManifestLimits:
    """Bounds of every manifest (``consumers.worker.manifest_limits`` builds them from ``CLS_MANIFEST_*``; the
    defaults live in ``consumers.settings`` only); a caller may lower ``max_lines`` for its own kind."""

    max_bytes: int  # CLS_MANIFEST_MAX_BYTES
    max_line_bytes: int  # CLS_MANIFEST_MAX_LINE_BYTES
    max_lines: int  # CLS_MANIFEST_MAX_LINES: entries of a training manifest


def describe_without_content(exc: Exception) -> str:
    """What is wrong with a manifest line, never the line's content."""
    if isinstance(exc, ValidationError):
        problems = [f"{'.'.join(str(p) for p in error['loc']) or 'line'}: {error['msg']}"
                    for error in exc.errors(include_input=False, include_url=False, include_context=False)]
        return "; ".join(problems[:5])
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON ({exc.msg} at column {exc.colno})"
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    return type(exc).__name__


class ManifestError(PermanentError):
    """A manifest's content breaks a rule (a bad or too long line, too many entries)."""


class ManifestParser(Generic[M, T]):
    """Parses a manifest fed in blocks of bytes (``feed``, then ``finish``); synchronous, for the CPU pool."""

    def __init__(self, url: str, model: type[M], *, error_code: str, max_lines: int, max_line_bytes: int,
                 limit_name: str = "", convert: Callable[[M], T] | None = None) -> None:
        self.url = url
        self.model = model
        self.error_code = error_code
        self.max_lines = max_lines
        self.max_line_bytes = max_line_bytes
        self.limit_name = limit_name
        self.convert = convert
        self.entries: list[Any] = []
        self._pending = b""
        self._number = 0

    def feed(self, data: bytes) -> None:
        """Parse every complete line of ``data`` (after what was left of the previous block)."""
        buffer = self._pending + data if self._pending else data
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            self._line(buffer[start:end])
            start = end + 1
        self._pending = buffer[start:]
        if len(self._pending) > self.max_line_bytes:
            self._too_long(self._number + 1)

    def finish(self) -> list[Any]:
        """The last line (without a final newline), then every entry in order."""
        if self._pending:
            self._line(self._pending)
            self._pending = b""
        return self.entries

    def _too_long(self, number: int) -> None:
        raise ManifestError(self.error_code, f"manifest {self.url} line {number} is longer than "
                                              f"{self.max_line_bytes} bytes (CLS_MANIFEST_MAX_LINE_BYTES)")

    def _line(self, raw: bytes) -> None:
        self._number += 1
        if len(raw) > self.max_line_bytes:
            self._too_long(self._number)
        if not raw.strip():
            return
        if len(self.entries) >= self.max_lines:
            limit = f" ({self.limit_name})" if self.limit_name else ""
            raise ManifestError(self.error_code, f"manifest {self.url} has more than {self.max_lines} entries, "
                                                  f"the limit{limit}")
        try:
            entry = self.model.model_validate(json.loads(raw.decode("utf-8", "replace")))
        except (ValueError, RecursionError) as exc:
            raise ManifestError(self.error_code, f"manifest {self.url} line {self._number}: "
                                                  f"{describe_without_content(exc)}"[:500]) from None
        self.entries.append(self.convert(entry) if self.convert is not None else entry)


async def read_manifest(fetcher: Fetcher, url: str, model: type[M], *, executors: Executors, error_code: str,
                        limits: ManifestLimits, max_lines: int | None = None,
                        max_bytes: int | None = None, limit_name: str = "CLS_MANIFEST_MAX_LINES",
                        convert: Callable[[M], T] | None = None) -> list[T]:
    """Stream and parse a JSON Lines manifest of ``model`` entries (``convert``ed when given), in the CPU pool.

    ``s3://`` goes through the object store, anything else through the fetcher (its scheme and network
    fences). Bounded by ``limits`` (``max_lines`` and ``max_bytes`` may lower them; ``limit_name`` is the
    setting named when the line limit is hit). A permanent failure becomes ``PermanentError(error_code)``; a
    transient one is raised as is, so the runtime retries."""
    byte_limit = min(limits.max_bytes, max_bytes) if max_bytes is not None else limits.max_bytes
    line_limit = min(limits.max_lines, max_lines) if max_lines is not None else limits.max_lines
    parser: ManifestParser[M, Any] = ManifestParser(url, model, error_code=error_code, max_lines=line_limit,
                                                    max_line_bytes=limits.max_line_bytes, limit_name=limit_name,
                                                    convert=convert)
    block: list[bytes] = []
    gathered = 0

    async def sink(chunk: bytes) -> None:
        nonlocal gathered
        block.append(chunk)
        gathered += len(chunk)
        if gathered >= BLOCK_BYTES:
            data = b"".join(block)
            block.clear()
            gathered = 0
            await executors.on_cpu(parser.feed, data)

    try:
        if url.startswith("s3://") and fetcher.store is not None:
            await fetcher.store.read_into(url, sink, max_bytes=byte_limit)
        else:
            await fetcher.fetch_into(url, sink, max_bytes=byte_limit)
    except ManifestError:
        raise
    except PermanentError as exc:
        setting = " (CLS_MANIFEST_MAX_BYTES)" if exc.code == "too_large" and byte_limit == limits.max_bytes else ""
        raise PermanentError(error_code, f"manifest {url}: {exc.code}: {exc.message}{setting}") from exc
    except HandlerError as exc:
        if exc.retryable:
            raise
        raise PermanentError(error_code, f"manifest {url}: {exc.code}: {exc.message}") from exc
    data = b"".join(block)
    block.clear()
    if data:
        await executors.on_cpu(parser.feed, data)
    return await executors.on_cpu(parser.finish)
