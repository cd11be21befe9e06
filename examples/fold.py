"""Reference fold: the workers' result and status events into a SQL database: SQLite (standard library, the
zero-setup default) or PostgreSQL (psycopg 3), the same SQL for both (``examples/fold_db.py``).

The backend team can copy this as the reference for its own fold. Rules it shows:

- **Idempotent by message id.** Every event carries a deterministic ``message_id``; a message already
  folded is skipped, so redeliveries and full replays (from offset 0, any number of times) leave the
  tables byte-identical.
- **Never backwards.** A training event whose ``seq`` is lower than the job's stored ``seq`` is ignored
  (an old ``running`` after ``completed`` does not reopen the job). Terminal events have the highest seq.
- **Parts.** Annotation results may come in parts; each part is folded on its own and the request is
  complete when ``parts_received == parts``.
- **Commit after the database.** The Kafka offset is committed only after the SQL transaction.
- **Safe with two folds at once.** Every write is an upsert keyed by a primary key, and the message id is
  claimed first (``INSERT ... ON CONFLICT DO NOTHING``), so two consumers folding the same record during a
  rebalance fold it once; counters add in SQL (``parts_received = parts_received + 1``), never read-modify-
  write in Python; ``seq`` is compared in the upsert's ``WHERE``.
- **A bad event is recorded, never a crash.** An event the fold cannot store (a field missing or of the wrong
  type, a NUL character, which PostgreSQL's text cannot hold, a non-finite number, an integer beyond 64 bits)
  is rolled back and recorded in ``rejected_messages`` with the reason, the same way on both databases,
  and the consumer goes on.
- **Auto-accept by validated precision, not a guessed threshold.** A ``custom`` request with
  ``auto_accept_precision`` gets ``auto_accept: true`` on each image whose top-1 label the trained model's
  validated thresholds accept at that precision; :meth:`Fold.auto_apply` without a threshold applies exactly
  those. :meth:`Fold.auto_accept_threshold` reads a trained job's table (``metrics.auto_accept``) instead.

Tables: ``labels`` (AI predictions: image id, class, confidence, source 'ai', model, request id, rank),
``tags`` (a multi-label result's tag set per image: several rows, or none), ``applied_tags`` (the tags a workflow
accepted, several per image: :meth:`Fold.apply_tags`), ``image_errors``, ``annotation_requests``, ``training_jobs``, ``applied_labels`` (what a labeling
workflow accepted), ``embedding_parts`` (embed results: where each part's vectors are), ``duplicate_groups`` and
``duplicate_members`` (an embed request's duplicate groups), ``few_shot_requests`` (what a few-shot classify
request learned from: method, examples, cross-validated accuracy), ``audit_requests`` (an audit's summary and
files), ``audit_entries`` (one row per audited image: label, label_issue, suggested_label, scores, rank; the review
queue is ``ORDER BY rank``), ``label_conflicts`` (an audit's disagreeing near-duplicates), ``select_requests`` (a
selection's summary and CSV), ``selection_entries`` (one row per selected image: rank, score, reason, the head's
guess; the labeling queue is ``ORDER BY rank``), ``folded_messages``
(idempotency), ``rejected_messages`` (events that could not be folded).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cls_client import check_storable, read_event
from examples.fold_db import connect

# Portable types only: TEXT, INTEGER, BIGINT (seq reaches 2**53 - 1), DOUBLE PRECISION (PostgreSQL's REAL
# is 4-byte). JSON values are stored as canonical text in both databases.
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
    confidence DOUBLE PRECISION NOT NULL,
    margin DOUBLE PRECISION,
    auto_accept INTEGER,
    source TEXT NOT NULL DEFAULT 'ai',
    model TEXT NOT NULL,
    PRIMARY KEY (request_id, image_id, class)
);
CREATE TABLE IF NOT EXISTS tags (
    request_id TEXT NOT NULL,
    image_id TEXT NOT NULL,
    class TEXT NOT NULL,
    confidence DOUBLE PRECISION,
    model TEXT NOT NULL,
    PRIMARY KEY (request_id, image_id, class)
);
CREATE TABLE IF NOT EXISTS applied_tags (
    image_id TEXT NOT NULL,
    class TEXT NOT NULL,
    confidence DOUBLE PRECISION,
    source TEXT NOT NULL,
    model TEXT NOT NULL,
    request_id TEXT NOT NULL,
    PRIMARY KEY (image_id, class)
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
    seq BIGINT NOT NULL,
    attempt INTEGER NOT NULL,
    progress TEXT,
    metrics TEXT,
    model_url TEXT,
    error TEXT,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS embedding_parts (
    request_id TEXT NOT NULL,
    part INTEGER NOT NULL,
    embeddings_url TEXT,
    dim INTEGER,
    images INTEGER NOT NULL,
    model TEXT NOT NULL,
    duplicates_url TEXT,
    PRIMARY KEY (request_id, part)
);
CREATE TABLE IF NOT EXISTS duplicate_groups (
    request_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    kind TEXT NOT NULL,
    similarity DOUBLE PRECISION NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (request_id, position)
);
CREATE TABLE IF NOT EXISTS duplicate_members (
    request_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    image_id TEXT NOT NULL,
    PRIMARY KEY (request_id, position, image_id)
);
CREATE INDEX IF NOT EXISTS duplicate_members_by_image ON duplicate_members (image_id);
CREATE TABLE IF NOT EXISTS audit_requests (
    request_id TEXT PRIMARY KEY,
    audit_url TEXT,
    embeddings_url TEXT,
    label_conflicts_url TEXT,
    images INTEGER NOT NULL,
    audited INTEGER NOT NULL,
    label_issues INTEGER NOT NULL,
    label_conflicts INTEGER NOT NULL,
    classes INTEGER NOT NULL,
    folds INTEGER NOT NULL,
    cv_accuracy DOUBLE PRECISION NOT NULL,
    model TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_entries (
    request_id TEXT NOT NULL,
    image_id TEXT NOT NULL,
    rank INTEGER NOT NULL,
    label TEXT NOT NULL,
    label_probability DOUBLE PRECISION NOT NULL,
    label_issue INTEGER NOT NULL,
    suggested_label TEXT NOT NULL,
    suggested_probability DOUBLE PRECISION NOT NULL,
    issue_score DOUBLE PRECISION NOT NULL,
    outlier_score DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (request_id, image_id)
);
CREATE INDEX IF NOT EXISTS audit_entries_by_rank ON audit_entries (request_id, rank);
CREATE TABLE IF NOT EXISTS label_conflicts (
    request_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    image_a TEXT NOT NULL,
    image_b TEXT NOT NULL,
    label_a TEXT NOT NULL,
    label_b TEXT NOT NULL,
    similarity DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (request_id, position)
);
CREATE TABLE IF NOT EXISTS select_requests (
    request_id TEXT PRIMARY KEY,
    selection_url TEXT,
    strategy TEXT NOT NULL,
    requested_strategy TEXT NOT NULL,
    pool INTEGER NOT NULL,
    labeled INTEGER NOT NULL,
    selected INTEGER NOT NULL,
    cv_accuracy DOUBLE PRECISION,
    model TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS selection_entries (
    request_id TEXT NOT NULL,
    image_id TEXT NOT NULL,
    rank INTEGER NOT NULL,
    score DOUBLE PRECISION NOT NULL,
    reason TEXT NOT NULL,
    predicted TEXT,
    predicted_confidence DOUBLE PRECISION,
    PRIMARY KEY (request_id, image_id)
);
CREATE INDEX IF NOT EXISTS selection_entries_by_rank ON selection_entries (request_id, rank);
CREATE TABLE IF NOT EXISTS few_shot_requests (
    request_id TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    examples INTEGER NOT NULL,
    examples_failed INTEGER NOT NULL,
    examples_per_class TEXT NOT NULL,
    cv_accuracy DOUBLE PRECISION,
    fitted INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rejected_messages (
    message_id TEXT PRIMARY KEY,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS applied_labels (
    image_id TEXT PRIMARY KEY,
    class TEXT NOT NULL,
    confidence DOUBLE PRECISION NOT NULL,
    source TEXT NOT NULL,
    model TEXT NOT NULL,
    request_id TEXT NOT NULL
);
"""

