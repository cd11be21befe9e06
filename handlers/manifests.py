"""JSON Lines manifests: one object per line, read through the fenced fetcher or the object store.

Used wherever a request names a large list by URL instead of inlining it: a training dataset's
``manifest_url`` (``{url, label, split}``), a few-shot support set's ``examples_url`` (``{url, label}``) and an
audit's ``manifest_url`` (``{id, url, label}``). Bounded in bytes and in lines; a bad line is reported by its
number and what is wrong with it, never by its content (the object may hold anything).
"""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from handlers.errors import HandlerError, PermanentError
from handlers.fetch import Fetcher

T = TypeVar("T", bound=BaseModel)

MAX_MANIFEST_BYTES = 256 * 1024 * 1024


def describe_without_content(exc: ValueError) -> str:
    """What is wrong with a manifest line, never the line's content."""
    if isinstance(exc, ValidationError):
        problems = [f"{'.'.join(str(p) for p in error['loc']) or 'line'}: {error['msg']}"
                    for error in exc.errors(include_input=False, include_url=False, include_context=False)]
        return "; ".join(problems[:5])
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON ({exc.msg} at column {exc.colno})"
    return type(exc).__name__


async def read_manifest_bytes(fetcher: Fetcher, url: str, *, max_bytes: int, error_code: str) -> bytes:
    """The manifest object: ``s3://`` through the object store, anything else through the fetcher (its
    scheme, size and network fences). A permanent failure becomes ``error_code``; a transient one is raised
    as is, so the runtime retries."""
    try:
        if url.startswith("s3://") and fetcher.store is not None:
            return await fetcher.store.get_bytes(url, max_bytes=max_bytes)
        return await fetcher.fetch(url)
    except HandlerError as exc:
        if exc.retryable:
            raise
        raise PermanentError(error_code, f"manifest {url}: {exc.code}: {exc.message}") from exc


def parse_manifest(raw: bytes, url: str, model: type[T], *, max_lines: int | None, error_code: str,
                   limit_name: str = "") -> list[T]:
    """Validated entries of a JSON Lines document (blank lines skipped). More than ``max_lines`` entries, or a
    bad line, is a ``PermanentError(error_code)`` naming the line number and the problem, not the content."""
    entries: list[T] = []
    for number, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        if max_lines is not None and len(entries) >= max_lines:
            limit = f" ({limit_name})" if limit_name else ""
            raise PermanentError(error_code, f"manifest {url} has more than {max_lines} entries, the limit{limit}")
        try:
            entries.append(model.model_validate(json.loads(line)))
        except ValueError as exc:
            raise PermanentError(error_code, f"manifest {url} line {number}: {describe_without_content(exc)}"[:500]) from exc
    return entries


async def read_manifest(fetcher: Fetcher, url: str, model: type[T], *, error_code: str,
                        max_lines: int | None = None, max_bytes: int = MAX_MANIFEST_BYTES, limit_name: str = "") -> list[T]:
    """Fetch and parse a JSON Lines manifest of ``model`` entries (see :func:`parse_manifest`)."""
    raw = await read_manifest_bytes(fetcher, url, max_bytes=max_bytes, error_code=error_code)
    return parse_manifest(raw, url, model, max_lines=max_lines, error_code=error_code, limit_name=limit_name)
