"""Pooled PostgreSQL connections: pinged only after sitting idle (no round
trip per checkout in steady work), and a connection the server dropped is
replaced, by the ping or by the pool after the one transaction it failed."""

import time
from datetime import datetime, timezone

import pytest
from psycopg.adapt import PyFormat
from psycopg.types.array import ListBinaryDumper
from sqlalchemy import Boolean, Float, Integer, String, bindparam, create_engine, func, select, text

from scheduling.errors import Unavailable
from storage.engines import make_engine
from storage.schema import Id, UtcDateTime
from storage.sql import rows
from storage.sql.replicas import Databases
from tests.conftest import postgres_admin_url

pytestmark = pytest.mark.postgres

IDLE_S = 0.5


@pytest.fixture
def counted():
    """An engine on the test server whose pings are counted, and a way to
    end the server side of every connection it holds."""
    engine = make_engine(postgres_admin_url(), pool_size=2, ping_idle_s=IDLE_S)
    pings = []
    real_ping = engine.dialect.do_ping

    def counting_ping(dbapi_conn):
        pings.append(time.monotonic())
        return real_ping(dbapi_conn)

    engine.dialect.do_ping = counting_ping
    admin = create_engine(postgres_admin_url(), isolation_level="AUTOCOMMIT")

    def terminate(pids):
        with admin.connect() as conn:
            for pid in pids:
                conn.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid})

    yield engine, pings, terminate
    engine.dispose()
    admin.dispose()


def backend_pid(databases: Databases) -> int:
    with databases.begin() as conn:
        return conn.execute(text("SELECT pg_backend_pid()")).scalar_one()


def test_a_connection_used_again_soon_is_not_pinged(counted):
    engine, pings, _ = counted
    databases = Databases(engine)
    first = backend_pid(databases)
    for _ in range(20):
        assert backend_pid(databases) == first
    assert pings == []


def test_an_idle_connection_is_pinged_and_a_dropped_one_replaced_unseen(counted):
    engine, pings, terminate = counted
    databases = Databases(engine)
    dropped = backend_pid(databases)
    terminate([dropped])
    time.sleep(IDLE_S * 1.5)
    # the ping finds it gone; the pool opens another, the caller sees nothing
    assert backend_pid(databases) != dropped
    assert len(pings) == 1


def test_a_connection_dropped_while_busy_fails_one_transaction_and_the_pool_renews(counted):
    engine, _, terminate = counted
    databases = Databases(engine)
    with engine.connect() as first, engine.connect() as second:  # both pooled connections
        pids = [
            conn.execute(text("SELECT pg_backend_pid()")).scalar_one() for conn in (first, second)
        ]
        first.rollback()
        second.rollback()
    terminate(pids)
    with pytest.raises(Unavailable):
        backend_pid(databases)
    # the failure invalidated the whole pool, not just the connection it hit
    assert backend_pid(databases) not in pids
    assert backend_pid(databases) not in pids


def test_a_pool_that_stays_busy_is_unavailable_after_its_bounded_wait():
    """Every pooled connection held (the database slow or hung): the next
    caller waits the pool's timeout, then gets Unavailable (a 503), not the
    pool's own TimeoutError (an unmapped 500)."""
    engine = create_engine(postgres_admin_url(), pool_size=1, max_overflow=0, pool_timeout=0.2)
    databases = Databases(engine)
    try:
        with engine.connect():  # the pool's one connection, held
            with pytest.raises(Unavailable, match="no pooled connection came free"):
                backend_pid(databases)
        backend_pid(databases)  # free again: served
    finally:
        engine.dispose()


def test_a_read_replica_whose_pool_stays_busy_is_skipped_for_the_primary():
    """A replica that cannot give a connection within its pool's wait is
    passed over like an unreachable one, both where a query takes its
    connection and where an owner's read-your-writes position is checked."""
    primary = make_engine(postgres_admin_url(), pool_size=1)
    busy = create_engine(postgres_admin_url(), pool_size=1, max_overflow=0, pool_timeout=0.2)
    try:
        with busy.connect():  # the replica's one connection, held
            databases = Databases(primary, [busy])
            with databases.read() as conn:
                assert conn.engine is primary
            databases = Databases(primary, [busy])  # anew: the first has paused the replica
            databases._written[7] = "0/0"  # owner 7 wrote: its reads check the replica
            assert databases.reader(7) is primary
    finally:
        busy.dispose()
        primary.dispose()


ARRAY_CASES = [  # every column type that goes as an array (rows.rows_of, rows.among)
    ("bigint", Id, [1, 2**40, None]),
    ("small_ints", Integer(), [0, 3]),
    ("all_null", Integer(), [None, None]),
    ("empty", Integer(), []),
    ("text", String(64), ["a", "quote ' comma , brace { \" \\", "", None]),
    ("null_text", String(64), [None]),
    ("floats", Float(), [1.5, 2.0, None]),  # int among floats: refused in both formats
    ("flags", Boolean(), [True, False, None]),
    ("instants", UtcDateTime(), [datetime(2026, 12, 6, 1, 2, 3, 456789, timezone.utc), None]),
]


@pytest.mark.parametrize(("name", "kind", "items"), ARRAY_CASES, ids=[c[0] for c in ARRAY_CASES])
def test_array_parameters_go_binary_and_come_back_equal(name, kind, items):
    engine = make_engine(postgres_admin_url(), pool_size=1)
    with engine.connect() as conn:
        adapters = conn.connection.dbapi_connection.adapters
        assert adapters.get_dumper(list, PyFormat.AUTO) is ListBinaryDumper
        v = rows.rows_of(conn, (name, kind, items))
        assert [row[0] for row in conn.execute(select(v.c[name]))] == items
        matched = conn.execute(
            select(func.count()).where(rows.among(conn, v.c[name], [x for x in items if x]))
        ).scalar_one()
        assert matched == len([x for x in items if x])
    engine.dispose()


@pytest.mark.parametrize(("name", "kind", "items"), ARRAY_CASES, ids=[c[0] for c in ARRAY_CASES])
def test_statements_run_from_their_compiled_text_take_the_same_arrays(name, kind, items):
    """``rows.execute_with_rows`` hands its compiled text to the driver,
    without SQLAlchemy's processing of each value: the same arrays go in,
    and a parameter left out is an error, never a NULL."""
    engine = make_engine(postgres_admin_url(), pool_size=1)

    def build(v):
        return select(v.c[name]).where(bindparam("keep", type_=Boolean()))

    with engine.connect() as conn:
        given = [(name, kind, items)]
        assert [
            row[0] for row in rows.execute_with_rows(conn, build, given, {"keep": True})
        ] == items
        assert rows.execute_with_rows(conn, build, given, {"keep": False}) == []
        with pytest.raises(TypeError, match="keep"):
            rows.execute_with_rows(conn, build, given, {})
    engine.dispose()
