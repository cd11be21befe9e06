"""The fences around local paths and buckets: the one place that decides whether a URL may be touched.

Every use of a ``file://`` URL (image fetch, dataset manifest, ``output_path`` writes, ``pretrained_url``,
``model_url``) goes through :class:`FileFence`: refused unless ``CLS_ALLOW_FILE_URLS``; when
``CLS_FILE_ROOT`` is set, the path (``..`` and symlinks resolved first) must lie under the root.
Every ``s3://`` URL goes through :class:`BucketFence`: when ``CLS_S3_ALLOWED_BUCKETS`` is set, only
those buckets. http(s) is the fetcher's alone (private-network rule in ``handlers.fetch``).

Refusals are ``PermanentError(blocked_url)``; malformed URLs ``PermanentError(unsupported_url)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from handlers.errors import BLOCKED_URL, UNSUPPORTED_URL, PermanentError


def file_url_path(url: str) -> Path:
    """The local path of a ``file://`` URL (``file:///abs/path`` or ``file://localhost/abs/path``), unfenced."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        raise PermanentError(UNSUPPORTED_URL, f"not a file:// URL: {url!r}")
    if parts.netloc not in ("", "localhost"):
        raise PermanentError(UNSUPPORTED_URL, f"file:// URL with a remote host: {url!r}")
    path = unquote(parts.path)
    if not path.startswith("/") or "\x00" in path:
        raise PermanentError(UNSUPPORTED_URL, f"file:// URL without an absolute path: {url!r}")
    return Path(path)


def split_s3_url(url: str) -> tuple[str, str]:
    """``(bucket, key)`` of an ``s3://bucket/key`` URL, unfenced; the key may be empty (a prefix)."""
    if not url.startswith("s3://"):
        raise PermanentError(UNSUPPORTED_URL, f"not an s3:// URL: {url!r}")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise PermanentError(UNSUPPORTED_URL, f"s3 URL without a bucket: {url!r}")
    return bucket, key


@dataclass(frozen=True)
class FileFence:
    """``file://`` policy: allowed at all (``allow``), and under which directory (``root``, None: anywhere)."""

    allow: bool = False
    root: str | None = None

    def path(self, url: str) -> Path:
        """The resolved local path of ``url``; ``PermanentError(blocked_url)`` when the fence refuses it.

        Symlinks and ``..`` are resolved before the check (also for a path that does not exist yet: its
        existing ancestors are resolved), so a link inside the root cannot lead outside it.
        """
        if not self.allow:
            raise PermanentError(BLOCKED_URL, f"file:// URLs are not allowed (CLS_ALLOW_FILE_URLS): {url!r}")
        try:
            path = file_url_path(url).resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop, an unreadable ancestor
            raise PermanentError(BLOCKED_URL, f"{url!r} cannot be resolved ({type(exc).__name__})") from exc
        if self.root is not None and not path.is_relative_to(Path(self.root).expanduser().resolve()):
            raise PermanentError(BLOCKED_URL, f"{url!r} is outside the allowed directory (CLS_FILE_ROOT)")
        return path


@dataclass(frozen=True)
class BucketFence:
    """``s3://`` policy: the buckets a URL may name (None: any bucket the credentials reach)."""

    allowed: frozenset[str] | None = None

    @classmethod
    def from_names(cls, names: Iterable[str] | str | None) -> BucketFence:
        """From a list or a comma-separated string; empty means no restriction."""
        if isinstance(names, str):
            names = names.split(",")
        cleaned = frozenset(n.strip() for n in names or () if n.strip())
        return cls(cleaned or None)

    def bucket_key(self, url: str) -> tuple[str, str]:
        """``(bucket, key)`` of ``url``; ``PermanentError(blocked_url)`` for a bucket off the list."""
        bucket, key = split_s3_url(url)
        if self.allowed is not None and bucket not in self.allowed:
            raise PermanentError(BLOCKED_URL, f"bucket {bucket!r} is not allowed (CLS_S3_ALLOWED_BUCKETS)")
        return bucket, key
