"""The planner's statistics of the tasks table, kept fresh after bulk loads.

PostgreSQL's autovacuum analyzes a table a while after a fifth of it
changed (it looks once a minute). Until then the planner believes a table
loaded from empty is still empty, and a page of a user's tasks sorted all
of them: 106-180 ms for 50 of 200,000 tasks, where the index serves it in
2-4 ms. So each process analyzes the table itself, on a thread of its own,
once the tasks it stored since the last analysis pass a share of the table.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import Engine, text

log = logging.getLogger(__name__)


class FreshStatistics:
    def __init__(self, engine: Engine, *, min_rows: int = 10_000, share: float = 0.2) -> None:
        self._engine = engine
        self._min_rows = min_rows
        self._share = share
        self._threshold = min_rows
        self._inserted = 0
        self._running = False
        self._lock = threading.Lock()
        self.analyses = 0  # finished analyses, for tests and operators

    def stored(self, count: int) -> None:
        """``count`` tasks were stored: analyze once enough have been."""
        if self._engine.dialect.name != "postgresql":
            return  # SQLite: one process, small tables; its planner needs no help here
        with self._lock:
            self._inserted += count
            if self._running or self._inserted < self._threshold:
                return
            self._inserted = 0
            self._running = True
        threading.Thread(target=self._analyze, name="analyze-tasks", daemon=True).start()

    def _analyze(self) -> None:
        try:
            with self._engine.connect() as conn:
                conn.execute(text("ANALYZE tasks"))
                rows = conn.execute(
                    text("SELECT reltuples FROM pg_class WHERE relname = 'tasks'")
                ).scalar()
                conn.commit()
            self._threshold = max(self._min_rows, int(self._share * max(float(rows or 0), 0.0)))
            self.analyses += 1
        except Exception:
            log.warning("ANALYZE tasks failed; the next stored tasks try again", exc_info=True)
        finally:
            with self._lock:
                self._running = False
