"""Object keys built from request data, and local paths built from object keys: each stays under its prefix.

- :func:`key_segment`: one path segment from request data (a request id), percent-encoded so that it stays
  one segment, and never ``.`` or ``..``, even once decoded (a request id of ``..`` or ``a/../..`` would
  otherwise put its files above ``output_path`` wherever the URL is decoded and resolved: a file:// store,
  an S3-compatible server that normalises paths).
- :func:`local_child`: the local path of an object key under a local directory (weights downloaded from an
  ``s3://`` prefix); a key whose path leaves the directory (``../``, an absolute path) is refused with
  :class:`KeyOutsidePrefix`.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from urllib.parse import quote

from handlers.errors import PermanentError


class KeyOutsidePrefix(PermanentError):
    """An object key (or a path built from one) would lie outside the prefix or directory it belongs to."""


def key_segment(text: str) -> str:
    """``text`` as one object-key segment that stays one segment even once URL-decoded (a ``file://`` store
    decodes the URL to a path): percent-encoded twice, so ``a/../b`` becomes ``a%252F..%252Fb`` (a plain id of
    letters, digits and ``-_.~`` is kept as it is). A segment of dots only (``.``, ``..``) has each dot
    encoded (``%252E``), so it never names a directory step; an empty one becomes ``%2500``."""
    if text.strip(".") == "":
        return "%252E" * len(text) or "%2500"
    return quote(quote(text, safe="-_."), safe="-_.")


def local_child(root: Path, relative: str, code: str) -> Path:
    """``root / relative`` when that path lies under ``root``; else ``KeyOutsidePrefix(code)``.

    ``relative`` is an object key's part below its prefix; it must be a plain relative path (no ``..``
    segment, not absolute, no empty or NUL name), checked on the text before any file is touched."""
    parts = PurePosixPath(relative).parts
    if (not relative or relative.startswith("/") or "\x00" in relative or "\\" in relative
            or any(part in ("..", ".") for part in relative.split("/")) or not parts):
        raise KeyOutsidePrefix(code, f"object key part {relative[:200]!r} would lie outside {root.name}/")
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):  # a symlink inside the directory
        raise KeyOutsidePrefix(code, f"object key part {relative[:200]!r} would lie outside {root.name}/")
    return path
