"""Run a pipeline as a long-lived worker process: logging, signals, start-up errors, exit codes."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import structlog
from aiokafka.errors import KafkaError

from consumers.runtime import ConsumerRuntime

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
        log.error("kafka_unavailable", error="; ".join(bootstrap_errors.errors) or f"{type(exc).__name__}: {exc}",
                  bootstrap_servers=runtime.settings.kafka.bootstrap_servers,
                  hint="check KAFKA_BOOTSTRAP_SERVERS, KAFKA_SECURITY_PROTOCOL and the SASL credentials")
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


def _signalled(runtime: ConsumerRuntime, sig: signal.Signals) -> Callable[[], None]:
    def handler() -> None:
        log.info("signal_received", signal=sig.name)
        runtime.stop()

    return handler