JOB_COLUMNS = ("job_id", "status", "seq", "attempt", "progress", "metrics", "model_url", "error", "updated_at")
TABLES = ("annotation_requests", "labels", "image_errors", "training_jobs", "applied_labels", "folded_messages",
          "rejected_messages", "embedding_parts", "duplicate_groups", "duplicate_members", "few_shot_requests",
          "audit_requests", "audit_entries", "label_conflicts", "tags", "applied_tags", "select_requests",
          "selection_entries")
AUDIT_COLUMNS = ("image_id", "rank", "label", "label_probability", "label_issue", "suggested_label",
                 "suggested_probability", "issue_score", "outlier_score")
SELECTION_COLUMNS = ("image_id", "rank", "score", "reason", "predicted", "predicted_confidence")
MAX_REASON_CHARS = 500


def _text(value: Any) -> str:
    """A value for a TEXT column: SQLite would store any type there, PostgreSQL refuses; both refuse here."""
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _number(value: Any) -> float:
    """A value for a DOUBLE PRECISION column (see :func:`_text`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _int(value: Any) -> int:
    """A value for an INTEGER/BIGINT column (see :func:`_text`)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _flag(value: Any) -> int:
    """A boolean for an INTEGER column (0/1, the same in both databases)."""
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {type(value).__name__}")
    return int(value)


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))


