"""Unit tests' storage: a real SQLite database per test (the in-memory fake
was retired: it re-implemented idempotency and the state machine, and had no
schedules). Each database is a copy of one migrated template, so a test pays
for a file copy, not for the migrations."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import uuid
from pathlib import Path

from storage.engines import make_engine
from storage.migrate import upgrade
from storage.sql import SqlTaskRepository

_DIRECTORY = Path(tempfile.mkdtemp(prefix="chronoray-sqlite-"))
atexit.register(shutil.rmtree, _DIRECTORY, ignore_errors=True)
_TEMPLATE = _DIRECTORY / "template.db"


def sqlite_repository() -> SqlTaskRepository:
    """A freshly migrated, empty database of its own."""
    if not _TEMPLATE.exists():
        engine = make_engine(f"sqlite:///{_TEMPLATE}")
        upgrade(engine)
        with engine.connect() as conn:  # fold the WAL in, so one file is the whole database
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        engine.dispose()
    path = _DIRECTORY / f"{uuid.uuid4().hex}.db"
    shutil.copyfile(_TEMPLATE, path)
    return SqlTaskRepository(make_engine(f"sqlite:///{path}"))


def rows_in(repo: SqlTaskRepository, table: str) -> int:
    """How many rows ``table`` holds (to show that bad input stored nothing)."""
    with repo.engine.connect() as conn:
        return int(conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one())
