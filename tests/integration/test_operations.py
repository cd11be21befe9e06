"""docs/operations.md, executed: every ``sh`` block of the runbook runs against the live test broker.

The blocks are taken from the markdown as written. The variables they use (``$CLS_ANNOTATION_GROUP_ID``,
``$DLQ_TOPIC``, ...) are filled with this test's own topics and group; everything else is the doc's text.
Each block below is a test case: a block in the doc that is not listed here, or a listed block the doc
no longer has, fails ``test_runbook_and_test_agree``.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from consumers.settings import KafkaSettings, WorkerSettings
from testkit.kafka import committed_offsets, end_offsets, read_until, send, topic_env
from testkit.local import REPO, WorkerProcess
from testkit.runbook import VARIABLE, run_block, runbook_blocks


# ---------------------------------------------------------------------------------------------- cases
# The runbook's sh blocks, verbatim. The scenario test runs each one and checks its output.
VARIABLES = r'''export KAFKA_BOOTSTRAP_SERVERS="${KAFKA_BOOTSTRAP_SERVERS:-127.0.0.1:19092}"
export CLS_ANNOTATION_REQUESTS_TOPIC="${CLS_ANNOTATION_REQUESTS_TOPIC:-cls.annotation.requests}"
export CLS_ANNOTATION_RESULTS_TOPIC="${CLS_ANNOTATION_RESULTS_TOPIC:-cls.annotation.results}"
export CLS_ANNOTATION_GROUP_ID="${CLS_ANNOTATION_GROUP_ID:-cls-annotation-workers}"
export DLQ_TOPIC="${DLQ_TOPIC:-$CLS_ANNOTATION_REQUESTS_TOPIC.dlq}"
export KAFKA_SASL_USERNAME="${KAFKA_SASL_USERNAME:-cls-workers}"'''
TOPICS_LIST = "cls-worker topics list"
TOPICS_CREATE = "cls-worker topics create"
TOPICS_DESCRIBE = 'deploy/local/kafka.sh topics --describe --topic "$CLS_ANNOTATION_REQUESTS_TOPIC"'
LAG = 'deploy/local/kafka.sh consumer-groups --describe --group "$CLS_ANNOTATION_GROUP_ID"'
MEMBERS = 'deploy/local/kafka.sh consumer-groups --describe --group "$CLS_ANNOTATION_GROUP_ID" --members'
STATE = 'deploy/local/kafka.sh consumer-groups --describe --group "$CLS_ANNOTATION_GROUP_ID" --state'
READ_RESULTS = r'''deploy/local/kafka.sh console-consumer --topic "$CLS_ANNOTATION_RESULTS_TOPIC" --from-beginning \
  --max-messages 5 --timeout-ms 10000 \
  --property print.key=true --property print.headers=true'''
DLQ_COUNT = 'deploy/local/kafka.sh get-offsets --topic "$DLQ_TOPIC"'
DLQ_LIST = r'''deploy/local/kafka.sh console-consumer --topic "$DLQ_TOPIC" --from-beginning --timeout-ms 5000 \
  --property print.offset=true --property print.key=true --property print.headers=true'''
DLQ_SAVE = r'''deploy/local/kafka.sh console-consumer --topic "$DLQ_TOPIC" --partition 0 --offset "$DLQ_OFFSET" \
  --max-messages 1 --timeout-ms 10000 \
  --property print.key=true --property key.separator='|' > dlq-record.txt'''
DLQ_REPLAY = r'''deploy/local/kafka.sh console-producer --topic "$CLS_ANNOTATION_REQUESTS_TOPIC" \
  --property parse.key=true --property key.separator='|' < dlq-record.txt'''
GROW_PARTITIONS = "CLS_REQUEST_TOPIC_PARTITIONS=24 cls-worker topics create"
SCRAM_SET = r'''deploy/local/kafka.sh configs --alter --entity-type users --entity-name "$KAFKA_SASL_USERNAME" \
  --add-config "SCRAM-SHA-512=[password=${NEW_KAFKA_SASL_PASSWORD:?set NEW_KAFKA_SASL_PASSWORD}]"'''
SCRAM_DESCRIBE = 'deploy/local/kafka.sh configs --describe --entity-type users --entity-name "$KAFKA_SASL_USERNAME"'
RESET_DRY_RUN = r'''deploy/local/kafka.sh consumer-groups --reset-offsets --group "$CLS_ANNOTATION_GROUP_ID" \
  --topic "$CLS_ANNOTATION_REQUESTS_TOPIC" --to-earliest --dry-run'''
RESET_EXECUTE = r'''deploy/local/kafka.sh consumer-groups --reset-offsets --group "$CLS_ANNOTATION_GROUP_ID" \
  --topic "$CLS_ANNOTATION_REQUESTS_TOPIC" --to-earliest --execute'''

CASES = [VARIABLES, TOPICS_LIST, TOPICS_CREATE, TOPICS_DESCRIBE, LAG, MEMBERS, STATE, READ_RESULTS, DLQ_COUNT,
         DLQ_LIST, DLQ_SAVE, DLQ_REPLAY, GROW_PARTITIONS, SCRAM_SET, SCRAM_DESCRIBE, RESET_DRY_RUN, RESET_EXECUTE]

# The variables the blocks use; the test gives each one a value of its own.
PLACEHOLDERS = {"KAFKA_BOOTSTRAP_SERVERS", "CLS_ANNOTATION_REQUESTS_TOPIC", "CLS_ANNOTATION_RESULTS_TOPIC",
                "CLS_ANNOTATION_GROUP_ID", "DLQ_TOPIC", "KAFKA_SASL_USERNAME", "NEW_KAFKA_SASL_PASSWORD", "DLQ_OFFSET"}


# ---------------------------------------------------------------------------------------------- parsing
def table(output: str, first_column: str = "GROUP") -> list[dict[str, str]]:
    """Rows of a consumer-groups table (the header line starts with ``first_column``)."""
    rows: list[dict[str, str]] = []
    header: list[str] | None = None
    for line in output.splitlines():
        fields = line.split()
        if fields and fields[0] == first_column:
            header = fields
        elif header and len(fields) == len(header):
            rows.append(dict(zip(header, fields)))
    return rows


def new_offsets(output: str, group: str, topic: str) -> dict[int, int]:
    """PARTITION -> NEW-OFFSET from ``--reset-offsets`` (Kafka 3.9 prints its rows without line breaks)."""
    assert re.search(r"GROUP\s+TOPIC\s+PARTITION\s+NEW-OFFSET", output), output
    pattern = rf"(?:^|\s){re.escape(group)}\s+{re.escape(topic)}\s+(\d+)\s+(\d+)"
    return {int(p): int(o) for p, o in re.findall(pattern, output)}


def group_state(output: str, group: str) -> str:
    """STATE from ``consumer-groups --describe --state`` (its ASSIGNMENT-STRATEGY column may be blank)."""
    for line in output.splitlines():
        if line.startswith(group + " "):
            match = re.search(r"\s(Stable|Empty|PreparingRebalance|CompletingRebalance|Dead)\s", line)
            assert match, line
            return match.group(1)
    raise AssertionError(f"no state line for {group}:\n{output}")


# ---------------------------------------------------------------------------------------------- agreement
def test_runbook_and_test_agree():
    blocks = runbook_blocks()
    assert len(blocks) == len(set(blocks)), "a runbook block appears twice"
    untested = [b for b in blocks if b not in CASES]
    missing = [c for c in CASES if c not in blocks]
    assert not untested, "runbook commands without a test case in test_operations.py:\n\n" + "\n\n".join(untested)
    assert not missing, "test cases no longer in docs/operations.md:\n\n" + "\n\n".join(missing)
    used = {name for b in blocks for name in VARIABLE.findall(b)}
    assert used == PLACEHOLDERS, f"variables in the runbook {sorted(used)} != filled by the test {sorted(PLACEHOLDERS)}"
    for b in blocks:  # every command goes through Kafka's tools or cls-worker
        first = b.split("\n")[0]
        assert re.match(r"^(export |deploy/local/kafka\.sh |([A-Z_]+=\S+ )*cls-worker )", first), first


def test_runbook_defaults_are_the_workers_defaults():
    defaults = dict(re.findall(r'^export (\w+)="\$\{\1:-([^}]*)\}"$', VARIABLES, re.MULTILINE))
    worker = WorkerSettings.model_fields
    assert defaults["KAFKA_BOOTSTRAP_SERVERS"] == KafkaSettings.model_fields["bootstrap_servers"].default
    assert defaults["CLS_ANNOTATION_REQUESTS_TOPIC"] == worker["annotation_requests_topic"].default
    assert defaults["CLS_ANNOTATION_RESULTS_TOPIC"] == worker["annotation_results_topic"].default
    assert defaults["CLS_ANNOTATION_GROUP_ID"] == worker["annotation_group_id"].default
    assert defaults["DLQ_TOPIC"] == "$CLS_ANNOTATION_REQUESTS_TOPIC.dlq"
    assert worker["request_topic_partitions"].default == 12  # the doc's "default 12" and "grown 12->24"


# ---------------------------------------------------------------------------------------------- scenario
class Runbook:
    """Runs runbook blocks with the test's placeholder values; remembers which ran."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.blocks = set(runbook_blocks())
        self.workdir = workdir
        self.env = env
        self.ran: set[str] = set()
        self.stderr = ""

    def run(self, block: str, timeout: float = 90) -> str:
        assert block in self.blocks, f"not in docs/operations.md:\n{block}"
        result = run_block(block, self.env, self.workdir, timeout)
        self.ran.add(block)
        self.stderr = result.stderr
        assert result.returncode == 0, (f"exit {result.returncode}:\n{block}\n"
                                        f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
        return result.stdout


def annotation_request(n_images: int = 1) -> dict:
    return {"task": "classify", "model": "clip",
            "images": [{"id": f"img-{i}", "url": f"https://example.com/{i}.jpg"} for i in range(n_images)],
            "classes": ["cat", "dog"], "top_k": 1}


async def produce_many(bootstrap: str, topic: str, records: list[tuple[str, bytes | dict]], partition: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for key, value in records:
            await send(producer, topic, value, key, partition=partition)
    finally:
        await producer.stop()


async def wait_committed(bootstrap: str, group: str, topic: str, timeout_s: float = 30) -> None:
    ends = {tp: end for tp, end in (await end_offsets(bootstrap, topic)).items() if end > 0}
    committed: dict = {}
    for _ in range(int(timeout_s / 0.2)):
        committed = await committed_offsets(bootstrap, group)
        if all(committed.get(tp) == end for tp, end in ends.items()):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"not committed: {committed} vs end offsets {ends}")


@pytest.mark.kafka
@pytest.mark.slow
async def test_runbook_commands_against_live_broker(tmp_path, kafka_bootstrap, topic_prefix):
    names = topic_env(topic_prefix)
    requests, results = names["CLS_ANNOTATION_REQUESTS_TOPIC"], names["CLS_ANNOTATION_RESULTS_TOPIC"]
    group, dlq = names["CLS_ANNOTATION_GROUP_ID"], requests + ".dlq"
    user = f"{topic_prefix}-user"
    values = {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "CLS_ANNOTATION_REQUESTS_TOPIC": requests,
        "CLS_ANNOTATION_RESULTS_TOPIC": results,
        "CLS_ANNOTATION_GROUP_ID": group,
        "DLQ_TOPIC": dlq,
        "KAFKA_SASL_USERNAME": user,
        "NEW_KAFKA_SASL_PASSWORD": f"pw{topic_prefix}",
        "DLQ_OFFSET": "",  # read from the DLQ listing below
    }
    assert set(values) == PLACEHOLDERS
    # the training topics too, so `cls-worker topics create` touches only this test's topics
    env = {**names, **values, "CLS_LOG_FORMAT": "json"}
    workdir = tmp_path / "ops"
    workdir.mkdir()
    (workdir / "deploy").symlink_to(REPO / "deploy")  # the doc's repo-relative paths; files land in workdir
    book = Runbook(workdir, env)

    # -- topics
    book.run(VARIABLES)
    listed = book.run(TOPICS_LIST)
    assert f"{requests}\tpartitions=12\t" in listed and f"{dlq}\tpartitions=1\t" in listed, listed
    created = book.run(TOPICS_CREATE)
    assert f"{requests}\tcreated" in created and f"{dlq}\tcreated" in created, created
    described = book.run(TOPICS_DESCRIBE)
    assert re.search(rf"Topic: {re.escape(requests)}\s.*PartitionCount: 12\s", described), described
    assert "retention.ms=604800000" in described, described

    # -- a worker handles 5 requests; one malformed record goes to the DLQ
    worker = WorkerProcess("testkit.echo_worker", [], {**names, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap},
                           tmp_path / "echo.log")
    try:
        await worker.wait_for_log("partitions_assigned", timeout_s=60)
        good = [(f"req-{i}", annotation_request()) for i in range(5)]
        broken = repr(annotation_request()).encode()  # a Python dict repr, not JSON
        await produce_many(kafka_bootstrap, requests, [*good, ("req-dlq-1", broken)], partition=0)
        # 5 completed results, and the dead-lettered record's failed event (its key names the request)
        await read_until(kafka_bootstrap, results, lambda rs: len(rs) >= 6)
        await read_until(kafka_bootstrap, dlq, lambda rs: len(rs) >= 1)
        await wait_committed(kafka_bootstrap, group, requests)

        # -- lag, members, state with the worker running
        rows = [r for r in table(book.run(LAG)) if r["TOPIC"] == requests]
        assert len(rows) == 12 and all(r["CLIENT-ID"] == "cls-worker" for r in rows), rows
        assert {r["PARTITION"]: (r["CURRENT-OFFSET"], r["LAG"]) for r in rows}["0"] == ("6", "0"), rows
        members = table(book.run(MEMBERS))
        # one member owns the 12 partitions of each annotation request topic (bulk and interactive lanes)
        assert len(members) == 1 and members[0]["#PARTITIONS"] == "24", members
        assert group_state(book.run(STATE), group) == "Stable"

        # -- results with keys and headers
        lines = book.run(READ_RESULTS).splitlines()
        assert len(lines) == 5, lines
        for line in lines:
            headers, key, value = line.split("\t")
            assert "event-type:annotation.result" in headers and f"request-id:{key}" in headers, line
            event = json.loads(value)
            if key == "req-dlq-1":
                assert event["status"] == "failed" and event["error"]["code"] == "not_json_object", line
            else:
                assert event["status"] == "completed" and key.startswith("req-"), line

        # -- dead letters: count, inspect, save, fix, replay -> a handled request
        assert book.run(DLQ_COUNT).strip() == f"{dlq}:0:1"
        listing = book.run(DLQ_LIST).splitlines()
        assert len(listing) == 1, listing
        offset_field, headers, key, value = listing[0].split("\t")
        assert key == "req-dlq-1" and value == broken.decode(), listing
        assert "dlq-error-code:not_json_object" in headers, headers
        assert f"dlq-source-topic:{requests}" in headers and "dlq-source-offset:5" in headers, headers
        book.env["DLQ_OFFSET"] = offset_field.removeprefix("Offset:")
        book.run(DLQ_SAVE)
        saved = (workdir / "dlq-record.txt").read_text()
        assert saved == f"req-dlq-1|{broken.decode()}\n", saved
        fixed = json.dumps(ast.literal_eval(saved.split("|", 1)[1]))  # the operator's edit
        (workdir / "dlq-record.txt").write_text(f"req-dlq-1|{fixed}\n")
        book.run(DLQ_REPLAY)
        def replay_answered(record) -> bool:
            return record.key == b"req-dlq-1" and record.json()["status"] == "completed"

        replayed = await read_until(kafka_bootstrap, results, lambda rs: any(replay_answered(r) for r in rs))
        result = next(r for r in replayed if replay_answered(r))
        # the dead letter's failed event and the replay's answer are distinct messages: a fold keeps both
        dead_letter_answer = next(r for r in replayed if r.key == b"req-dlq-1" and r.json()["status"] == "failed")
        assert dead_letter_answer.json()["message_id"] != result.json()["message_id"]
        assert result.json()["status"] == "completed" and result.json()["request_id"] == "req-dlq-1"
        assert [r["id"] for r in result.json()["results"]] == ["img-0"]
        assert result.headers["request-id"] == b"req-dlq-1"

        # -- scaling out: more partitions
        assert f"{requests}\tgrown 12->24" in book.run(GROW_PARTITIONS)
        assert "PartitionCount: 24" in book.run(TOPICS_DESCRIBE)

        worker.terminate()
        assert await worker.wait_exit(60) == 0
    finally:
        worker.close()

    # -- workers stopped: state, lag of newly queued requests, offset reset
    assert group_state(book.run(STATE), group) == "Empty"
    before = (await committed_offsets(kafka_bootstrap, group))[(requests, 0)]  # 6, or 7 if the replay hashed to 0
    await produce_many(kafka_bootstrap, requests, [(f"late-{i}", annotation_request()) for i in range(3)], partition=0)
    lag = book.run(LAG)
    assert f"Consumer group '{group}' has no active members." in book.stderr
    row0 = next(r for r in table(lag) if r["TOPIC"] == requests and r["PARTITION"] == "0")
    assert (row0["CURRENT-OFFSET"], row0["LOG-END-OFFSET"], row0["LAG"]) == (str(before), str(before + 3), "3"), row0
    planned = new_offsets(book.run(RESET_DRY_RUN), group, requests)
    assert len(planned) == 24 and set(planned.values()) == {0}, planned
    assert (await committed_offsets(kafka_bootstrap, group))[(requests, 0)] == before  # a dry run changes nothing
    applied = new_offsets(book.run(RESET_EXECUTE), group, requests)
    assert applied == planned, applied
    committed = await committed_offsets(kafka_bootstrap, group)
    assert committed[(requests, 0)] == 0, committed

    # -- SCRAM credential for a user
    assert f"Completed updating config for user {user}." in book.run(SCRAM_SET)
    assert (f"SCRAM credential configs for user-principal '{user}' are SCRAM-SHA-512=iterations=4096"
            in book.run(SCRAM_DESCRIBE))

    assert book.ran == set(CASES), f"runbook blocks not run: {set(CASES) - book.ran}"