class Fold:
    """Folds events into one database: a SQLite file path (default) or a ``postgresql://`` URL.

    Thread-confined: use one ``Fold`` from one thread (open one per thread or process; they may share the
    database)."""

    def __init__(self, target: str | Path) -> None:
        self.target = target
        self.db = connect(target)
        self.db.create_schema(SCHEMA)

    @property
    def dialect(self) -> str:
        return self.db.dialect

    def close(self) -> None:
        self.db.close()

    def apply(self, topic: str, value: bytes | None) -> bool:
        """Fold one record; returns False when it was skipped (already folded, or not an event)."""
        event = read_event(value)  # the client's parsing: None for anything that is not a result/status event
        if event is None:
            return False
        message_id, kind = event["message_id"], event["event_type"]
        try:
            check_storable(event)
            with self.db.transaction():
                # Claim the message id first: a concurrent fold of the same record waits here, then skips it.
                if not self.db.execute("INSERT INTO folded_messages (message_id, topic) VALUES (?, ?)"
                                       " ON CONFLICT (message_id) DO NOTHING", (message_id, topic)):
                    return False
                if kind == "annotation.result":
                    self._annotation(event)
                else:
                    self._training(event)
        except (KeyError, TypeError, ValueError, AttributeError, *self.db.value_errors) as exc:
            self._reject(message_id, topic, exc)
            return False
        return True

    def _reject(self, message_id: Any, topic: str, exc: BaseException) -> None:
        """Record an event that could not be folded (its transaction was rolled back); idempotent on replay."""
        reason = f"{type(exc).__name__}: {exc}"[:MAX_REASON_CHARS]
        key = json.dumps(message_id)[:1000]  # JSON-escaped, so an id with a NUL is recorded too
        with self.db.transaction():
            self.db.execute("INSERT INTO rejected_messages (message_id, topic, reason) VALUES (?, ?, ?)"
                            " ON CONFLICT (message_id) DO NOTHING", (key, topic, reason.replace("\x00", "\\0")))

    def _annotation(self, event: dict[str, Any]) -> None:
        request_id = _text(event["request_id"])
        _text(event["status"])
        model = event.get("model") or {}
        model_name = "/".join(str(model.get(k, "")) for k in ("family", "variant", "weights")) if model else None
        self.db.execute(
            "INSERT INTO annotation_requests (request_id, status, model, parts, parts_received, error, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO UPDATE SET"
            " status = CASE WHEN annotation_requests.status = 'failed' THEN 'failed' ELSE excluded.status END,"
            " model = COALESCE(excluded.model, annotation_requests.model), parts = excluded.parts,"
            " parts_received = annotation_requests.parts_received + excluded.parts_received,"
            " error = COALESCE(excluded.error, annotation_requests.error), updated_at = excluded.updated_at",
            (request_id, event["status"], model_name, _int(event.get("parts", 1)), 1 if event["status"] == "completed" else 0,
             _json(event.get("error")), _text(event["created_at"])),
        )
        for result in event.get("results", []):
            image_id = _text(result["id"])
            # The latest result for an image replaces any earlier one (its labels and its error).
            self.db.execute("DELETE FROM labels WHERE request_id = ? AND image_id = ?", (request_id, image_id))
            self.db.execute("DELETE FROM image_errors WHERE request_id = ? AND image_id = ?", (request_id, image_id))
            self.db.execute("DELETE FROM tags WHERE request_id = ? AND image_id = ?", (request_id, image_id))
            confidences = {_text(p["class"]): _number(p["confidence"]) for p in result.get("predictions", [])}
            for tag in result.get("labels") or []:  # a multi-label result: the image's tag set
                self.db.execute(
                    "INSERT INTO tags (request_id, image_id, class, confidence, model) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (request_id, image_id, class) DO NOTHING",
                    (request_id, image_id, _text(tag), confidences.get(_text(tag)), model_name or ""),
                )
            if result.get("error"):
                self.db.execute(
                    "INSERT INTO image_errors (request_id, image_id, code, message) VALUES (?, ?, ?, ?)",
                    (request_id, image_id, _text(result["error"]["code"]), _text(result["error"]["message"])),
                )
            accept = result.get("auto_accept")
            for rank, prediction in enumerate(result.get("predictions", [])):
                self.db.execute(
                    "INSERT INTO labels (request_id, image_id, rank, class, confidence, margin, auto_accept, source,"
                    " model) VALUES (?, ?, ?, ?, ?, ?, ?, 'ai', ?) ON CONFLICT (request_id, image_id, class) DO UPDATE"
                    " SET rank = excluded.rank, confidence = excluded.confidence, margin = excluded.margin,"
                    " auto_accept = excluded.auto_accept, model = excluded.model",
                    (request_id, image_id, rank, _text(prediction["class"]), _number(prediction["confidence"]),
                     None if result.get("margin") is None else _number(result["margin"]),
                     None if accept is None or rank else int(bool(accept)), model_name or ""),
                )

        if event.get("task") == "embed" and event["status"] == "completed":
            self._embedding(request_id, event, model_name or "")
        if event.get("few_shot") is not None:
            self._few_shot(request_id, event["few_shot"])
        if event.get("task") == "audit" and event["status"] == "completed":
            self._audit(request_id, event, model_name or "")
        if event.get("task") == "select" and event["status"] == "completed":
            self._selection(request_id, event, model_name or "")

    def _selection(self, request_id: str, event: dict[str, Any], model_name: str) -> None:
        """A select part: the request's summary and CSV, one row per selected image (its rank in the labeling queue)."""
        summary = event["select_summary"]
        cv = summary.get("cv_accuracy")
        self.db.execute(
            "INSERT INTO select_requests (request_id, selection_url, strategy, requested_strategy, pool, labeled,"
            " selected, cv_accuracy, model) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (request_id) DO UPDATE SET selection_url = excluded.selection_url,"
            " strategy = excluded.strategy, requested_strategy = excluded.requested_strategy, pool = excluded.pool,"
            " labeled = excluded.labeled, selected = excluded.selected, cv_accuracy = excluded.cv_accuracy,"
            " model = excluded.model",
            (request_id, event.get("selection_url"), _text(summary["strategy"]), _text(summary["requested_strategy"]),
             _int(summary["pool"]), _int(summary["labeled"]), _int(summary["selected"]),
             None if cv is None else _number(cv), model_name),
        )
        for entry in event.get("selection") or []:
            guess = entry.get("predicted")
            self.db.execute(
                "INSERT INTO selection_entries (request_id, image_id, rank, score, reason, predicted,"
                " predicted_confidence) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (request_id, image_id) DO UPDATE SET rank = excluded.rank, score = excluded.score,"
                " reason = excluded.reason, predicted = excluded.predicted,"
                " predicted_confidence = excluded.predicted_confidence",
                (request_id, _text(entry["id"]), _int(entry["rank"]), _number(entry["score"]), _text(entry["reason"]),
                 None if guess is None else _text(guess["class"]), None if guess is None else _number(guess["confidence"])),
            )

    def _audit(self, request_id: str, event: dict[str, Any], model_name: str) -> None:
        """An audit part: the request's summary and file URLs, one row per audited image (its rank in the review
        queue), and the last part's label conflicts."""
        summary = event["audit_summary"]
        self.db.execute(
            "INSERT INTO audit_requests (request_id, audit_url, embeddings_url, label_conflicts_url, images, audited,"
            " label_issues, label_conflicts, classes, folds, cv_accuracy, model) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (request_id) DO UPDATE SET audit_url = excluded.audit_url,"
            " embeddings_url = excluded.embeddings_url,"
            " label_conflicts_url = COALESCE(excluded.label_conflicts_url, audit_requests.label_conflicts_url),"
            " images = excluded.images, audited = excluded.audited, label_issues = excluded.label_issues,"
            " label_conflicts = excluded.label_conflicts, classes = excluded.classes, folds = excluded.folds,"
            " cv_accuracy = excluded.cv_accuracy, model = excluded.model",
            (request_id, event.get("audit_url"), event.get("embeddings_url"), event.get("label_conflicts_url"),
             _int(summary["images"]), _int(summary["audited"]), _int(summary["label_issues"]),
             _int(summary["label_conflicts"]), _int(summary["classes"]), _int(summary["folds"]),
             _number(summary["cv_accuracy"]), model_name),
        )
        for result in event.get("results", []):
            entry = result.get("audit")
            if entry is None:
                continue  # an error entry: image_errors has it
            self.db.execute(
                "INSERT INTO audit_entries (request_id, image_id, rank, label, label_probability, label_issue,"
                " suggested_label, suggested_probability, issue_score, outlier_score) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (request_id, image_id) DO UPDATE SET rank = excluded.rank, label = excluded.label,"
                " label_probability = excluded.label_probability, label_issue = excluded.label_issue,"
                " suggested_label = excluded.suggested_label, suggested_probability = excluded.suggested_probability,"
                " issue_score = excluded.issue_score, outlier_score = excluded.outlier_score",
                (request_id, _text(result["id"]), _int(entry["rank"]), _text(entry["label"]),
                 _number(entry["label_probability"]), _flag(entry["label_issue"]), _text(entry["suggested_label"]),
                 _number(entry["suggested_probability"]), _number(entry["issue_score"]), _number(entry["outlier_score"])),
            )
        conflicts = event.get("label_conflicts")
        if conflicts is None:
            return
        self.db.execute("DELETE FROM label_conflicts WHERE request_id = ?", (request_id,))
        for position, conflict in enumerate(conflicts):
            (image_a, image_b), (label_a, label_b) = conflict["ids"], conflict["labels"]
            self.db.execute("INSERT INTO label_conflicts (request_id, position, image_a, image_b, label_a, label_b,"
                            " similarity) VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (request_id, position, _text(image_a), _text(image_b), _text(label_a), _text(label_b),
                             _number(conflict["similarity"])))

    def _few_shot(self, request_id: str, summary: dict[str, Any]) -> None:
        """A few-shot classify part's summary (the same on every part; the latest part folded wins)."""
        counts = {_text(name): _int(n) for name, n in summary["examples_per_class"].items()}
        cv = summary.get("cv_accuracy")
        self.db.execute(
            "INSERT INTO few_shot_requests (request_id, method, examples, examples_failed, examples_per_class,"
            " cv_accuracy, fitted) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO UPDATE SET"
            " method = excluded.method, examples = excluded.examples, examples_failed = excluded.examples_failed,"
            " examples_per_class = excluded.examples_per_class, cv_accuracy = excluded.cv_accuracy,"
            " fitted = excluded.fitted",
            (request_id, _text(summary["method"]), sum(counts.values()), _int(summary["examples_failed"]),
             _json(counts), None if cv is None else _number(cv), int(bool(summary["fitted"]))),
        )

    def _embedding(self, request_id: str, event: dict[str, Any], model_name: str) -> None:
        """An embed part: where its vectors are; the last part's duplicate groups (one row each, members apart
        so "which groups hold this image" is one indexed lookup)."""
        self.db.execute(
            "INSERT INTO embedding_parts (request_id, part, embeddings_url, dim, images, model, duplicates_url)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id, part) DO UPDATE SET"
            " embeddings_url = excluded.embeddings_url, dim = excluded.dim, images = excluded.images,"
            " model = excluded.model, duplicates_url = excluded.duplicates_url",
            (request_id, event.get("part", 0), event.get("embeddings_url"), event.get("dim"),
             sum(1 for r in event.get("results", []) if not r.get("error")), model_name, event.get("duplicates_url")),
        )
        groups = event.get("duplicates")
        if groups is None:
            return
        self.db.execute("DELETE FROM duplicate_members WHERE request_id = ?", (request_id,))
        self.db.execute("DELETE FROM duplicate_groups WHERE request_id = ?", (request_id,))
        for position, group in enumerate(groups):
            ids = list(dict.fromkeys(_text(i) for i in group["ids"]))
            self.db.execute("INSERT INTO duplicate_groups (request_id, position, kind, similarity, size)"
                            " VALUES (?, ?, ?, ?, ?)",
                            (request_id, position, _text(group["kind"]), _number(group["similarity"]), len(ids)))
            for image_id in ids:
                self.db.execute("INSERT INTO duplicate_members (request_id, position, image_id) VALUES (?, ?, ?)",
                                (request_id, position, image_id))

    def _training(self, event: dict[str, Any]) -> None:
        # The WHERE keeps a job from moving backwards: an event older than the stored seq changes nothing.
        self.db.execute(
            "INSERT INTO training_jobs (job_id, status, seq, attempt, progress, metrics, model_url, error, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id) DO UPDATE SET status = excluded.status,"
            " seq = excluded.seq, attempt = excluded.attempt,"
            " progress = COALESCE(excluded.progress, training_jobs.progress),"
            " metrics = COALESCE(excluded.metrics, training_jobs.metrics), model_url = excluded.model_url,"
            " error = excluded.error, updated_at = excluded.updated_at WHERE training_jobs.seq <= excluded.seq",
            (_text(event["job_id"]), _text(event["status"]), _int(event["seq"]), _int(event.get("attempt", 1)),
             _json(event.get("progress")), _json(event.get("metrics")), event.get("model_url"), _json(event.get("error")),
             _text(event["created_at"])),
        )

    # ------------------------------------------------------------------ queries the workflows use
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Rows of a read-only query (``?`` placeholders, portable SQL): for the demo and the tests."""
        return self.db.fetchall(sql, params)

    def request_complete(self, request_id: str) -> bool:
        rows = self.db.fetchall("SELECT status, parts, parts_received FROM annotation_requests WHERE request_id = ?",
                                (request_id,))
        return bool(rows) and (rows[0][0] == "failed" or rows[0][2] >= rows[0][1])

    def job(self, job_id: str) -> dict[str, Any] | None:
        rows = self.db.fetchall(f"SELECT {', '.join(JOB_COLUMNS)} FROM training_jobs WHERE job_id = ?",  # noqa: S608
                                (job_id,))
        if not rows:
            return None
        out = dict(zip(JOB_COLUMNS, rows[0], strict=True))
        for key in ("progress", "metrics", "error"):
            out[key] = json.loads(out[key]) if out[key] else None
        return out

    def duplicates(self, request_id: str) -> list[dict[str, Any]]:
        """The duplicate groups folded for an embed request, in event order: ``{"kind", "similarity", "ids"}`` (ids sorted)."""
        groups = self.db.fetchall("SELECT position, kind, similarity FROM duplicate_groups WHERE request_id = ?"
                                  " ORDER BY position", (request_id,))
        members: dict[int, list[str]] = {}
        for position, image_id in self.db.fetchall("SELECT position, image_id FROM duplicate_members"
                                                   " WHERE request_id = ? ORDER BY position, image_id", (request_id,)):
            members.setdefault(position, []).append(image_id)
        return [{"kind": kind, "similarity": similarity, "ids": members.get(position, [])}
                for position, kind, similarity in groups]

    def review_queue(self, request_id: str, limit: int = 100, issues_only: bool = False) -> list[dict[str, Any]]:
        """An audit's images in review order (rank; parts may arrive in any order): ``AUDIT_COLUMNS`` per row,
        ``label_issue`` as a bool; with ``issues_only``, the flagged ones only."""
        condition = " AND label_issue = 1" if issues_only else ""
        rows = self.db.fetchall(f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit_entries WHERE request_id = ?{condition}"  # noqa: S608
                                " ORDER BY rank LIMIT ?", (request_id, limit))
        return [{**dict(zip(AUDIT_COLUMNS, row, strict=True)), "label_issue": bool(row[4])} for row in rows]

    def labeling_queue(self, request_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """A selection's images in rank order (parts may arrive in any order): ``SELECTION_COLUMNS`` per row."""
        rows = self.db.fetchall(f"SELECT {', '.join(SELECTION_COLUMNS)} FROM selection_entries WHERE request_id = ?"  # noqa: S608
                                " ORDER BY rank LIMIT ?", (request_id, limit))
        return [dict(zip(SELECTION_COLUMNS, row, strict=True)) for row in rows]

    def auto_apply(self, request_id: str, threshold: float | None = None) -> int:
        """Accept each image's top-1 AI label: the ones the worker marked ``auto_accept`` (the request named an
        ``auto_accept_precision``), or, given ``threshold``, those whose confidence is at least ``threshold``."""
        condition = "auto_accept = 1" if threshold is None else "confidence >= ?"
        with self.db.transaction():
            return self.db.execute(
                "INSERT INTO applied_labels (image_id, class, confidence, source, model, request_id)"
                " SELECT image_id, class, confidence, 'ai', model, request_id FROM labels"
                f" WHERE request_id = ? AND rank = 0 AND {condition}"  # noqa: S608 (fixed condition strings)
                " ON CONFLICT (image_id) DO UPDATE SET class = excluded.class, confidence = excluded.confidence,"
                " source = excluded.source, model = excluded.model, request_id = excluded.request_id",
                (request_id,) if threshold is None else (request_id, threshold),
            )

    def apply_tags(self, request_id: str) -> int:
        """Accept a multi-label request's tag sets: each image it answered gets exactly its tags in
        ``applied_tags`` (several, or none: an image with no tag has its earlier AI tags removed). Returns the
        number of tags stored."""
        with self.db.transaction():
            images = [row[0] for row in self.db.fetchall(
                "SELECT DISTINCT image_id FROM labels WHERE request_id = ? UNION"
                " SELECT DISTINCT image_id FROM tags WHERE request_id = ?", (request_id, request_id))]
            for image_id in images:
                self.db.execute("DELETE FROM applied_tags WHERE image_id = ? AND source = 'ai'", (image_id,))
            return self.db.execute(
                "INSERT INTO applied_tags (image_id, class, confidence, source, model, request_id)"
                " SELECT image_id, class, confidence, 'ai', model, request_id FROM tags WHERE request_id = ?"
                " ON CONFLICT (image_id, class) DO UPDATE SET confidence = excluded.confidence,"
                " model = excluded.model, request_id = excluded.request_id",
                (request_id,),
            )

    def tags_of(self, image_id: str) -> list[str]:
        """The accepted tags of one image, sorted."""
        return [row[0] for row in self.db.fetchall("SELECT class FROM applied_tags WHERE image_id = ? ORDER BY class",
                                                   (image_id,))]

    def auto_accept_threshold(self, job_id: str, precision: float) -> float | None:
        """The global confidence threshold a completed training job validated for ``precision`` (the smallest
        tabulated target at or above it); None when there is none (never auto-accept at that precision)."""
        job = self.job(job_id)
        rows = ((job or {}).get("metrics") or {}).get("auto_accept") or []
        eligible = sorted((row["precision"], row["threshold"]) for row in rows if row["precision"] >= precision - 1e-12)
        return eligible[0][1] if eligible else None

    def dump(self, tables: Iterable[str] = TABLES) -> dict[str, list[tuple]]:
        """Every row of the tables, ordered: for comparing databases (also a SQLite one with a PostgreSQL one)."""
        return {t: sorted(self.db.fetchall(f"SELECT * FROM {t}"), key=repr) for t in tables}  # noqa: S608


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
