"""Rows to records: the columns each query selects and the mappers from a
row to a scheduling record. Every other module of storage.sql reads through
these, so a column added to the schema is mapped in one place."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection, any_, bindparam, column, func, literal, select, values
from sqlalchemy.dialects.postgresql import ARRAY

from scheduling.models import (
    FINAL_STATUSES,
    IN_FLIGHT_STATUSES,
    ApiToken,
    FailureClass,
    Interpreter,
    Run,
    RunResult,
    Script,
    Task,
    TaskSpec,
    TaskStatus,
    User,
    trusted,
)
from storage.repository import tail
from storage.schema import runs, scripts, tasks

T = TypeVar("T")

ACTIVE = sorted(s.value for s in TaskStatus if s not in FINAL_STATUSES)
IN_FLIGHT = sorted(s.value for s in IN_FLIGHT_STATUSES)
TASK_COLUMNS = [*tasks.c, scripts.c.name.label("script_name")]
SPEC_COLUMNS = [*tasks.c, scripts.c.sha256, scripts.c.interpreter]
# The same, as an UPDATE of tasks returns them on PostgreSQL (its script's
# through a subquery). Not on SQLite: its RETURNING names the updated
# table's columns unqualified, which inside the subquery mean the script's.
_OF_ITS_SCRIPT = scripts.c.script_id == tasks.c.script_id
SPEC_RETURNING = [
    *tasks.c,
    select(scripts.c.sha256).where(_OF_ITS_SCRIPT).scalar_subquery().label("sha256"),
    select(scripts.c.interpreter).where(_OF_ITS_SCRIPT).scalar_subquery().label("interpreter"),
]
SCRIPT_COLUMNS = [
    scripts.c.script_id,
    scripts.c.owner_id,
    scripts.c.name,
    scripts.c.version,
    scripts.c.sha256,
    scripts.c.interpreter,
    func.length(scripts.c.body).label("size_bytes"),
    scripts.c.created_at,
]


def status_values(statuses: frozenset[TaskStatus]) -> list[str]:
    """A move's source statuses as stored (for ``status IN (...)``)."""
    return sorted(s.value for s in statuses)


def unindexed_status() -> Any:
    """``tasks.status`` in a form no index serves, for statements that find
    their rows by key. A burst moves thousands of rows between statuses
    within seconds, far faster than the planner's statistics follow; from a
    stale estimate of a handful of rows in a status, PostgreSQL drove the
    start gate's and the result's 5-row writes from a status index and
    rescanned the batch for each of 10,000 queued rows (14-24 ms of CPU per
    statement, 2 ms per task in a burst). Found by key, a row costs one
    probe of the primary key whatever the statistics say."""
    return tasks.c.status.concat("")


def in_status(statuses: frozenset[TaskStatus]) -> Any:
    """``status IN statuses`` for a statement that finds its rows by key.
    One bound parameter per status, not an expanding list: the compiled
    text is then final, as ``execute_with_rows`` needs it."""
    return unindexed_status().in_([literal(value) for value in status_values(statuses)])


def count(conn: Connection, table: Any, *where: Any) -> int:
    return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


def with_script_name(*columns: Any) -> Any:
    """A select of tasks joined to their script (for its name, digest, interpreter)."""
    return select(*columns).join(scripts, scripts.c.script_id == tasks.c.script_id)


STATUS_OF = {status.value: status for status in TaskStatus}  # a fifth of TaskStatus()'s time


def task(row: Any) -> Task:
    return trusted(
        Task,
        {
            "task_id": row.task_id,
            "owner_id": row.owner_id,
            "script_id": row.script_id,
            "script_name": row.script_name,
            "execute_at": row.execute_at,
            "status": STATUS_OF[row.status],
            "priority": row.priority,
            "attempt": row.attempt,
            "max_attempts": row.max_attempts,
            "variables": dict(row.variables),
            "timeout_s": row.timeout_s,
            "idempotency_key": row.idempotency_key,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "lease_expires_at": row.lease_expires_at,
            "epoch": row.epoch,
            "schedule_id": row.schedule_id,
            "nominal_at": row.nominal_at,
            "lost_count": row.lost_count,
        },
    )


def script(row: Any) -> Script:
    return Script(
        script_id=row.script_id,
        owner_id=row.owner_id,
        name=row.name,
        version=row.version,
        sha256=row.sha256,
        interpreter=Interpreter(row.interpreter),
        size_bytes=row.size_bytes,
        created_at=row.created_at,
    )


def user(row: Any) -> User:
    return User(
        user_id=row.user_id,
        first_name=row.first_name,
        last_name=row.last_name,
        created_at=row.created_at,
    )


