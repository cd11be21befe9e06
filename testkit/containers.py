"""Containers for a backend's integration tests: Kafka, an S3 API and the two workers, wired together.

Built on testcontainers (``pip install 'cls-workers[testkit]'``: the light distribution, no ML stack here;
docs/client.md). Every image is a parameter (:class:`Images`): the local builds of
``deploy/images/build-local.sh`` by default (the CPU worker image ``cls-workers:cpu``), the published ones
elsewhere (``Images.published("registry.example.com/cls-workers:0.1.0")``: ``apache/kafka`` and
``motoserver/moto``, which take the same settings as the local Kafka and S3 images).

    from testkit.containers import WorkerStack

    with WorkerStack() as stack:                 # network, Kafka, S3 API, topics, both workers
        stack.bootstrap_servers                  # "127.0.0.1:<port>", for the backend's producer/consumer
        stack.s3.client().put_object(...)        # boto3 client on the S3 API
        stack.annotation.wait_ready()            # /readyz answered 200 (model loaded, consumer joined)

Containers talk to each other on a private Docker network by alias (``kafka:9092``, ``http://s3:5000``);
the host reaches Kafka, the S3 API and each worker's metrics port on ``127.0.0.1`` only. Workers
run with random weights by default (no model hub needed), or with a weights file mounted read-only.
Nothing here pulls an image that is missing unless testcontainers' own rules say so; the Ryuk reaper is
disabled when its image is not present (the stack removes its own containers and network on exit).
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORKER_IMAGE_ENV = "CLS_WORKER_IMAGE"
KAFKA_IMAGE_ENV = "CLS_KAFKA_IMAGE"
S3_IMAGE_ENV = "CLS_S3_IMAGE"

KAFKA_ALIAS = "kafka"
S3_ALIAS = "s3"
KAFKA_INTERNAL_PORT = 9092
KAFKA_HOST_LISTENER_PORT = 19092
S3_PORT = 5000
METRICS_PORT = 9400
ACCESS_KEY_ID = "testing"
SECRET_ACCESS_KEY = "testing"
REGION = "us-east-1"

#: Annotation settings for a worker without the model hub: the tiny CLIP config shipped in the package.
RANDOM_CLIP_ENV = {"CLS_CLIP_VARIANT": "cls-tiny-clip", "CLS_CLIP_WEIGHTS": "random", "CLS_PRELOAD_MODELS": "clip",
                   "CLS_DEFAULT_PROMPT_TEMPLATES": "a photo of a {}."}


class NoEngine(RuntimeError):
    """No Docker engine answers (``docker info`` fails or the socket is missing)."""


@dataclass(frozen=True)
class Images:
    """Which image runs each container."""

    worker: str = "cls-workers:cpu"  # the CPU image (TORCH=cpu); the GPU build is cls-workers:local
    kafka: str = "cls-kafka:local"
    s3: str = "cls-s3:local"

    @classmethod
    def from_env(cls) -> Images:
        """``CLS_WORKER_IMAGE``, ``CLS_KAFKA_IMAGE``, ``CLS_S3_IMAGE``, else the local builds."""
        d = cls()
        return cls(worker=os.environ.get(WORKER_IMAGE_ENV, d.worker), kafka=os.environ.get(KAFKA_IMAGE_ENV, d.kafka),
                   s3=os.environ.get(S3_IMAGE_ENV, d.s3))

    @classmethod
    def published(cls, worker: str, kafka: str = "apache/kafka:3.9.1", s3: str = "motoserver/moto:5.1.4") -> Images:
        """The images a registry serves (the worker image is yours: tag it where you push it)."""
        return cls(worker=worker, kafka=kafka, s3=s3)


def engine_answers(timeout_s: float = 10) -> bool:
    """True when a Docker engine answers a ping."""
    try:
        import docker

        client = docker.from_env(timeout=int(timeout_s))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means "no engine"
        return False


def missing_images(images: Images) -> list[str]:
    """The images of ``images`` the engine does not have locally."""
    import docker

    client = docker.from_env()
    try:
        missing = []
        for name in (images.worker, images.kafka, images.s3):
            try:
                client.images.get(name)
            except docker.errors.ImageNotFound:
                missing.append(name)
        return missing
    finally:
        client.close()


def _configure_reaper() -> None:
    """Disable testcontainers' Ryuk reaper when its image is not present locally (no registry here)."""
    from testcontainers.core.config import testcontainers_config as config

    if "TESTCONTAINERS_RYUK_DISABLED" in os.environ:
        return
    import docker

    client = docker.from_env()
    try:
        client.images.get(config.ryuk_image)
    except docker.errors.ImageNotFound:
        config.ryuk_disabled = True
    finally:
        client.close()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, timeout_s: float, what: str, logs=None) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            tail = f"\n--- logs ---\n{logs()[-4000:]}" if logs else ""
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}{tail}")
        time.sleep(0.25)


