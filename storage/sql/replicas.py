"""Where a transaction runs: writes on the primary; queries on a read replica
when there is one, except for an owner whose last write the replica has not
replayed yet (read-your-writes by WAL position)."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from scheduling.errors import Unavailable

log = logging.getLogger(__name__)
REPLICA_PAUSE_S = 5.0  # an unreachable replica is skipped this long before it is tried again
CONFLICT_RETRIES = 3

T = TypeVar("T")
# A replica that cannot give a connection now (down, or every pooled one
# busy past the pool's wait) is skipped and the primary serves.
REPLICA_UNUSABLE = (OperationalError, InterfaceError, PoolTimeout)


@contextmanager
def _reachable() -> Iterator[None]:
    """Driver errors that mean "the database is not there" as Unavailable,
    and so a pool whose every connection stayed busy (the database slow or
    hung): a bounded wait, then a 503, not an unmapped error."""
    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        raise Unavailable(f"database unavailable: {exc.orig}") from exc
    except PoolTimeout as exc:
        raise Unavailable(f"database busy: no pooled connection came free ({exc})") from exc


class Databases:
    """The primary ``engine`` and its ``read_engines`` (PostgreSQL streaming
    replicas). Driver errors that mean "the database is not there" become
    Unavailable here, once, for every caller."""

    def __init__(self, engine: Engine, read_engines: Sequence[Engine] = ()) -> None:
        self.engine = engine
        self.read_engines = list(read_engines)
        self.tracks_writes = bool(self.read_engines)
        self._written: dict[int, str] = {}  # owner: primary WAL position after their last write
        self._turn = itertools.count()
        self._replica_down_until: dict[int, float] = {}  # id(engine): monotonic time

    @contextmanager
    def begin(self, engine: Engine | None = None) -> Iterator[Connection]:
        """A transaction on the primary (or ``engine``)."""
        with _reachable(), (engine or self.engine).begin() as conn:
            yield conn

    @contextmanager
    def statement(self) -> Iterator[Connection]:
        """A connection on the primary in autocommit, for work that is one
        statement (atomic by itself, and committed before it answers): one
        round trip where a transaction takes three (BEGIN, it, COMMIT)."""
        with _reachable(), self.engine.connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")

    def write(self, work: Callable[[Connection], T], *, what: str) -> T:
        """``work`` in one transaction on the primary, tried again when it
        lost a race on a unique key (two uploads taking the next version
        number, two submissions one idempotency key)."""
        for _ in range(CONFLICT_RETRIES):
            try:
                with self.begin() as conn:
                    return work(conn)
            except IntegrityError:
                log.info("unique-key race while trying to %s; retrying", what)
        raise Unavailable(f"could not {what} under contention; retry")

    @contextmanager
    def read(self, owner_id: int | None = None) -> Iterator[Connection]:
        """A read-only transaction on the engine ``reader`` picks; a replica
        that cannot be reached is skipped for ``REPLICA_PAUSE_S`` and the
        primary serves."""
        engine = self.reader(owner_id)
        if engine is not self.engine:
            try:
                connection = engine.connect()
            except REPLICA_UNUSABLE as exc:
                self._skip_replica(engine, exc)
                engine = self.engine
            else:
                try:
                    with connection, connection.begin():
                        yield connection
                except (OperationalError, InterfaceError) as exc:
                    raise Unavailable(f"read replica failed: {exc.orig}") from exc
                return
        with self.begin(engine) as conn:
            yield conn

    def note_write(self, owner_id: int) -> None:
        """Remember where the primary's log stands after this owner's write."""
        if not self.tracks_writes:
            return
        with self.begin() as conn:
            self._written[owner_id] = conn.execute(
                text("SELECT pg_current_wal_lsn()::text")
            ).scalar_one()

    def _skip_replica(self, replica: Engine, exc: Exception) -> None:
        self._replica_down_until[id(replica)] = time.monotonic() + REPLICA_PAUSE_S
        log.warning("read replica unreachable, reading from the primary: %s", exc)

    def reader(self, owner_id: int | None = None) -> Engine:
        """The engine a query for this owner goes to: a replica in turn,
        unless it is down or behind the owner's last write."""
        up = [
            engine
            for engine in self.read_engines
            if self._replica_down_until.get(id(engine), 0.0) <= time.monotonic()
        ]
        if not up:
            return self.engine
        replica = up[next(self._turn) % len(up)]
        position = self._written.get(owner_id) if owner_id is not None else None
        if position is None:
            return replica
        try:
            with replica.connect() as conn:
                caught_up = conn.execute(
                    text("SELECT pg_last_wal_replay_lsn() >= CAST(:lsn AS pg_lsn)"),
                    {"lsn": position},
                ).scalar()
        except REPLICA_UNUSABLE as exc:
            self._skip_replica(replica, exc)
            return self.engine
        if not caught_up:
            return self.engine
        if owner_id is not None and self._written.get(owner_id) == position:
            self._written.pop(owner_id, None)  # a newer write keeps its own mark
        return replica
