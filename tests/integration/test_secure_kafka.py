"""Workers against a SASL_PLAINTEXT listener: PLAIN and SCRAM-SHA-512 end to end, a wrong password, rotation.

A second local broker (``testkit.secure_kafka``: deploy/local/kafka.sh with KAFKA_SASL_PORT and KAFKA_SASL_USERS)
on free ports with its own state directory, stopped at the end of the module. Topics are provisioned and requests produced
through its PLAINTEXT listener; the workers only know the SASL listener. No password may appear in any
worker log, right or wrong.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testkit.local import LocalBroker
from testkit.secure_kafka import assert_no_secret, handled_by_worker, provision_topics, refused, start_listener_broker
from testkit.runbook import run_block, runbook_block

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[2]


@dataclass
class SaslBroker:
    broker: LocalBroker
    plaintext: str  # for the test's own clients
    sasl: str  # for the workers
    passwords: dict[str, str]  # user -> password the broker was started with


@pytest.fixture(scope="module")
def sasl_broker() -> Iterator[SaslBroker]:
    passwords = {"cls-worker": secrets.token_hex(12), "rotated": secrets.token_hex(12)}
    try:
        broker, ports = start_listener_broker(("SASL",), passwords)
    except Exception as exc:  # fail loudly, never skip
        pytest.fail(f"SASL broker did not start: {exc}", pytrace=False)
    try:
        yield SaslBroker(broker, broker.bootstrap, f"127.0.0.1:{ports['SASL']}", passwords)
    finally:
        broker.stop()


@pytest.fixture
async def topics(sasl_broker, topic_prefix) -> dict[str, str]:
    return await provision_topics(sasl_broker.plaintext, topic_prefix)


def sasl_env(broker: SaslBroker, mechanism: str, user: str, password: str) -> dict[str, str]:
    return {"KAFKA_BOOTSTRAP_SERVERS": broker.sasl, "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "KAFKA_SASL_MECHANISM": mechanism, "KAFKA_SASL_USERNAME": user, "KAFKA_SASL_PASSWORD": password,
            "CLS_LOG_LEVEL": "DEBUG", "CLS_LOG_FORMAT": "json"}


async def handled_over_sasl(tmp_path: Path, broker: SaslBroker, names: dict[str, str], mechanism: str, user: str,
                            password: str) -> str:
    """Run the echo worker over SASL, produce one request (PLAINTEXT), see its result; returns the log."""
    return await handled_by_worker(tmp_path, broker.plaintext, names, sasl_env(broker, mechanism, user, password),
                                   f"req-{mechanism.lower()}-{user}")


async def refused_at_startup(tmp_path: Path, broker: SaslBroker, names: dict[str, str], mechanism: str, user: str,
                             password: str, name: str, cli: bool) -> str:
    """A worker with credentials the broker refuses: exit 2, fast, once, one error line. Returns the log.

    ``cli``: the real ``cls-worker annotation``; else the echo worker (the same runtime and ``serve``)."""
    return await refused(tmp_path, names, sasl_env(broker, mechanism, user, password), name, cli,
                         ("SaslAuthenticationFailed", "Authentication failed"))


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