def _container_class():  # noqa: ANN202 - imported late: testcontainers is an optional dependency
    from testcontainers.core.container import DockerContainer

    return DockerContainer


class _Node:
    """One container of the stack: a testcontainers ``DockerContainer`` plus the stack's conventions."""

    def __init__(self, image: str, network, alias: str) -> None:  # noqa: ANN001
        self.alias = alias
        self.container = _container_class()(image).with_network(network).with_network_aliases(alias)
        self.container.with_name(f"{alias}-{uuid.uuid4().hex[:8]}")

    @property
    def docker(self):  # noqa: ANN201 - docker-py Container
        return self.container.get_wrapped_container()

    def logs(self) -> str:
        out, err = self.container.get_logs()
        return (out + err).decode(errors="replace")

    def remove(self) -> None:
        try:
            self.container.stop()
        except Exception:  # noqa: BLE001 - already gone
            pass


class KafkaNode(_Node):
    """One KRaft broker: ``kafka:9092`` on the network, ``127.0.0.1:<port>`` from the host."""

    def __init__(self, image: str, network, alias: str = KAFKA_ALIAS) -> None:  # noqa: ANN001
        super().__init__(image, network, alias)
        self.host_port = free_port()
        _publish(self.container, KAFKA_HOST_LISTENER_PORT, self.host_port)
        self.container.with_envs(
            KAFKA_NODE_ID="1",
            KAFKA_PROCESS_ROLES="broker,controller",
            KAFKA_LISTENERS=f"PLAINTEXT://:{KAFKA_INTERNAL_PORT},CONTROLLER://:9093,HOST://:{KAFKA_HOST_LISTENER_PORT}",
            KAFKA_ADVERTISED_LISTENERS=f"PLAINTEXT://{alias}:{KAFKA_INTERNAL_PORT},HOST://127.0.0.1:{self.host_port}",
            KAFKA_LISTENER_SECURITY_PROTOCOL_MAP="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,HOST:PLAINTEXT",
            KAFKA_CONTROLLER_LISTENER_NAMES="CONTROLLER",
            KAFKA_INTER_BROKER_LISTENER_NAME="PLAINTEXT",
            KAFKA_CONTROLLER_QUORUM_VOTERS="1@localhost:9093",
            KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR="1",
            KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS="12",
            KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR="1",
            KAFKA_TRANSACTION_STATE_LOG_MIN_ISR="1",
            KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS="0",
            KAFKA_AUTO_CREATE_TOPICS_ENABLE="false",
            KAFKA_HEAP_OPTS="-Xms256m -Xmx512m",
        )

    @property
    def bootstrap_servers(self) -> str:
        """For clients on the host."""
        return f"127.0.0.1:{self.host_port}"

    @property
    def internal_bootstrap_servers(self) -> str:
        """For containers on the stack's network."""
        return f"{self.alias}:{KAFKA_INTERNAL_PORT}"

    def start(self, timeout_s: float = 120) -> KafkaNode:
        self.container.start()
        _wait(lambda: "Kafka Server started" in self.logs() and _port_open(self.host_port), timeout_s,
              "Kafka to start", self.logs)
        return self


