"""Run a pipeline as a long-lived worker process: logging, signals, start-up errors, exit codes; and the I/O
both workers build from the settings (object store, URL fetcher, decode limits), here so that the training
worker does not import the annotation worker's model stack."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

import structlog
from aiokafka.errors import KafkaError

from consumers.runtime import ConsumerRuntime
from consumers.settings import Settings, WorkerSettings
from handlers.fetch import Fetcher, FetchLimits
from handlers.images import DecodeBudget, DecodeLimits
from handlers.manifests import ManifestLimits
from handlers.storage import ObjectStore

log = structlog.get_logger("cls.worker")

EXIT_OK = 0
EXIT_STARTUP_FAILED = 2


class _BootstrapErrors(logging.Filter):
    """aiokafka logs why each bootstrap host failed (e.g. SaslAuthenticationFailed), then raises a bare
    "Unable to bootstrap": keep those lines out of the log; serve() reports the cause once."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith('Unable connect to "'):  # only client.bootstrap() logs this form
            self.errors.append(record.getMessage())
            return False
        return True


def fetch_limits(settings: Settings) -> FetchLimits:
    w = settings.worker
    return FetchLimits(
        max_bytes=w.fetch_max_bytes, connect_timeout_s=w.fetch_connect_timeout_s, read_timeout_s=w.fetch_read_timeout_s,
        total_timeout_s=w.fetch_total_timeout_s, max_redirects=w.fetch_max_redirects, concurrency=w.fetch_concurrency,
        allow_private_networks=w.allow_private_networks, allow_file_urls=w.allow_file_urls, file_root=w.file_root,
    )


def decode_limits(settings: Settings) -> DecodeLimits:
    """Per-image limits and the worker's one shared decode budget."""
    w = settings.worker
    return DecodeLimits(max_pixels=w.max_image_pixels, max_aspect_ratio=w.max_aspect_ratio,
                        budget=DecodeBudget(w.decode_memory_mb * 1024 * 1024))


def manifest_limits(w: WorkerSettings) -> ManifestLimits:
    """Bounds of every manifest a request names (``CLS_MANIFEST_*``)."""
    return ManifestLimits(max_bytes=w.manifest_max_bytes, max_line_bytes=w.manifest_max_line_bytes,
                          max_lines=w.manifest_max_lines)


@contextlib.asynccontextmanager
async def storage_and_fetcher(settings: Settings):
    """The object store and the URL fetcher every worker uses (fetching s3:// goes through the store)."""
    w = settings.worker
    store = ObjectStore(endpoint_url=w.s3_endpoint_url, region=w.s3_region, allow_file_urls=w.allow_file_urls,
                        file_root=w.file_root, allowed_buckets=w.s3_allowed_buckets)
    async with store, Fetcher(fetch_limits(settings), store=store) as fetcher:
        yield store, fetcher


def configure_torch_threads(threads: int | None) -> None:
    """Apply CLS_TORCH_THREADS (a 2-core box shared by several workers wants 1 or 2)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(max(1, min(threads, 2)))
        except RuntimeError:  # already set once in this process
            pass


async def serve(runtime: ConsumerRuntime, *, on_stop: Callable[[], Awaitable[None]] | None = None) -> int:
    """Run ``runtime`` until SIGTERM/SIGINT; returns the process exit code."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _signalled(runtime, sig))
    bootstrap_errors = _BootstrapErrors()
    logging.getLogger("aiokafka").addFilter(bootstrap_errors)
    try:
        await runtime.run()
    except KafkaError as exc:
        error = "; ".join(bootstrap_errors.errors) or f"{type(exc).__name__}: {exc}"
        log.error("kafka_unavailable", error=error, bootstrap_servers=runtime.settings.kafka.bootstrap_servers,
                  hint=_hint(error))
        return EXIT_STARTUP_FAILED
    except (OSError, ValueError) as exc:
        log.error("startup_failed", error=f"{type(exc).__name__}: {exc}")
        return EXIT_STARTUP_FAILED
    finally:
        logging.getLogger("aiokafka").removeFilter(bootstrap_errors)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if on_stop is not None:
            await on_stop()
    return EXIT_OK


def _hint(error: str) -> str:
    """What to check, from what the connection failed on."""
    if "CERTIFICATE_VERIFY_FAILED" in error:
        return ("the broker's certificate was refused: KAFKA_SSL_CAFILE must hold the CA that signed it (unset: the "
                "system's CAs), the certificate must be within its validity dates, and KAFKA_BOOTSTRAP_SERVERS must "
                "name a host the certificate is for")
    if "SSL" in error or "closed" in error:
        return ("check KAFKA_SECURITY_PROTOCOL (SSL / SASL_SSL for a TLS listener) and, where the broker requires a "
                "client certificate, KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE")
    return "check KAFKA_BOOTSTRAP_SERVERS, KAFKA_SECURITY_PROTOCOL and the SASL credentials"


def _signalled(runtime: ConsumerRuntime, sig: signal.Signals) -> Callable[[], None]:
    def handler() -> None:
        log.info("signal_received", signal=sig.name)
        runtime.stop()

    return handler
