"""Engines for the primary database (and, later, read replicas)."""

from __future__ import annotations

import time
from typing import Any

from psycopg.types.array import ListBinaryDumper
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError

CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_S = 60
# A connection back in use within this long of its last use is not pinged:
# in steady work every checkout is that soon, and a ping per checkout was a
# round trip and a statement per transaction. A server that dropped it in
# between fails that one transaction (Unavailable: every caller retries)
# and the pool replaces all its connections.
PING_IDLE_S = 5.0
RECYCLE_S = 1800  # no connection outlives a server-side idle or lifetime limit


def make_engine(url: str, *, pool_size: int = 5, ping_idle_s: float = PING_IDLE_S) -> Engine:
    """An engine with the settings chronoray relies on per backend.

    SQLite (the embedded default) is shared by several actor processes, so
    it runs in WAL mode and waits for locks instead of failing at once.
    """
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # A half-open connection must not hang a fire loop: bounded connects,
    # TCP keepalives that notice a vanished server, bounded statements.
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=10,
        pool_recycle=RECYCLE_S,
        connect_args={
            "connect_timeout": CONNECT_TIMEOUT_S,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "options": f"-c statement_timeout={STATEMENT_TIMEOUT_S * 1000}",
        },
    )
    ping_when_idle(engine, ping_idle_s)
    event.listen(engine, "connect", _binary_arrays)
    return engine


def _binary_arrays(dbapi_conn: Any, _record: Any) -> None:
    """Send list parameters (the arrays of ``rows.rows_of`` and
    ``rows.among``) in PostgreSQL's binary format: psycopg's text format
    escapes every element in Python, 5.7 ms for the thousand ``execute_at``
    values of a batch insert against 0.4 ms in binary. psycopg defaults to
    text for lists as the more lenient with element types; ours hold one
    type each, and SQLAlchemy casts each array parameter to its column's
    type (tests/contract/test_connections.py round-trips every one)."""
    dbapi_conn.adapters.register_dumper(list, ListBinaryDumper)


def make_replica_engine(url: str, *, pool_size: int = 5) -> Engine:
    """A read replica's engine: pinged at every checkout, because only a
    checkout that fails sends a read to the primary instead
    (``Databases.read``); a query that fails on a dropped connection is an
    error to its caller."""
    return make_engine(url, pool_size=pool_size, ping_idle_s=0.0)


def ping_when_idle(engine: Engine, idle_s: float) -> None:
    """Ping a pooled connection at checkout only when it sat unused for
    ``idle_s`` or more; a ping that fails makes the pool discard it and
    check out (or open) another (``DisconnectionError``)."""

    @event.listens_for(engine, "connect")
    def _opened(_dbapi_conn: Any, record: Any) -> None:
        record.info["last_used"] = time.monotonic()

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info["last_used"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("last_used", 0.0) < idle_s:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            raise DisconnectionError(f"idle connection failed its ping: {exc}") from exc