class S3Node(_Node):
    """An S3 API (moto's server): ``http://s3:5000`` on the network, ``http://127.0.0.1:<port>`` from the host."""

    def __init__(self, image: str, network, alias: str = S3_ALIAS) -> None:  # noqa: ANN001
        super().__init__(image, network, alias)
        self.host_port = free_port()
        _publish(self.container, S3_PORT, self.host_port)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.host_port}"

    @property
    def internal_endpoint_url(self) -> str:
        return f"http://{self.alias}:{S3_PORT}"

    def client(self):  # noqa: ANN201 - boto3 S3 client
        """A boto3 S3 client on this server (the test credentials)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY)

    def start(self, timeout_s: float = 60) -> S3Node:
        self.container.start()

        def answers() -> bool:
            try:
                self.client().list_buckets()
                return True
            except Exception:  # noqa: BLE001 - not up yet
                return False

        _wait(answers, timeout_s, "the S3 API to answer", self.logs)
        return self


@dataclass
class WorkerSpec:
    """How to run one worker container."""

    kind: str  # "annotation" | "training"
    env: Mapping[str, str] = field(default_factory=dict)
    #: a weights file mounted read-only at /weights/<name>; the CLS_* variable to point at it
    weights_file: Path | None = None
    weights_env: str = "CLS_CLIP_WEIGHTS"
    #: named volume (or host folder) mounted at /cache: the model cache survives a container restart
    cache_volume: str | None = None
    #: how often docker runs the image's health check (its own interval, 15 s, is made for production)
    health_interval_s: float = 1.0
    command: list[str] = field(default_factory=list)
    #: /dev/shm for data-loader workers (docker's default, 64 MB, is too small for training)
    shm_size: str = "1g"


class WorkerContainer(_Node):
    """An annotation or training worker on the stack's network; its metrics port on 127.0.0.1."""

    def __init__(self, image: str, network, spec: WorkerSpec, base_env: Mapping[str, str]) -> None:  # noqa: ANN001
        super().__init__(image, network, f"{spec.kind}-worker")
        self.spec = spec
        self.metrics_port = free_port()
        _publish(self.container, METRICS_PORT, self.metrics_port)
        env = {**base_env, **(RANDOM_CLIP_ENV if spec.kind == "annotation" else {}), **spec.env}
        if spec.weights_file is not None:
            if not spec.weights_file.stat().st_mode & 0o004:
                raise PermissionError(f"{spec.weights_file} is not readable by others: the worker runs as uid 10001 "
                                      "(chmod o+r, e.g. 0644)")
            target = f"/weights/{spec.weights_file.name}"
            self.container.with_volume_mapping(str(spec.weights_file.resolve()), target, "ro")
            env[spec.weights_env] = target
        if spec.cache_volume is not None:
            self.container.with_volume_mapping(spec.cache_volume, "/cache", "rw")
        self.container.with_envs(**env)
        self.container.with_command(spec.command or [spec.kind])
        # the image's own HEALTHCHECK command (/readyz), polled faster than its production cadence
        interval = int(spec.health_interval_s * 1e9)
        self.container.with_kwargs(healthcheck={"interval": interval, "timeout": 3 * 10**9, "retries": 3},
                                   shm_size=spec.shm_size)

    def start(self) -> WorkerContainer:
        self.container.start()
        return self

    def readyz(self) -> tuple[int, dict[str, Any]] | None:
        """``(status, body)`` of ``/readyz``, or None while nothing listens."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except (OSError, ValueError):
            return None

    def health(self) -> str:
        """Docker's health status: ``starting``, ``healthy`` or ``unhealthy``."""
        self.docker.reload()
        return self.docker.attrs["State"].get("Health", {}).get("Status", "none")

    def wait_ready(self, timeout_s: float = 180) -> WorkerContainer:
        """Until ``/readyz`` answers 200: models loaded, partitions assigned."""
        def ready() -> bool:
            self.docker.reload()
            if self.docker.status == "exited":
                raise RuntimeError(f"{self.alias} exited:\n{self.logs()[-4000:]}")
            answer = self.readyz()
            return answer is not None and answer[0] == 200

        _wait(ready, timeout_s, f"{self.alias} to be ready", self.logs)
        return self

    def wait_for_log(self, text: str, timeout_s: float = 120) -> None:
        _wait(lambda: text in self.logs(), timeout_s, f"{text!r} in {self.alias}'s log", self.logs)

    def stop_gracefully(self, timeout_s: float = 60) -> int:
        """``docker stop`` (SIGTERM, SIGKILL after ``timeout_s``); returns the exit code."""
        self.docker.stop(timeout=int(timeout_s))
        self.docker.reload()
        return int(self.docker.attrs["State"]["ExitCode"])

    def restart(self, timeout_s: float = 60) -> WorkerContainer:
        """Stop (SIGTERM) and start the same container: same filesystem, same volumes."""
        self.docker.restart(timeout=int(timeout_s))
        return self

    def exec(self, *command: str) -> tuple[int, str]:
        result = self.docker.exec_run(list(command))
        return result.exit_code, result.output.decode(errors="replace")


