"""Reference fold: the workers' result and status events into a SQL database (SQLite, standard library).

The backend team can copy this as the reference for its own fold. Rules it shows:

- **Idempotent by message id.** Every event carries a deterministic ``message_id``; a message already
  folded is skipped, so redeliveries and full replays (from offset 0, any number of times) leave the
  tables byte-identical.
- **Never backwards.** A training event whose ``seq`` is lower than the job's stored ``seq`` is ignored
  (an old ``running`` after ``completed`` does not reopen the job). Terminal events have the highest seq.
- **Parts.** Annotation results may come in parts; each part is folded on its own and the request is
  complete when ``parts_received == parts``.
- **Commit after the database.** The Kafka offset is committed only after the SQL transaction.
- **Auto-accept by validated precision, not a guessed threshold.** A ``custom`` request with
  ``auto_accept_precision`` gets ``auto_accept: true`` on each image whose top-1 label the trained model's
  validated thresholds accept at that precision; :meth:`Fold.auto_apply` without a threshold applies exactly
  those. :meth:`Fold.auto_accept_threshold` reads a trained job's table (``metrics.auto_accept``) instead.

Tables: ``labels`` (AI predictions: image id, class, confidence, source 'ai', model, request id, rank),
``image_errors``, ``annotation_requests``, ``training_jobs``, ``applied_labels`` (what a labeling
workflow accepted), ``folded_messages`` (idempotency).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS folded_messages (
    message_id TEXT PRIMARY KEY,
    topic TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS annotation_requests (
    request_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    model TEXT,
    parts INTEGER NOT NULL,
    parts_received INTEGER NOT NULL,
    error TEXT,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    request_id TEXT NOT NULL,
    image_id TEXT NOT NULL,
    rank INTEGER NOT NULL,
    class TEXT NOT NULL,
    confidence REAL NOT NULL,
    margin REAL,
    auto_accept INTEGER,
    source TEXT NOT NULL DEFAULT 'ai',
    model TEXT NOT NULL,
    PRIMARY KEY (request_id, image_id, class)
);
CREATE TABLE IF NOT EXISTS image_errors (
    request_id TEXT NOT NULL,
    image_id TEXT NOT NULL,
    code TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (request_id, image_id)
);
CREATE TABLE IF NOT EXISTS training_jobs (
    job_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    seq INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    progress TEXT,
    metrics TEXT,
    model_url TEXT,
    error TEXT,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS applied_labels (
    image_id TEXT PRIMARY KEY,
    class TEXT NOT NULL,
    confidence REAL NOT NULL,
    source TEXT NOT NULL,
    model TEXT NOT NULL,
    request_id TEXT NOT NULL
);
"""


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))


