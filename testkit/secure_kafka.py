"""Workers against a local broker's TLS and SASL listeners (``deploy/local/kafka.sh`` with ``KAFKA_SASL_PORT``,
``KAFKA_SSL_PORT``, ... and ``KAFKA_SASL_USERS``): the broker on free ports, the topics provisioned through its
PLAINTEXT listener, and the two outcomes a connection test checks: a worker that answers a request, and a worker
refused at start-up with one clear line. No password may appear in a worker's log."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from consumers.settings import KafkaSettings, Settings, WorkerSettings
from testkit.kafka import produce, provision, read_until, topic_env
from testkit.local import LocalBroker, WorkerProcess

# the real annotation worker, started without loading a model (it fails before it needs one)
CLI_ENV = {"CLS_CLIP_VARIANT": "cls-tiny-clip", "CLS_CLIP_WEIGHTS": "random", "CLS_PRELOAD_MODELS": "",
           "CLS_TORCH_THREADS": "1"}


def free_ports(count: int, exclude: set[int]) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1, none of ``exclude``."""
    ports: list[int] = []
    for _ in range(50 * count):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in exclude and port not in ports:
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError("no free ports on 127.0.0.1")


def start_listener_broker(names: tuple[str, ...], users: dict[str, str]) -> tuple[LocalBroker, dict[str, int]]:
    """A local broker with one extra listener per ``KAFKA_<NAME>_PORT`` of ``names`` (e.g. ``"SASL"``, ``"SSL"``)
    on free ports and the SCRAM/PLAIN ``users`` (user -> password); returns it started, with the ports by name.
    A broker that does not start is stopped and its error raised."""
    broker = LocalBroker()
    ports = dict(zip(names, free_ports(len(names), {broker.port, broker.port + 1}), strict=True))
    broker.env.update({f"KAFKA_{name}_PORT": str(port) for name, port in ports.items()})
    broker.env["KAFKA_SASL_USERS"] = ",".join(f"{user}:{password}" for user, password in users.items())
    try:
        broker.start()
    except Exception:
        broker.stop()
        raise
    return broker, ports


async def provision_topics(plaintext: str, topic_prefix: str) -> dict[str, str]:
    """The run's topics (one partition each), made through the PLAINTEXT listener; returns their CLS_* env."""
    names = topic_env(topic_prefix)
    worker = WorkerSettings(**{k.removeprefix("CLS_").lower(): v for k, v in names.items()},
                            request_topic_partitions=1, output_topic_partitions=1)
    await provision(Settings(kafka=KafkaSettings(bootstrap_servers=plaintext), worker=worker))
    return names


def assert_no_secret(text: str, *secret_values: str) -> None:
    """No password in ``text``; on failure the offending lines are shown with the password masked."""
    leaks = [line for line in text.splitlines() if any(v in line for v in secret_values)]
    for value in secret_values:
        leaks = [line.replace(value, "<PASSWORD>") for line in leaks]
    assert not leaks, "a password appears in the log:\n" + "\n".join(leaks)


async def handled_by_worker(tmp_path: Path, plaintext: str, names: dict[str, str], env: dict[str, str],
                            request_id: str) -> str:
    """Run the echo worker with the connection settings ``env``, produce one request through ``plaintext``, see
    its result there; returns the worker's log."""
    env = {**names, **env, "ECHO_GROUP_ID": f"{names['CLS_ANNOTATION_GROUP_ID']}-{request_id}"}
    worker = WorkerProcess("testkit.echo_worker", [], env, tmp_path / f"{request_id}.log")
    try:
        await worker.wait_for_log("partitions_assigned", timeout_s=60)
        body = {"task": "classify", "model": "clip", "images": [{"id": "a", "url": "https://example.com/a.jpg"}],
                "classes": ["cat", "dog"], "top_k": 1}
        await produce(plaintext, names["CLS_ANNOTATION_REQUESTS_TOPIC"], body, key=request_id)
        records = await read_until(plaintext, names["CLS_ANNOTATION_RESULTS_TOPIC"],
                                   lambda rs: any(r.key == request_id.encode() for r in rs), timeout_s=30)
        result = next(r for r in records if r.key == request_id.encode()).json()
        assert result["status"] == "completed" and result["request_id"] == request_id, json.dumps(result)
        worker.terminate()
        assert await worker.wait_exit(30) == 0
    finally:
        worker.close()
    return worker.log_text()


async def refused(tmp_path: Path, names: dict[str, str], env: dict[str, str], name: str, cli: bool,
                  expected: tuple[str, ...]) -> str:
    """A worker whose connection the broker (or the worker itself) refuses: exit 2, fast, once, one JSON error
    line ``kafka_unavailable`` naming the bootstrap servers and containing every string of ``expected``.
    ``cli``: the real ``cls-worker annotation``; else the echo worker (the same runtime and ``serve``).
    Returns the log."""
    env = {**names, **env}
    if cli:
        worker = WorkerProcess("consumers.cli", ["annotation"], {**env, **CLI_ENV}, tmp_path / f"{name}.log")
    else:
        worker = WorkerProcess("testkit.echo_worker", [], env, tmp_path / f"{name}.log")
    started = time.monotonic()
    try:
        code = await worker.wait_exit(45)  # kills it and fails if it keeps retrying
    finally:
        worker.close()
    elapsed = time.monotonic() - started
    text = worker.log_text()
    assert code == 2, f"exit {code}:\n{text}"
    assert elapsed < 30, f"took {elapsed:.1f}s to give up:\n{text}"
    lines = [line for line in text.splitlines() if line.strip()]
    assert "Traceback" not in text, text
    # every line a JSON log event: no raw tracebacks, no prints
    assert all(line.startswith("{") and line.endswith("}") for line in lines), text
    events = [json.loads(line) for line in lines]
    errors = [e for e in events if e.get("level") in ("error", "critical", "exception")]
    assert len(errors) == 1, "expected one start-up error line, got:\n" + "\n".join(json.dumps(e) for e in errors)
    error = errors[0]
    assert error["event"] == "kafka_unavailable", error
    assert all(s in error["error"] for s in expected), error
    assert error["bootstrap_servers"] == env["KAFKA_BOOTSTRAP_SERVERS"]
    return text
