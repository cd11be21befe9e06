"""Workers against TLS listeners of a real broker: SSL, SASL_SSL (SCRAM-SHA-512) and mTLS each answer a request;
a wrong CA, an expired broker certificate and a hostname mismatch each end the worker with one clear line.

One extra local broker for the module (deploy/local/kafka.sh with KAFKA_SSL_PORT, KAFKA_SASL_SSL_PORT,
KAFKA_MTLS_PORT and KAFKA_SSL_EXPIRED_PORT; its CA and certificates are made at start under its state folder),
stopped at the end. Topics are provisioned and requests produced through its PLAINTEXT listener; the workers
only know the TLS listeners. The harness is ``testkit.secure_kafka``, as for test_secure_kafka.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testkit.local import LocalBroker
from testkit.secure_kafka import assert_no_secret, handled_by_worker, provision_topics, refused, start_listener_broker

pytestmark = pytest.mark.kafka


@dataclass
class TlsBroker:
    broker: LocalBroker
    plaintext: str
    ports: dict[str, int]  # SSL, SASL_SSL, MTLS, SSL_EXPIRED
    tls: Path  # ca.pem, other-ca.pem, client.pem, client.key
    password: str  # SCRAM password of the user "cls-worker"


@pytest.fixture(scope="module")
def tls_broker() -> Iterator[TlsBroker]:
    password = secrets.token_hex(12)
    try:
        broker, ports = start_listener_broker(("SSL", "SASL_SSL", "MTLS", "SSL_EXPIRED"), {"cls-worker": password})
    except Exception as exc:  # fail loudly, never skip
        pytest.fail(f"TLS broker did not start: {exc}", pytrace=False)
    try:
        yield TlsBroker(broker, broker.bootstrap, ports, broker.state_dir / "tls", password)
    finally:
        broker.stop()


@pytest.fixture
async def topics(tls_broker, topic_prefix) -> dict[str, str]:
    return await provision_topics(tls_broker.plaintext, topic_prefix)


def tls_env(broker: TlsBroker, listener: str, host: str = "127.0.0.1", cafile: str = "ca.pem",
            client_cert: bool = False) -> dict[str, str]:
    env = {"KAFKA_BOOTSTRAP_SERVERS": f"{host}:{broker.ports[listener]}", "KAFKA_SECURITY_PROTOCOL": "SSL",
           "KAFKA_SSL_CAFILE": str(broker.tls / cafile), "CLS_LOG_LEVEL": "DEBUG", "CLS_LOG_FORMAT": "json"}
    if client_cert:
        env.update(KAFKA_SSL_CERTFILE=str(broker.tls / "client.pem"), KAFKA_SSL_KEYFILE=str(broker.tls / "client.key"))
    return env


async def test_ssl_sasl_ssl_and_mtls_each_answer_a_request(tmp_path, tls_broker, topics):
    sasl = {**tls_env(tls_broker, "SASL_SSL"), "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "KAFKA_SASL_USERNAME": "cls-worker",
            "KAFKA_SASL_PASSWORD": tls_broker.password}
    cases = {"req-ssl": tls_env(tls_broker, "SSL"), "req-sasl-ssl": sasl,
             "req-mtls": tls_env(tls_broker, "MTLS", client_cert=True)}
    # three workers at once (each its own group, request and listener): the module stays short
    logs = await asyncio.gather(*(handled_by_worker(tmp_path, tls_broker.plaintext, topics, env, request_id)
                                  for request_id, env in cases.items()))
    assert_no_secret("".join(logs), tls_broker.password)
    key_line = (tls_broker.tls / "client.key").read_text().splitlines()[1]
    assert key_line not in logs[2]


async def test_wrong_ca_expired_certificate_and_hostname_mismatch_each_exit_with_one_clear_line(
        tmp_path, tls_broker, topics):
    verify_failed = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed")
    # the echo worker (the real runtime and serve(); test_secure_kafka runs the real annotation CLI into the same
    # start-up failure path), four at once: the module stays short
    texts = await asyncio.gather(
        refused(tmp_path, topics, tls_env(tls_broker, "SSL", cafile="other-ca.pem"), "wrong-ca", False,
                verify_failed),
        refused(tmp_path, topics, tls_env(tls_broker, "SSL_EXPIRED"), "expired", False,
                (*verify_failed, "certificate has expired")),
        # the certificate names IP 127.0.0.1 only; "localhost" reaches the same listener under another name
        refused(tmp_path, topics, tls_env(tls_broker, "SSL", host="localhost"), "hostname", False,
                (*verify_failed, "Hostname mismatch", "'localhost'")),
        # mTLS: no client certificate, the broker closes the connection
        refused(tmp_path, topics, tls_env(tls_broker, "MTLS"), "no-client-cert", False,
                ("KafkaConnectionError", "closed")),
    )
    for text in texts[:3]:
        assert "KAFKA_SSL_CAFILE" in text  # the hint names the settings to check
    assert "KAFKA_SSL_CERTFILE" in texts[3]