@dataclass
class WorkerStack:
    """A network, Kafka, an S3 API, the topics, and the workers asked for; removed on exit.

    ``annotation`` and ``training`` are :class:`WorkerSpec` (or None to leave a worker out).
    ``topic_env`` (``CLS_*_TOPIC``, ``CLS_*_GROUP_ID``) is given to every worker and to the one-shot
    ``cls-worker topics create`` container that provisions the topics before the workers start.
    """

    images: Images = field(default_factory=Images.from_env)
    annotation: WorkerSpec | None = field(default_factory=lambda: WorkerSpec("annotation"))
    training: WorkerSpec | None = field(default_factory=lambda: WorkerSpec("training"))
    topic_env: Mapping[str, str] = field(default_factory=dict)
    buckets: tuple[str, ...] = ("models", "datasets")
    partitions: int = 3
    #: extra variables for every worker (e.g. CLS_LOG_LEVEL)
    worker_env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.network = None
        self.kafka: KafkaNode | None = None
        self.s3: S3Node | None = None
        self.workers: dict[str, WorkerContainer] = {}

    # -- what tests use -------------------------------------------------------------------------
    @property
    def bootstrap_servers(self) -> str:
        assert self.kafka is not None, "stack not started"
        return self.kafka.bootstrap_servers

    @property
    def s3_endpoint_url(self) -> str:
        assert self.s3 is not None, "stack not started"
        return self.s3.endpoint_url

    def worker_env_base(self) -> dict[str, str]:
        """What every worker container gets: brokers, S3, CPU, JSON logs, topics."""
        assert self.kafka is not None and self.s3 is not None
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka.internal_bootstrap_servers,
            "CLS_S3_ENDPOINT_URL": self.s3.internal_endpoint_url,
            "CLS_S3_REGION": REGION,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "CLS_DEVICE": "cpu",
            "CLS_TORCH_THREADS": "1",
            "CLS_LOG_FORMAT": "json",
            "CLS_REQUEST_TOPIC_PARTITIONS": str(self.partitions),
            "CLS_OUTPUT_TOPIC_PARTITIONS": str(self.partitions),
            "CLS_TOPIC_REPLICATION_FACTOR": "1",
            **self.topic_env,
            **self.worker_env,
        }

    def start_worker(self, spec: WorkerSpec) -> WorkerContainer:
        """Start one more worker container (same network, same settings; ``spec.env`` wins)."""
        worker = WorkerContainer(self.images.worker, self.network, spec, self.worker_env_base()).start()
        self.workers[f"{spec.kind}-{len(self.workers)}"] = worker
        return worker

    def provision_topics(self, topic_env: Mapping[str, str] | None = None) -> str:
        """``cls-worker topics create`` in a one-shot worker container; returns its output.

        ``topic_env`` (``CLS_*_TOPIC`` variables) provisions another set of topics than the stack's.
        """
        import docker

        client = docker.from_env()
        try:
            env = {**self.worker_env_base(), **(topic_env or {})}
            output = client.containers.run(self.images.worker, ["topics", "create"], environment=env,
                                           network=self.network.name, remove=True, stdout=True, stderr=True)
            return output.decode(errors="replace")
        except docker.errors.ContainerError as exc:
            raise RuntimeError(f"topics create failed: {exc.stderr!r}") from exc
        finally:
            client.close()

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, wait_ready: bool = True) -> WorkerStack:
        from testcontainers.core.network import Network

        if not engine_answers():
            raise NoEngine("no Docker engine answers (deploy/images/engine.sh start, as root)")
        missing = missing_images(self.images)
        if missing:
            raise RuntimeError(f"images missing locally: {', '.join(missing)} (make images, or pass Images(...))")
        _configure_reaper()
        self.network = Network().create()
        try:
            self.kafka = KafkaNode(self.images.kafka, self.network)
            self.s3 = S3Node(self.images.s3, self.network)
            self.kafka.start()
            self.s3.start()
            client = self.s3.client()
            for bucket in self.buckets:
                client.create_bucket(Bucket=bucket)
            self.provision_topics()
            started = [self.start_worker(spec) for spec in (self.annotation, self.training) if spec is not None]
            if wait_ready:
                for worker in started:
                    worker.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def worker(self, kind: str) -> WorkerContainer:
        """The most recently started worker of that kind."""
        matches = [w for w in self.workers.values() if w.spec.kind == kind]
        if not matches:
            raise KeyError(kind)
        return matches[-1]

    def stop(self) -> None:
        for worker in reversed(list(self.workers.values())):
            worker.remove()
        self.workers.clear()
        for node in (self.s3, self.kafka):
            if node is not None:
                node.remove()
        if self.network is not None:
            try:
                self.network.remove()
            except Exception:  # noqa: BLE001 - already gone
                pass
            self.network = None

    def __enter__(self) -> WorkerStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _publish(container, port: int, host_port: int) -> None:  # noqa: ANN001
    """Publish a container port on 127.0.0.1 only (docker-py's (ip, port) form)."""
    container.ports[f"{port}/tcp"] = ("127.0.0.1", host_port)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def worker_stack(**kwargs: Any) -> Iterator[WorkerStack]:
    """``with worker_stack(training=None) as stack: ...``: :class:`WorkerStack` as a context manager."""
    stack = WorkerStack(**kwargs).start()
    try:
        yield stack
    finally:
        stack.stop()
