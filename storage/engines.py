"""Engines for the primary database (and, later, read replicas)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event

CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_S = 60


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
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
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=10,
        pool_pre_ping=True,
        connect_args={
            "connect_timeout": CONNECT_TIMEOUT_S,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "options": f"-c statement_timeout={STATEMENT_TIMEOUT_S * 1000}",
        },
    )
