"""URL fields: a scheme from an allowed set, a bounded length."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field

ALLOWED_URL_SCHEMES = frozenset({"http", "https", "s3", "file"})
"""Schemes a message may carry. Whether ``file://`` is honoured is a worker setting (off by default)."""

MAX_URL_LENGTH = 4096


def check_url(value: str) -> str:
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_URL_SCHEMES:
        allowed = ", ".join(sorted(ALLOWED_URL_SCHEMES))
        raise ValueError(f"URL scheme {parts.scheme or '(none)'!r} not allowed; use one of: {allowed}")
    if scheme in {"http", "https", "s3"} and not parts.netloc:
        raise ValueError(f"{scheme}:// URL needs a host/bucket")
    if scheme == "file" and not parts.path:
        raise ValueError("file:// URL needs a path")
    return value


Url = Annotated[str, Field(min_length=1, max_length=MAX_URL_LENGTH), AfterValidator(check_url)]


def check_output_url(value: str) -> str:
    scheme = urlsplit(value).scheme.lower()
    if scheme not in {"s3", "file"}:
        raise ValueError("output_path must be an s3:// (or, when enabled, file://) URL")
    return check_url(value)


OutputUrl = Annotated[str, Field(min_length=1, max_length=MAX_URL_LENGTH), AfterValidator(check_output_url)]
