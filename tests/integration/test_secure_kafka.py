"""Workers against a SASL_PLAINTEXT listener: PLAIN and SCRAM-SHA-512 end to end, a wrong password, rotation.

A second local broker (deploy/local/kafka.sh with KAFKA_SASL_PORT and KAFKA_SASL_USERS) on free ports with
its own state directory, stopped at the end of the module. Topics are provisioned and requests produced
through its PLAINTEXT listener; the workers only know the SASL listener. No password may appear in any
worker log, right or wrong.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from consumers.settings import KafkaSettings, Settings, WorkerSettings
from testkit.local import LocalBroker
from tests.integration.test_operations import runbook_block, run_block
from testkit.kafka import produce, provision, read_until, topic_env
from testkit.local import WorkerProcess

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[2]

# the real annotation worker, started without loading a model (it fails before it needs one)
CLI_ENV = {"CLS_CLIP_VARIANT": "cls-tiny-clip", "CLS_CLIP_WEIGHTS": "random", "CLS_PRELOAD_MODELS": "",
           "CLS_TORCH_THREADS": "1"}


@dataclass
class SaslBroker:
    broker: LocalBroker
    plaintext: str  # for the test's own clients
    sasl: str  # for the workers
    passwords: dict[str, str]  # user -> password the broker was started with


def _free_port(exclude: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in exclude:
            return port


@pytest.fixture(scope="module")
def sasl_broker() -> Iterator[SaslBroker]:
    passwords = {"cls-worker": secrets.token_hex(12), "rotated": secrets.token_hex(12)}
    broker = LocalBroker()
    sasl_port = _free_port({broker.port, broker.port + 1})
    broker.env.update(KAFKA_SASL_PORT=str(sasl_port),
                      KAFKA_SASL_USERS=",".join(f"{user}:{pw}" for user, pw in passwords.items()))
    try:
        broker.start()
    except Exception as exc:  # fail loudly, never skip
        broker.stop()
        pytest.fail(f"SASL broker did not start: {exc}", pytrace=False)
    try:
        yield SaslBroker(broker, broker.bootstrap, f"127.0.0.1:{sasl_port}", passwords)
    finally:
        broker.stop()


@pytest.fixture
async def topics(sasl_broker, topic_prefix) -> dict[str, str]:
    names = topic_env(topic_prefix)
    worker = WorkerSettings(**{k.removeprefix("CLS_").lower(): v for k, v in names.items()},
                            request_topic_partitions=1, output_topic_partitions=1)
    await provision(Settings(kafka=KafkaSettings(bootstrap_servers=sasl_broker.plaintext), worker=worker))
    return names


def sasl_env(broker: SaslBroker, mechanism: str, user: str, password: str) -> dict[str, str]:
    return {"KAFKA_BOOTSTRAP_SERVERS": broker.sasl, "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "KAFKA_SASL_MECHANISM": mechanism, "KAFKA_SASL_USERNAME": user, "KAFKA_SASL_PASSWORD": password,
            "CLS_LOG_LEVEL": "DEBUG", "CLS_LOG_FORMAT": "json"}


def assert_no_secret(text: str, *secret_values: str) -> None:
    """No password in ``text``; on failure the offending lines are shown with the password masked."""
    leaks = [line for line in text.splitlines() if any(v in line for v in secret_values)]
    if leaks:
        for value in secret_values:
            leaks = [line.replace(value, "<PASSWORD>") for line in leaks]
        pytest.fail("a password appears in the log:\n" + "\n".join(leaks), pytrace=False)


async def handled_over_sasl(tmp_path: Path, broker: SaslBroker, names: dict[str, str], mechanism: str, user: str,
                            password: str) -> str:
    """Run the echo worker over SASL, produce one request (PLAINTEXT), see its result; returns the log."""
    return await handled_by_worker(tmp_path, broker.plaintext, names, sasl_env(broker, mechanism, user, password),
                                   f"req-{mechanism.lower()}-{user}")


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


async def refused_at_startup(tmp_path: Path, broker: SaslBroker, names: dict[str, str], mechanism: str, user: str,
                             password: str, name: str, cli: bool) -> str:
    """A worker with credentials the broker refuses: exit 2, fast, once, one error line. Returns the log.

    ``cli``: the real ``cls-worker annotation``; else the echo worker (the same runtime and ``serve``)."""
    return await refused(tmp_path, names, sasl_env(broker, mechanism, user, password), name, cli,
                         ("SaslAuthenticationFailed", "Authentication failed"))


async def refused(tmp_path: Path, names: dict[str, str], env: dict[str, str], name: str, cli: bool,
                  expected: tuple[str, ...]) -> str:
    """A worker whose connection the broker (or the worker itself) refuses: exit 2, fast, once, one JSON error
    line ``kafka_unavailable`` naming the bootstrap servers and containing every string of ``expected``.
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


async def test_plain_and_scram_sha_512_handle_a_request(tmp_path, sasl_broker, topics):
    password = sasl_broker.passwords["cls-worker"]
    for mechanism in ("PLAIN", "SCRAM-SHA-512"):
        log = await handled_over_sasl(tmp_path, sasl_broker, topics, mechanism, "cls-worker", password)
        assert_no_secret(log, *sasl_broker.passwords.values())


@pytest.mark.parametrize(("mechanism", "cli"), [("PLAIN", True), ("SCRAM-SHA-512", False)],
                         ids=["PLAIN-cli", "SCRAM-SHA-512-echo"])
async def test_wrong_password_exits_once_with_one_clear_line(tmp_path, sasl_broker, topics, mechanism, cli):
    wrong = secrets.token_hex(12)
    text = await refused_at_startup(tmp_path, sasl_broker, topics, mechanism, "cls-worker", wrong, "wrong", cli)
    assert_no_secret(text, wrong, *sasl_broker.passwords.values())


async def test_runbook_scram_rotation(tmp_path, sasl_broker, topics):
    """The runbook's rotation command: the new password works, the old one is refused."""
    old, new = sasl_broker.passwords["rotated"], secrets.token_hex(12)
    block = runbook_block("SCRAM-SHA-512=[password=")
    result = run_block(block, {"KAFKA_BOOTSTRAP_SERVERS": sasl_broker.plaintext, "KAFKA_SASL_USERNAME": "rotated",
                               "NEW_KAFKA_SASL_PASSWORD": new}, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Completed updating config for user rotated." in result.stdout
    assert_no_secret(result.stdout + result.stderr, old, new)

    log = await handled_over_sasl(tmp_path, sasl_broker, topics, "SCRAM-SHA-512", "rotated", new)
    assert_no_secret(log, old, new)
    text = await refused_at_startup(tmp_path, sasl_broker, topics, "SCRAM-SHA-512", "rotated", old, "old-password",
                                    cli=False)
    assert_no_secret(text, old, new)

    # nor in the broker's own logs (it logs the failed authentications, never the password)
    broker_logs = "".join(f.read_text(errors="replace") for f in sasl_broker.broker.state_dir.glob("*.log"))
    assert "Failed authentication" in broker_logs
    assert_no_secret(broker_logs, old, new, *sasl_broker.passwords.values())
