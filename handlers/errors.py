"""Handler error types: the control flow between handlers and the consumer runtime.

- ``PermanentError``: the request cannot succeed; it becomes a ``failed`` event.
- ``RetryableError``: a transient failure; the consumer retries with backoff, then publishes ``failed``.
- ``ImageError``: one image failed; the handler writes an error entry for that image and goes on.

Every error carries a stable machine-readable ``code`` (the constants below) and a human ``message``.
"""

from __future__ import annotations

# Image error codes (ImageError.code).
FETCH_FAILED = "fetch_failed"
HTTP_STATUS = "http_status"
TIMEOUT = "timeout"
TOO_LARGE = "too_large"
TOO_MANY_PIXELS = "too_many_pixels"  # also: the decode memory estimate exceeds the whole budget
BAD_ASPECT_RATIO = "bad_aspect_ratio"
BLOCKED_URL = "blocked_url"
NOT_AN_IMAGE = "not_an_image"
DECODE_FAILED = "decode_failed"
UNSUPPORTED_URL = "unsupported_url"

# Whole-request error code of a request that cannot be valid here.
INVALID_REQUEST = "invalid_request"

# Object storage error codes (PermanentError / RetryableError raised by handlers.storage).
STORAGE_NOT_FOUND = "storage_not_found"  # object or bucket missing on read
STORAGE_FORBIDDEN = "storage_forbidden"  # access denied / no credentials on read
STORAGE_UNWRITABLE = "storage_unwritable"  # bucket missing, invalid or access denied on write
STORAGE_UNAVAILABLE = "storage_unavailable"  # connection errors, 5xx, throttling (retryable)


class HandlerError(Exception):
    """Base of every error a handler raises on purpose."""

    retryable: bool = False

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class PermanentError(HandlerError):
    """The work cannot succeed as requested: becomes a failed event."""

    retryable = False


class RetryableError(HandlerError):
    """A transient failure: the consumer retries with backoff, then publishes a failed event."""

    retryable = True


class ImageError(PermanentError):
    """One image failed: the handler reports an error entry for that image only."""


class InvalidRequest(PermanentError):
    """The request breaks a limit or rule the schema cannot check alone: a failed event ``invalid_request``."""

    def __init__(self, message: str) -> None:
        super().__init__(INVALID_REQUEST, message)
