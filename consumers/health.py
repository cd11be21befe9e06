"""Prometheus ``/metrics``, ``/healthz`` (process and event loop alive) and ``/readyz`` (connected to
Kafka, models warm) on ``CLS_METRICS_PORT`` (off when unset)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumers import metrics
from consumers.settings import Settings

log = structlog.get_logger("cls.health")


class HealthServer:
    def __init__(self, settings: Settings, runtime, models_ready: Callable[[], bool] = lambda: True) -> None:
        self.settings = settings
        self.runtime = runtime
        self.models_ready = models_ready
        self._runner: web.AppRunner | None = None
        self._tick = time.monotonic()
        self._ticker: asyncio.Task[None] | None = None
        self.port: int | None = None

    async def start(self) -> None:
        port = self.settings.worker.metrics_port
        if port is None:
            return
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.worker.metrics_host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ticker = asyncio.create_task(self._tick_loop())
        log.info("health_server_started", port=self.port)

    async def _tick_loop(self) -> None:
        while True:
            self._tick = time.monotonic()
            await asyncio.sleep(1)

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, _request: web.Request) -> web.Response:
        observe = getattr(self.runtime, "observe_oldest", None)
        if observe is not None:
            observe()
        try:
            import torch

            if torch.cuda.is_available():
                metrics.GPU_MEMORY_BYTES.set(torch.cuda.memory_allocated())
        except Exception:  # noqa: BLE001 - metrics never fail the endpoint
            pass
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _request: web.Request) -> web.Response:
        lag = time.monotonic() - self._tick
        if lag > 30:
            return web.json_response({"status": "event loop stalled", "stalled_s": round(lag, 1)}, status=503)
        return web.json_response({"status": "ok"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        ready = bool(getattr(self.runtime, "ready", False)) and self.models_ready()
        stuck_of = getattr(self.runtime, "stuck_partitions", None)
        stuck = stuck_of() if stuck_of is not None else {}
        body: dict[str, object] = {"ready": ready and not stuck}
        if stuck:
            body["stuck_partitions"] = {str(p): age for p, age in stuck.items()}
        return web.json_response(body, status=200 if body["ready"] else 503)
