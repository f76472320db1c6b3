"""Upgrading a database that already holds data: 0001 → head keeps every
task, and gives one-shot tasks their nominal time."""

from datetime import datetime, timezone

import pytest
from alembic import command
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from storage.engines import make_engine
from storage.migrate import alembic_config, upgrade
from storage.sql import SqlTaskRepository
from tests.conftest import create_postgres_database

T = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request, tmp_path):
    url = (
        f"sqlite:///{tmp_path / 'm.db'}"
        if request.param == "sqlite"
        else create_postgres_database("migrate")
    )
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _add_user_and_script(conn):
    """User 1 and its script 1, in the columns every revision has."""
    conn.execute(
        text("INSERT INTO users (first_name, last_name, created_at) VALUES ('a', 'b', :t)"),
        {"t": T},
    )
    conn.execute(
        text(
            "INSERT INTO scripts (owner_id, name, version, sha256, interpreter, body, created_at) "
            "VALUES (1, 's', 1, 'x', 'bash', :body, :t)"
        ),
        {"body": b"true", "t": T},
    )


def test_upgrade_from_the_first_revision_keeps_tasks(engine):
    upgrade(engine, "0001")
    with engine.begin() as conn:
        _add_user_and_script(conn)
        conn.execute(
            text(
                "INSERT INTO tasks (owner_id, script_id, execute_at, bucket, status, priority, attempt, "
                "max_attempts, variables, timeout_s, epoch, created_at, updated_at) "
                "VALUES (1, 1, :t, 0, 'scheduled', 0, 1, 3, '{}', 10, 0, :t, :t)"
            ),
            {"t": T.replace(tzinfo=None) if engine.dialect.name == "sqlite" else T},
        )
    upgrade(engine)
    upgrade(engine)  # idempotent
    task = SqlTaskRepository(engine).get_task(1)
    assert task.execute_at == T and task.nominal_at == T and task.schedule_id is None


def _add_task(conn, *, key=None, schedule=None):
    conn.execute(
        text(
            "INSERT INTO tasks (owner_id, script_id, schedule_id, idempotency_key, execute_at, "
            "nominal_at, bucket, status, priority, attempt, max_attempts, variables, timeout_s, "
            "epoch, created_at, updated_at) VALUES (1, 1, :schedule, :key, :t, :t, 0, "
            "'scheduled', 0, 1, 3, '{}', 10, 0, :t, :t)"
        ),
        {"key": key, "schedule": schedule, "t": T},
    )


@pytest.mark.postgres
def test_0008_keys_refuse_what_the_constraints_refused_and_go_back(tmp_path):
    """The partial unique indexes refuse the same pairs as the constraints
    they replace (rows without the key never collide); the foreign keys on
    owner and script are gone; downgrade and upgrade again both work."""
    engine = make_engine(create_postgres_database("migrate0008"))
    upgrade(engine)
    with engine.begin() as conn:
        _add_user_and_script(conn)
        conn.execute(
            text(
                "INSERT INTO schedules (owner_id, script_name, cron, timezone, variables, priority, "
                "max_attempts, timeout_s, misfire_policy, overlap_policy, jitter_s, paused, deleted, "
                "missed_fires, skipped_fires, created_at, updated_at) VALUES (1, 's', '* * * * *', "
                "'UTC', '{}', 0, 3, 10, 'fire_once', 'skip', 0, false, false, 0, 0, :t, :t)"
            ),
            {"t": T},
        )
        for _ in range(2):
            _add_task(conn)  # neither key: no collision
        _add_task(conn, key="k")
        _add_task(conn, schedule=1)
    for twin in ({"key": "k"}, {"schedule": 1}):
        with pytest.raises(IntegrityError), engine.begin() as conn:
            _add_task(conn, **twin)
    inspector = inspect(engine)
    assert {fk["constrained_columns"][0] for fk in inspector.get_foreign_keys("tasks")} == {
        "schedule_id"
    }
    partial = {i["name"]: i for i in inspector.get_indexes("tasks") if i["unique"]}
    assert partial["uq_tasks_owner_idempotency_key"]["dialect_options"]["postgresql_where"]
    config = alembic_config(engine)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0007")
    assert len(inspect(engine).get_foreign_keys("tasks")) == 3
    upgrade(engine)
    engine.dispose()


@pytest.mark.postgres
def test_postgres_connections_have_bounded_connects_and_statements():
    """Defect 9: no connect, and no statement, may hang a fire loop."""
    from storage.engines import STATEMENT_TIMEOUT_S
    from tests.conftest import postgres_admin_url

    engine = make_engine(postgres_admin_url())
    try:
        with engine.connect() as conn:
            shown = conn.execute(
                text("SELECT setting FROM pg_settings WHERE name = 'statement_timeout'")
            ).scalar()
            assert int(shown) == STATEMENT_TIMEOUT_S * 1000  # milliseconds
            assert conn.connection.dbapi_connection.info.get_parameters()["connect_timeout"] == "5"
    finally:
        engine.dispose()
