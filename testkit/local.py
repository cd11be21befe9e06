"""The local stack on loopback, for the demo, the benchmarks and the tests: free ports, a Kafka broker from
``deploy/local/kafka.sh``, an S3 API (moto), worker subprocesses and the settings that point them at it.

- ``free_port(pair=False)``: a free port on 127.0.0.1 (``pair``: PORT+1 free too, the broker's controller);
- ``LocalBroker(state_dir)``: ``start()`` / ``stop()`` / ``tool(...)`` (Kafka's own tools) / ``pid()``;
- ``LocalS3()``: moto's S3 server on 127.0.0.1, ``start()`` / ``stop()`` / ``endpoint_url``;
- ``WorkerProcess``: ``python -m MODULE ARGS`` with a log file; waits for a JSON log event (``async`` or
  blocking), reads its events and memory, stops with SIGTERM then SIGKILL; ``WorkerProcess.cli(kind, ...)``
  runs ``cls-worker KIND``;
- ``worker_env(bootstrap, state_dir)``: the settings of a worker on this stack (random CLIP weights unless
  set, loopback images allowed, JSON logs, state under ``state_dir``).

Every wait is bounded; every server binds 127.0.0.1. Kafka clients and per-run topics: ``testkit.kafka``;
images and image servers: ``testkit.images``.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
KAFKA_SH = REPO / "deploy" / "local" / "kafka.sh"


def free_port(pair: bool = False) -> int:
    """A free port on 127.0.0.1; with ``pair``, PORT+1 is free too (the local broker's controller)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not pair:
            return port
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair on 127.0.0.1")


_PRCTL = None


def set_parent_death_signal() -> None:
    """``preexec_fn`` for a child: SIGTERM when the parent dies (Linux), so a killed benchmark or demo leaves
    nothing behind. Only for processes started from one thread (a forked child calls no loader)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


try:  # resolved here, in the parent: the child only calls it
    _PRCTL = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except (OSError, AttributeError):
    pass


# -- Kafka ---------------------------------------------------------------------------------------


class LocalBroker:
    """A single-node KRaft broker from ``deploy/local/kafka.sh`` on a free port pair (or ``port``), with its
    state under ``state_dir`` (a fresh temporary folder, removed by ``stop``, when not given)."""

    def __init__(self, state_dir: Path | None = None, port: int | None = None) -> None:
        self.port = port or free_port(pair=True)
        self._owns_state = state_dir is None
        self.state_dir = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="cls-kafka-"))
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
        self.env.update(KAFKA_PORT=str(self.port), KAFKA_STATE_DIR=str(self.state_dir))
        self.started = False

    def start(self, timeout_s: float = 300) -> str:
        """Start the broker and wait until it answers; returns the bootstrap address."""
        self.started = True  # from here on, stop() runs kafka.sh stop
        result = subprocess.run([str(KAFKA_SH), "start"], env=self.env, capture_output=True, text=True,
                                timeout=timeout_s)
        if result.returncode != 0:
            raise RuntimeError(f"local Kafka broker failed to start ({result.returncode}):\n"
                               f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        for line in result.stdout.splitlines():
            if line.startswith("KAFKA_BOOTSTRAP_SERVERS="):
                self.bootstrap = line.split("=", 1)[1].strip()
        return self.bootstrap

    def stop(self) -> None:
        if self.started:
            self.started = False
            try:
                subprocess.run([str(KAFKA_SH), "stop"], env=self.env, capture_output=True, timeout=90)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self._owns_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def pid(self) -> int | None:
        try:
            return int((self.state_dir / "kafka.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def tool(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run one of Kafka's own tools (kafka.sh topics|consumer-groups|...) against this broker."""
        env = {**self.env, "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap}
        return subprocess.run([str(KAFKA_SH), *args], env=env, capture_output=True, text=True, timeout=timeout)


# -- S3 ------------------------------------------------------------------------------------------


class LocalS3:
    """moto's S3 server on 127.0.0.1 (a free port), in a process of its own (``testkit.s3server``, ended with
    this one): requests are served on another core than the client's (in a thread of the client's process,
    both shared one GIL, and uploading the 1,797 digits took twice as long)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._errors: Any = None  # the server's stderr, shown when it fails to start
        self.endpoint_url = ""

    def start(self, timeout_s: float = 60) -> str:
        self._errors = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen([sys.executable, "-m", "testkit.s3server"], cwd=REPO, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=self._errors, text=True,
                                      preexec_fn=set_parent_death_signal)
        line = _read_line(self._proc, timeout_s)
        if not line.startswith("PORT="):
            self._errors.seek(0)
            errors = self._errors.read()[-3000:]
            self.stop()
            raise RuntimeError(f"the S3 API server did not start: {line!r}\n{errors}")
        self.endpoint_url = f"http://127.0.0.1:{int(line.split('=', 1)[1])}"
        return self.endpoint_url

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        errors, self._errors = self._errors, None
        if errors is not None:
            errors.close()


def _read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """The first line ``proc`` prints, or '' when it exits or ``timeout_s`` passes first."""
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            return ""
    return proc.stdout.readline().strip()


def _moto_server() -> Any:
    """moto's ThreadedMotoServer on 127.0.0.1 (free port), sending a single ``Server`` header.

    Werkzeug adds its own ``Server`` header next to moto's; aiohttp's strict response parser (used
    under ``python -X dev`` or ``PYTHONASYNCIODEBUG=1``) rejects the duplicate, so drop Werkzeug's.
    """
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    class SingleServerHeaderHandler(MotoRequestHandler):
        def send_header(self, keyword: str, value: str) -> None:
            if keyword.lower() == "server" and value == self.version_string():
                return
            super().send_header(keyword, value)

    class LoopbackMotoServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = DomainDispatcherApplication(create_backend_app)
            self._server = make_server(
                self._ip_address, self._port, app, True, request_handler=SingleServerHeaderHandler
            )
            self._server_ready_event.set()
            self._server.serve_forever()

    return LoopbackMotoServer(ip_address="127.0.0.1", port=0, verbose=False)


# -- workers -------------------------------------------------------------------------------------


def worker_env(bootstrap: str, state_dir: Path, **settings: str) -> dict[str, str]:
    """Environment of a worker on this stack: the broker, random CLIP weights (no model hub here) unless the
    environment names real ones, images on 127.0.0.1 allowed, JSON logs, models and caches under
    ``state_dir``; ``settings`` (``CLS_*=...``) last."""
    state_dir = Path(state_dir)
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "CLS_CLIP_WEIGHTS": os.environ.get("CLS_CLIP_WEIGHTS", "random"),
        "CLS_ALLOW_PRIVATE_NETWORKS": "true",  # the stack's images are served on 127.0.0.1
        "CLS_MODEL_DIR": str(state_dir / "models"),
        "CLS_TRAINING_WORK_DIR": str(state_dir / "training"),
        "CLS_DATASET_CACHE_DIR": str(state_dir / "images"),
        "CLS_LOG_FORMAT": "json",
    }
    env.update(settings)
    return env


class WorkerProcess:
    """A worker run as a real subprocess (``python -m MODULE ARGS``, its own session) with a log file.

    ``die_with_parent``: the child gets SIGTERM when this process dies (for scripts started from one thread;
    a test session leaves it off and stops its workers in ``finally``).
    """

    def __init__(self, module: str, args: list[str], env: dict[str, str], log_path: Path,
                 die_with_parent: bool = False) -> None:
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "ab")
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], env=full_env, cwd=REPO,
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True,
                                     preexec_fn=set_parent_death_signal if die_with_parent else None)

    @classmethod
    def cli(cls, kind: str, env: dict[str, str], log_path: Path, die_with_parent: bool = False) -> WorkerProcess:
        """``cls-worker KIND`` (annotation, training)."""
        return cls("consumers.cli", [kind], env, log_path, die_with_parent=die_with_parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def log_events(self, name: str | None = None) -> list[dict]:
        """The JSON log lines so far (those whose ``event`` is ``name``, when given)."""
        events = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if name is None or event.get("event") == name:
                    events.append(event)
        return events

    def _check(self, event: str, count: int) -> dict | None:
        matches = self.log_events(event)
        if len(matches) >= count:
            return matches[count - 1]
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited ({self.proc.returncode}) before {event!r}:\n{self.log_tail()}")
        return None

    async def wait_for_log(self, event: str, timeout_s: float = 60, count: int = 1) -> dict:
        """The ``count``-th log event named ``event``; AssertionError when the worker exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self._check(event, count)
            if found is not None:
                return found
            await asyncio.sleep(0.1)
        raise AssertionError(f"no {event!r} log within {timeout_s}s:\n{self.log_tail()}")

    def wait_for_log_blocking(self, event: str, timeout_s: float = 60, count: int = 1) -> dict:
        """``wait_for_log`` for code outside an event loop."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self._check(event, count)
            if found is not None:
                return found
            time.sleep(0.2)
        raise AssertionError(f"no {event!r} log within {timeout_s}s:\n{self.log_tail()}")

    async def wait_exit(self, timeout_s: float = 60) -> int:
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"worker did not exit within {timeout_s}s:\n{self.log_tail()}")
            await asyncio.sleep(0.1)
        return self.proc.returncode

    def memory(self) -> dict[str, int]:
        """``VmHWM`` (peak) and ``VmRSS`` in bytes, while the process runs."""
        out = {}
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(("VmHWM:", "VmRSS:")):
                        key, value = line.split(":", 1)
                        out[key] = int(value.split()[0]) * 1024
        except OSError:
            pass
        return out

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM (the worker drains), SIGKILL after ``timeout_s``; then close the log."""
        self.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        self._log.close()

    def close(self) -> None:
        """SIGKILL at once (tests that are done with a worker); then close the log."""
        self.kill()
        self._log.close()