class Fold:
    """Folds events into one SQLite database (thread-confined: use it from one thread)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def apply(self, topic: str, value: bytes | None) -> bool:
        """Fold one record; returns False when it was skipped (already folded, or not an event)."""
        if value is None:
            return False
        try:
            event = json.loads(value)
        except ValueError:
            return False
        message_id = event.get("message_id")
        kind = event.get("event_type")
        if not message_id or kind not in ("annotation.result", "training.status"):
            return False
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if self.db.execute("SELECT 1 FROM folded_messages WHERE message_id = ?", (message_id,)).fetchone():
                self.db.execute("ROLLBACK")
                return False
            if kind == "annotation.result":
                self._annotation(event)
            else:
                self._training(event)
            self.db.execute("INSERT INTO folded_messages (message_id, topic) VALUES (?, ?)", (message_id, topic))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return True

    def _annotation(self, event: dict[str, Any]) -> None:
        request_id = event["request_id"]
        model = event.get("model") or {}
        model_name = "/".join(str(model.get(k, "")) for k in ("family", "variant", "weights")) if model else None
        row = self.db.execute("SELECT parts_received, status FROM annotation_requests WHERE request_id = ?",
                              (request_id,)).fetchone()
        received = (row[0] if row else 0) + (1 if event["status"] == "completed" else 0)
        status = event["status"]
        if row and row[1] == "failed":
            status = "failed"
        self.db.execute(
            "INSERT INTO annotation_requests (request_id, status, model, parts, parts_received, error, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(request_id) DO UPDATE SET status=excluded.status,"
            " model=COALESCE(excluded.model, annotation_requests.model), parts=excluded.parts,"
            " parts_received=excluded.parts_received, error=COALESCE(excluded.error, annotation_requests.error),"
            " updated_at=excluded.updated_at",
            (request_id, status, model_name, event.get("parts", 1), received, _json(event.get("error")), event["created_at"]),
        )
        for result in event.get("results", []):
            if result.get("error"):
                self.db.execute(
                    "INSERT OR REPLACE INTO image_errors (request_id, image_id, code, message) VALUES (?, ?, ?, ?)",
                    (request_id, result["id"], result["error"]["code"], result["error"]["message"]),
                )
            accept = result.get("auto_accept")
            for rank, prediction in enumerate(result.get("predictions", [])):
                self.db.execute(
                    "INSERT OR REPLACE INTO labels (request_id, image_id, rank, class, confidence, margin, auto_accept,"
                    " source, model) VALUES (?, ?, ?, ?, ?, ?, ?, 'ai', ?)",
                    (request_id, result["id"], rank, prediction["class"], prediction["confidence"], result.get("margin"),
                     None if accept is None or rank else int(bool(accept)), model_name or ""),
                )

    def _training(self, event: dict[str, Any]) -> None:
        job_id = event["job_id"]
        row = self.db.execute("SELECT seq FROM training_jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is not None and event["seq"] < row[0]:
            return  # older than what we have: never move a job backwards
        self.db.execute(
            "INSERT INTO training_jobs (job_id, status, seq, attempt, progress, metrics, model_url, error, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(job_id) DO UPDATE SET status=excluded.status,"
            " seq=excluded.seq, attempt=excluded.attempt, progress=COALESCE(excluded.progress, training_jobs.progress),"
            " metrics=COALESCE(excluded.metrics, training_jobs.metrics), model_url=excluded.model_url,"
            " error=excluded.error, updated_at=excluded.updated_at",
            (job_id, event["status"], event["seq"], event.get("attempt", 1), _json(event.get("progress")),
             _json(event.get("metrics")), event.get("model_url"), _json(event.get("error")), event["created_at"]),
        )

    # ------------------------------------------------------------------ queries the workflows use
    def request_complete(self, request_id: str) -> bool:
        row = self.db.execute("SELECT status, parts, parts_received FROM annotation_requests WHERE request_id = ?",
                              (request_id,)).fetchone()
        return bool(row) and (row[0] == "failed" or row[2] >= row[1])

    def job(self, job_id: str) -> dict[str, Any] | None:
        cur = self.db.execute("SELECT * FROM training_jobs WHERE job_id = ?", (job_id,))
        row = cur.fetchone()
        if row is None:
            return None
        out = dict(zip([c[0] for c in cur.description], row, strict=True))
        for key in ("progress", "metrics", "error"):
            out[key] = json.loads(out[key]) if out[key] else None
        return out

    def auto_apply(self, request_id: str, threshold: float | None = None) -> int:
        """Accept each image's top-1 AI label: the ones the worker marked ``auto_accept`` (the request named an
        ``auto_accept_precision``), or, given ``threshold``, those whose confidence is at least ``threshold``."""
        self.db.execute("BEGIN IMMEDIATE")
        condition = "auto_accept = 1" if threshold is None else "confidence >= ?"
        cur = self.db.execute(
            "INSERT OR REPLACE INTO applied_labels (image_id, class, confidence, source, model, request_id)"
            " SELECT image_id, class, confidence, 'ai', model, request_id FROM labels"
            f" WHERE request_id = ? AND rank = 0 AND {condition}",  # noqa: S608 (fixed condition strings)
            (request_id,) if threshold is None else (request_id, threshold),
        )
        self.db.execute("COMMIT")
        return cur.rowcount

    def auto_accept_threshold(self, job_id: str, precision: float) -> float | None:
        """The global confidence threshold a completed training job validated for ``precision`` (the smallest
        tabulated target at or above it); None when there is none (never auto-accept at that precision)."""
        job = self.job(job_id)
        rows = ((job or {}).get("metrics") or {}).get("auto_accept") or []
        eligible = sorted((row["precision"], row["threshold"]) for row in rows if row["precision"] >= precision - 1e-12)
        return eligible[0][1] if eligible else None

    def dump(self, tables: Iterable[str] = ("annotation_requests", "labels", "image_errors", "training_jobs",
                                            "applied_labels", "folded_messages")) -> dict[str, list[tuple]]:
        """Every row of the tables, ordered: for comparing databases."""
        return {t: sorted(self.db.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}  # noqa: S608


async def run_fold(fold: Fold, bootstrap_servers: str, topics: list[str], group_id: str,
                   stop: asyncio.Event, **client_kwargs: Any) -> int:
    """Consume ``topics`` in group ``group_id`` into ``fold`` until ``stop`` is set; returns events folded."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap_servers, group_id=group_id,
                                enable_auto_commit=False, auto_offset_reset="earliest", **client_kwargs)
    await consumer.start()
    folded = 0
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=500)
            for records in batches.values():
                for record in records:
                    folded += fold.apply(record.topic, record.value)
            if batches:
                await consumer.commit()  # after the SQL commits
    finally:
        await consumer.stop()
    return folded