def token(row: Any) -> ApiToken:
    return ApiToken(
        token_id=row.token_id,
        user_id=row.user_id,
        label=row.label,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def spec(row: Any, *, shard: int) -> TaskSpec:
    return TaskSpec(
        task_id=row.task_id,
        attempt=row.attempt,
        epoch=row.epoch,
        shard=shard,
        priority=row.priority,
        due_at=row.execute_at,
        script_id=row.script_id,
        script_sha256=row.sha256,
        interpreter=Interpreter(row.interpreter),
        variables=dict(row.variables),
        timeout_s=row.timeout_s,
        nominal_at=row.nominal_at,
    )


def run(row: Any) -> Run:
    return Run(
        run_id=row.run_id,
        task_id=row.task_id,
        attempt=row.attempt,
        priority=row.priority,
        executor_id=row.executor_id,
        tier=row.tier,
        node_id=row.node_id,
        due_at=row.due_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        exit_code=row.exit_code,
        output_tail=row.output_tail,
        failure=FailureClass(row.failure) if row.failure else None,
    )


def runs_of(conn: Connection, task_ids: list[int]) -> dict[int, list[Run]]:
    """Each task's runs, by attempt."""
    by_task: dict[int, list[Run]] = {}
    if task_ids:
        for row in conn.execute(
            select(runs).where(runs.c.task_id.in_(task_ids)).order_by(runs.c.attempt)
        ):
            by_task.setdefault(row.task_id, []).append(run(row))
    return by_task


def run_values(result: RunResult) -> dict[str, Any]:
    """The runs row for an attempt's result."""
    return {
        "task_id": result.task_id,
        "attempt": result.attempt,
        "priority": result.priority,
        "executor_id": result.executor_id,
        "tier": result.tier,
        "node_id": result.node_id,
        "due_at": result.due_at,
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "exit_code": result.exit_code,
        "output_tail": tail(result.output_tail),
        "failure": result.failure.value if result.failure else None,
    }


CHUNK = 1000  # rows per statement: well inside every driver's parameter limit


def chunks(items: list[T]) -> list[list[T]]:
    return [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]


def rows_of(conn: Connection, *columns: tuple[str, Any, list[Any]]) -> Any:
    """One row per item, named ``v``, to update many rows in one statement
    (``UPDATE … FROM v``). On PostgreSQL ``unnest`` of one array parameter
    per column: the statement's text does not depend on the batch, so it is
    compiled once and cached. SQLite has no arrays: a VALUES list there."""
    if conn.dialect.name == "postgresql":
        return _unnest(
            [
                bindparam(f"v_{name}", value=items, type_=ARRAY(kind))
                for name, kind, items in columns
            ],
            columns,
        )
    table = values(*(column(name, kind) for name, kind, _ in columns), name="v")
    return table.data(list(zip(*(items for _, _, items in columns), strict=True))).cte("v")


def _unnest(arrays: list[Any], columns: Sequence[tuple[str, Any, list[Any]]]) -> Any:
    """``unnest(arrays…) AS v(columns…)``: one array parameter per column."""
    names = [column(name, kind) for name, kind, _ in columns]
    return func.unnest(*arrays).table_valued(*names).render_derived(with_types=False).alias("v")


@dataclass(frozen=True)
class _DriverStatement:
    text: str  # in the driver's parameter style
    constants: dict[str, Any]  # the values bound when it was built
    required: frozenset[str]  # bound at each call


_COMPILED: dict[Callable[[Any], Any], _DriverStatement] = {}


def execute_with_rows(
    conn: Connection,
    build: Callable[[Any], Any],
    columns: Sequence[tuple[str, Any, list[Any]]],
    params: dict[str, Any],
) -> Sequence[Any]:
    """The rows returned by ``build(v)``, ``v`` being ``rows_of(columns)``,
    with ``params`` for its other bind parameters. On PostgreSQL the
    statement is compiled once per ``build``, over array parameters, and
    its text goes to the driver as it is: SQLAlchemy's per-call work
    (processing every bound value, the result's metadata) was most of an
    executor's CPU at the start gate and the result when tasks come one at
    a time. ``params`` and the arrays' items must then be what the driver
    takes as they are: aware datetimes, ints, strings."""
    if conn.dialect.name != "postgresql":
        return conn.execute(build(rows_of(conn, *columns)), params).all()
    statement = _COMPILED.get(build)
    if statement is None:
        unbound = [bindparam(f"v_{name}", type_=ARRAY(kind)) for name, kind, _ in columns]
        compiled = build(_unnest(unbound, columns)).compile(dialect=conn.dialect)
        statement = _COMPILED[build] = _DriverStatement(
            compiled.string,
            dict(compiled.params),
            frozenset(bind.key for bind in compiled.binds.values() if bind.required),
        )
    given = {f"v_{name}": items for name, _, items in columns} | params
    if missing := statement.required.difference(given):
        raise TypeError(f"no value for {sorted(missing)}")
    return conn.exec_driver_sql(statement.text, statement.constants | given).all()


_PREBUILT: dict[tuple[Callable[[str], Any], str], Any] = {}


def prebuilt(conn: Connection, build: Callable[[str], Any]) -> Any:
    """``build(dialect name)``, built once per dialect: a statement whose
    values are all bind parameters need not be rebuilt, nor its cache key
    walked, on every call (0.35 ms of CPU of a one-task claim was that)."""
    key = (build, conn.dialect.name)
    statement = _PREBUILT.get(key)
    if statement is None:
        statement = _PREBUILT[key] = build(conn.dialect.name)
    return statement


def among_bound(dialect: str, column_: Any, name: str, items: Any = None) -> Any:
    """``column_ IN`` the list bound as ``name``: given as ``items``, or at
    execution for a prebuilt statement. On PostgreSQL ``= ANY`` of one
    array parameter, so the statement's text does not grow with the items
    (psycopg parses a statement's text on every execution once it is long:
    a thousand ids cost more than the query); an expanding IN elsewhere."""
    value = None if items is None else list(items)
    required = items is None  # bound at execution, and refused if not
    if dialect == "postgresql":
        array = bindparam(name, value, type_=ARRAY(column_.type), required=required)
        return column_ == any_(array)
    return column_.in_(bindparam(name, value, expanding=True, required=required))


def among(conn: Connection, column_: Any, items: Any) -> Any:
    """``column_ IN items`` (``among_bound`` with the items given now)."""
    return among_bound(conn.dialect.name, column_, f"among_{column_.name}", items)
