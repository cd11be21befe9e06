"""The reference fold's database layer: one small interface over SQLite (standard library) and PostgreSQL
(psycopg 3), so the fold's SQL is written once.

The fold writes portable SQL: ``?`` placeholders, ``INSERT ... ON CONFLICT (...) DO UPDATE/NOTHING``
(SQLite >= 3.24 and PostgreSQL >= 9.5), ``CASE``/``COALESCE``, and column types both understand
(``TEXT``, ``INTEGER``, ``BIGINT``, ``DOUBLE PRECISION``; PostgreSQL's ``REAL`` is 4-byte, so the fold
never uses it). Each backend translates only what must differ: the placeholder style, how a write
transaction starts, and how the schema is created once when several folds start at the same moment.

``connect(target)``: a ``postgresql://`` (or ``postgres://``) URL opens PostgreSQL, anything else is a
SQLite file path (``":memory:"`` works too). psycopg is imported only for PostgreSQL, so the SQLite
default needs nothing beyond the standard library.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class Database(Protocol):
    """What the fold needs from a database: statements with ``?`` placeholders, and write transactions."""

    dialect: str
    value_errors: tuple[type[Exception], ...]  # the database refused a value (constraint, type, range)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Run one query; returns its rows as tuples."""

    def transaction(self) -> Any:
        """A context manager: one write transaction, committed on exit, rolled back on an exception."""

    def create_schema(self, script: str) -> None:
        """Run ``;``-separated ``CREATE ... IF NOT EXISTS`` statements, once even when folds start together."""

    def close(self) -> None: ...


class SQLiteDatabase:
    """SQLite through the standard library; thread-confined like its connection."""

    dialect = "sqlite"
    value_errors = (sqlite3.IntegrityError, sqlite3.DataError, OverflowError)

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.connection = sqlite3.connect(self.path, isolation_level=None, timeout=30)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.connection.execute(sql, tuple(params)).rowcount

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self.connection.execute(sql, tuple(params)).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.connection.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlock between folds
        try:
            yield
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    def create_schema(self, script: str) -> None:
        self.connection.executescript(script)

    def close(self) -> None:
        self.connection.close()


class PostgresDatabase:
    """PostgreSQL through psycopg 3 (autocommit outside explicit transactions; READ COMMITTED inside).

    The fold's statements are single-row upserts keyed by primary keys, so concurrent folds (two consumers
    of the same group during a rebalance) serialise on the row locks: a message being folded by one blocks
    the other's ``INSERT ... ON CONFLICT DO NOTHING`` on ``folded_messages`` until it commits, then the
    other sees the conflict and skips it."""

    dialect = "postgresql"

    def __init__(self, url: str, connect_timeout_s: int = 10) -> None:
        import psycopg

        self.url = url
        self.value_errors = (psycopg.errors.DataError, psycopg.errors.IntegrityError)
        self.connection = psycopg.connect(url, autocommit=True, connect_timeout=connect_timeout_s)

    @staticmethod
    def _sql(sql: str) -> str:
        if "%" in sql:  # psycopg reads % as a placeholder; the fold's SQL never needs a literal one
            raise ValueError("the fold's SQL uses ? placeholders and no literal %")
        return sql.replace("?", "%s")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.connection.execute(self._sql(sql), tuple(params)).rowcount

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self.connection.execute(self._sql(sql), tuple(params)).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.connection.transaction():
            yield

    def create_schema(self, script: str) -> None:
        # CREATE TABLE IF NOT EXISTS is not safe against a concurrent identical CREATE in PostgreSQL
        # (a unique violation on pg_type): an advisory lock for the transaction makes it one at a time.
        with self.connection.transaction():
            self.connection.execute("SELECT pg_advisory_xact_lock(7213000001)")
            for statement in script.split(";"):
                if statement.strip():
                    self.connection.execute(statement)

    def close(self) -> None:
        self.connection.close()


def connect(target: str | Path) -> Database:
    """A PostgreSQL URL (``postgresql://user@host:port/db``) or a SQLite file path."""
    if isinstance(target, str) and target.startswith(POSTGRES_SCHEMES):
        return PostgresDatabase(target)
    return SQLiteDatabase(target)
