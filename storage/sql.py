"""SqlTaskRepository: SQLAlchemy Core over PostgreSQL (psycopg 3) and SQLite."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    bindparam,
    exists,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from scheduling.errors import (
    BatchRejected,
    ChronorayError,
    IdempotencyConflict,
    ScriptInUse,
    ScriptNotFound,
    TaskNotCancellable,
    TaskNotFound,
    TaskNotRetryable,
    TokenNotFound,
    Unavailable,
    UserNotFound,
)
from scheduling.lifecycle import RetryPolicy, after_attempt, may_have_started, running_lease
from scheduling.models import (
    FINAL_STATUSES,
    ApiToken,
    FailureClass,
    Interpreter,
    NewTask,
    Run,
    RunResult,
    Script,
    SubmitResult,
    Task,
    TaskSpec,
    TaskStatus,
    User,
)
from scheduling.schedules import MisfireRules, NewSchedule, Schedule
from scheduling.tiers import TierTable
from scheduling.timeline import Wheel, bucket_of
from storage import occurrences
from storage.engines import make_engine
from storage.occurrences import IN_FLIGHT
from storage.repository import Claimed, OutcomeHook, TaskQuery, sha256_hex, tail
from storage.schema import (
    api_tokens,
    newest_script,
    runs,
    schedules,
    scripts,
    shards,
    tasks,
    users,
)

log = logging.getLogger(__name__)
REPLICA_PAUSE_S = 5.0  # an unreachable replica is skipped this long before it is tried again

ACTIVE = [s.value for s in TaskStatus if s not in FINAL_STATUSES]
TASK_COLUMNS = [*tasks.c, scripts.c.name.label("script_name")]


def _task(row) -> Task:
    return Task(
        task_id=row.task_id,
        owner_id=row.owner_id,
        script_id=row.script_id,
        script_name=row.script_name,
        execute_at=row.execute_at,
        status=TaskStatus(row.status),
        priority=row.priority,
        attempt=row.attempt,
        max_attempts=row.max_attempts,
        variables=dict(row.variables),
        timeout_s=row.timeout_s,
        idempotency_key=row.idempotency_key,
        created_at=row.created_at,
        updated_at=row.updated_at,
        lease_expires_at=row.lease_expires_at,
        epoch=row.epoch,
        schedule_id=row.schedule_id,
        nominal_at=row.nominal_at,
        lost_count=row.lost_count,
    )


def _script(row) -> Script:
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


def _count(conn: Connection, table, *where) -> int:
    return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


def _live_schedules(owner_id: int) -> list:
    return [schedules.c.owner_id == owner_id, schedules.c.deleted.is_(False)]


def _user(row) -> User:
    return User(
        user_id=row.user_id,
        first_name=row.first_name,
        last_name=row.last_name,
        created_at=row.created_at,
    )


def _token(row) -> ApiToken:
    return ApiToken(
        token_id=row.token_id,
        user_id=row.user_id,
        label=row.label,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def _spec(row, *, shard: int) -> TaskSpec:
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


def _run(row) -> Run:
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
SPEC_COLUMNS = [*tasks.c, scripts.c.sha256, scripts.c.interpreter]


class SqlTaskRepository:
    """Writes go to ``engine``. Queries (get, list) go to one of
    ``read_engines`` (PostgreSQL streaming replicas) when there are any,
    except for an owner whose last write (``note_write``) a replica has not
    replayed yet: those go to the primary, so a get right after a create
    finds what was created."""

    def __init__(
        self,
        engine: Engine,
        *,
        read_engines: Sequence[Engine] = (),
        misfire_rules: MisfireRules | None = None,
    ) -> None:
        self.engine = engine
        self.read_engines = list(read_engines)
        self.tracks_writes = bool(self.read_engines)
        self.misfire_rules = misfire_rules or MisfireRules()
        self._written: dict[int, str] = {}  # owner: primary WAL position after their last write
        self._turn = itertools.count()
        self._replica_down_until: dict[int, float] = {}  # id(engine): monotonic time

    @classmethod
    def connect(
        cls, url: str, replica_urls: Sequence[str] = (), *, pool_size: int = 5
    ) -> SqlTaskRepository:
        """On the primary at ``url``; get and list queries on the replicas."""
        return cls(
            make_engine(url, pool_size=pool_size),
            read_engines=[make_engine(u, pool_size=pool_size) for u in replica_urls],
        )

    def note_write(self, owner_id: int) -> None:
        """Remember where the primary's log stands after this owner's write."""
        if not self.tracks_writes:
            return
        with self._begin() as conn:
            self._written[owner_id] = conn.execute(
                text("SELECT pg_current_wal_lsn()::text")
            ).scalar()

    @contextmanager
    def _read(self, owner_id: int | None = None) -> Iterator[Connection]:
        """A read-only transaction on the engine ``_reader`` picks; a replica
        that cannot be reached is skipped for ``REPLICA_PAUSE_S`` and the
        primary serves."""
        engine = self._reader(owner_id)
        if engine is not self.engine:
            try:
                connection = engine.connect()
            except (OperationalError, InterfaceError) as exc:
                self._skip_replica(engine, exc)
                engine = self.engine
            else:
                try:
                    with connection, connection.begin():
                        yield connection
                except (OperationalError, InterfaceError) as exc:
                    raise Unavailable(f"read replica failed: {exc.orig}") from exc
                return
        with self._begin(engine) as conn:
            yield conn

    def _skip_replica(self, replica: Engine, exc: Exception) -> None:
        self._replica_down_until[id(replica)] = time.monotonic() + REPLICA_PAUSE_S
        log.warning("read replica unreachable, reading from the primary: %s", exc)

    def _reader(self, owner_id: int | None = None) -> Engine:
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
        except (OperationalError, InterfaceError) as exc:
            self._skip_replica(replica, exc)
            return self.engine
        if not caught_up:
            return self.engine
        if self._written.get(owner_id) == position:  # a newer write keeps its own mark
            self._written.pop(owner_id, None)
        return replica

    @contextmanager
    def _begin(self, engine: Engine | None = None) -> Iterator[Connection]:
        """A transaction; driver errors that mean "the database is not
        there" become Unavailable here, once, for every caller."""
        try:
            with (engine or self.engine).begin() as conn:
                yield conn
        except (OperationalError, InterfaceError) as exc:
            raise Unavailable(f"database unavailable: {exc.orig}") from exc

    def ping(self) -> None:
        """Raises Unavailable when the primary database does not answer."""
        with self._begin() as conn:
            conn.execute(select(1))

    # -- users and scripts ------------------------------------------------
    def ensure_user(self, *, first_name: str, last_name: str, now: datetime) -> int:
        with self._begin() as conn:
            found = conn.execute(
                select(users.c.user_id)
                .where(users.c.first_name == first_name, users.c.last_name == last_name)
                .order_by(users.c.user_id)
                .limit(1)
            ).scalar()
            if found is not None:
                return found
            return conn.execute(
                insert(users)
                .values(first_name=first_name, last_name=last_name, created_at=now)
                .returning(users.c.user_id)
            ).scalar_one()

    def add_script(
        self, *, owner_id: int, name: str, interpreter: Interpreter, body: bytes, now: datetime
    ) -> tuple[Script, bool]:
        digest = sha256_hex(body)
        for _ in range(3):  # two uploads racing for the next version number
            try:
                with self._begin() as conn:
                    latest = conn.execute(newest_script(owner_id, name, *SCRIPT_COLUMNS)).first()
                    if (
                        latest is not None
                        and latest.sha256 == digest
                        and latest.interpreter == interpreter.value
                    ):
                        return _script(latest), False
                    # deleted versions keep their numbers: a version never names two bodies
                    highest = conn.execute(
                        select(func.max(scripts.c.version)).where(
                            scripts.c.owner_id == owner_id, scripts.c.name == name
                        )
                    ).scalar()
                    version = (highest or 0) + 1
                    script_id = conn.execute(
                        insert(scripts)
                        .values(
                            owner_id=owner_id,
                            name=name,
                            version=version,
                            sha256=digest,
                            interpreter=interpreter.value,
                            body=body,
                            created_at=now,
                        )
                        .returning(scripts.c.script_id)
                    ).scalar_one()
                    row = conn.execute(
                        select(*SCRIPT_COLUMNS).where(scripts.c.script_id == script_id)
                    ).one()
                    return _script(row), True
            except IntegrityError:
                continue
        raise Unavailable("could not store the script under contention; retry")

    def _latest_scripts(self, conn, owner_names: set[tuple[int, str]]) -> dict:
        found = {}
        for owner_id, name in owner_names:
            row = conn.execute(newest_script(owner_id, name, *SCRIPT_COLUMNS)).first()
            if row is not None:
                found[(owner_id, name)] = _script(row)
        return found

    def get_script(self, *, owner_id: int, name: str, version: int | None = None) -> Script:
        with self._read(owner_id) as conn:
            if version is None:
                script = self._latest_scripts(conn, {(owner_id, name)}).get((owner_id, name))
            else:
                row = conn.execute(
                    select(*SCRIPT_COLUMNS).where(
                        *self._live_script(owner_id, name), scripts.c.version == version
                    )
                ).first()
                script = None if row is None else _script(row)
        if script is None:
            where = "" if version is None else f" of version {version}"
            raise ScriptNotFound(f"no script named {name!r}{where}", "script")
        return script

    @staticmethod
    def _live_script(owner_id: int, name: str | None = None) -> list:
        where = [scripts.c.owner_id == owner_id, scripts.c.deleted_at.is_(None)]
        return where if name is None else [*where, scripts.c.name == name]

    def list_scripts(self, *, owner_id: int) -> list[Script]:
        """The newest live version of each of an owner's scripts, by name."""
        newest = (
            select(scripts.c.name, func.max(scripts.c.version).label("version"))
            .where(*self._live_script(owner_id))
            .group_by(scripts.c.name)
            .subquery()
        )
        with self._read(owner_id) as conn:
            rows = conn.execute(
                select(*SCRIPT_COLUMNS)
                .join(
                    newest,
                    and_(scripts.c.name == newest.c.name, scripts.c.version == newest.c.version),
                )
                .where(scripts.c.owner_id == owner_id)
                .order_by(scripts.c.name)
            ).all()
        return [_script(row) for row in rows]

    def script_versions(self, *, owner_id: int, name: str) -> list[Script]:
        with self._read(owner_id) as conn:
            rows = conn.execute(
                select(*SCRIPT_COLUMNS)
                .where(*self._live_script(owner_id, name))
                .order_by(scripts.c.version.desc())
            ).all()
        if not rows:
            raise ScriptNotFound(f"no script named {name!r}", "script")
        return [_script(row) for row in rows]

    def delete_script(self, *, owner_id: int, name: str, now: datetime) -> int:
        """Delete every version of a script that no pending task and no live
        schedule uses; finished tasks keep naming it. Returns the versions
        deleted."""
        with self._begin() as conn:
            version_ids = select(scripts.c.script_id).where(*self._live_script(owner_id, name))
            pending = _count(
                conn, tasks, tasks.c.script_id.in_(version_ids), tasks.c.status.in_(ACTIVE)
            )
            scheduled = _count(
                conn, schedules, *_live_schedules(owner_id), schedules.c.script_name == name
            )
            if pending or scheduled:
                raise ScriptInUse(
                    f"script {name!r} is used by {pending} pending tasks and {scheduled} schedules",
                    "script",
                )
            deleted = conn.execute(
                update(scripts).where(*self._live_script(owner_id, name)).values(deleted_at=now)
            ).rowcount
        if not deleted:
            raise ScriptNotFound(f"no script named {name!r}", "script")
        return deleted

    # -- users and tokens ---------------------------------------------------
    def add_user(self, *, first_name: str, last_name: str, now: datetime) -> User:
        with self._begin() as conn:
            row = conn.execute(
                insert(users)
                .values(first_name=first_name, last_name=last_name, created_at=now)
                .returning(*users.c)
            ).one()
        return _user(row)

    def get_user(self, user_id: int) -> User:
        with self._begin() as conn:
            row = conn.execute(select(*users.c).where(users.c.user_id == user_id)).first()
        if row is None:
            raise UserNotFound(f"no user {user_id}", "user_id")
        return _user(row)

    def list_users(self) -> list[User]:
        with self._begin() as conn:
            return [_user(r) for r in conn.execute(select(*users.c).order_by(users.c.user_id))]

    def add_token(self, *, user_id: int, token_hash: str, label: str, now: datetime) -> ApiToken:
        with self._begin() as conn:
            if (
                conn.execute(select(users.c.user_id).where(users.c.user_id == user_id)).first()
                is None
            ):
                raise UserNotFound(f"no user {user_id}", "user_id")
            row = conn.execute(
                insert(api_tokens)
                .values(user_id=user_id, token_hash=token_hash, label=label, created_at=now)
                .returning(*api_tokens.c)
            ).one()
        return _token(row)

    def revoke_token(self, token_id: int, *, now: datetime) -> ApiToken:
        with self._begin() as conn:
            conn.execute(
                update(api_tokens)
                .where(api_tokens.c.token_id == token_id, api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            row = conn.execute(
                select(*api_tokens.c).where(api_tokens.c.token_id == token_id)
            ).first()
        if row is None:
            raise TokenNotFound(f"no token {token_id}", "token_id")
        return _token(row)

    def user_for_token(self, token_hash: str) -> int | None:
        """The user a live token belongs to. Always the primary: a revoked
        token must stop working at once, not when a replica catches up."""
        with self._begin() as conn:
            return conn.execute(
                select(api_tokens.c.user_id).where(
                    api_tokens.c.token_hash == token_hash, api_tokens.c.revoked_at.is_(None)
                )
            ).scalar()

    def count_active(self, owner_id: int) -> tuple[int, int]:
        """An owner's tasks not yet final, and live schedules (for the caps)."""
        with self._begin() as conn:
            active = _count(conn, tasks, tasks.c.owner_id == owner_id, tasks.c.status.in_(ACTIVE))
            live = _count(conn, schedules, *_live_schedules(owner_id))
        return active, live

    def get_script_body(self, script_id: int) -> bytes:
        with self._begin() as conn:
            body = conn.execute(
                select(scripts.c.body).where(scripts.c.script_id == script_id)
            ).scalar()
        if body is None:
            raise ScriptNotFound(f"no script with id {script_id}", "script_id")
        return bytes(body)

    # -- submissions and queries -------------------------------------------
    def add_tasks(
        self, new_tasks: Sequence[NewTask], *, now: datetime, atomic: bool = False
    ) -> list[SubmitResult | ChronorayError]:
        """Group commit: every valid submission in one transaction. An item
        that fails on its own (unknown script, idempotency conflict) gets its
        error back; the others are stored. ``atomic``: one failure stores
        nothing and raises BatchRejected."""
        for _ in range(3):
            try:
                return self._add_tasks_once(new_tasks, now=now, atomic=atomic)
            except IntegrityError:  # a concurrent submission took an idempotency key
                log.info("idempotency race in a batch of %d; retrying", len(new_tasks))
        raise Unavailable("could not store the tasks under contention; retry")

    def _add_tasks_once(self, new_tasks, *, now, atomic=False):
        results: list[SubmitResult | ChronorayError | None] = [None] * len(new_tasks)
        with self._begin() as conn:
            known = self._latest_scripts(conn, {(t.owner_id, t.script_name) for t in new_tasks})
            stored_requests = {
                row.request_id: _task(row)
                for row in conn.execute(
                    select(*TASK_COLUMNS)
                    .join(scripts, scripts.c.script_id == tasks.c.script_id)
                    .where(tasks.c.request_id.in_({t.request_id for t in new_tasks}))
                )
            }
            rows, row_positions = [], []
            # A second item with the same request (a replay that landed in the
            # same group commit) answers with the first item's outcome.
            first_of: dict[object, int] = {}
            echoes: list[tuple[int, int]] = []
            for i, new in enumerate(new_tasks):
                if new.request_id in stored_requests:
                    results[i] = SubmitResult(task=stored_requests[new.request_id], created=False)
                    continue
                key = (new.owner_id, new.idempotency_key) if new.idempotency_key else None
                twin = first_of.get(new.request_id, first_of.get(key))
                if twin is not None:
                    if new_tasks[twin].request_hash != new.request_hash:
                        results[i] = IdempotencyConflict(
                            "idempotency key repeated in one batch with another request",
                            "idempotency_key",
                        )
                    else:
                        echoes.append((i, twin))
                    continue
                first_of[new.request_id] = i
                if key is not None:
                    first_of[key] = i
                script = known.get((new.owner_id, new.script_name))
                if script is None:
                    results[i] = ScriptNotFound(f"no script named {new.script_name!r}", "script")
                    continue
                if new.idempotency_key is not None:
                    replay = self._idempotent_replay(conn, new)
                    if replay is not None:
                        results[i] = replay
                        continue
                rows.append(
                    {
                        "owner_id": new.owner_id,
                        "script_id": script.script_id,
                        "schedule_id": None,
                        "nominal_at": new.execute_at,
                        "buffered": False,
                        "execute_at": new.execute_at,
                        "bucket": bucket_of(new.execute_at),
                        "status": TaskStatus.SCHEDULED.value,
                        "priority": new.priority,
                        "attempt": 1,
                        "max_attempts": new.max_attempts,
                        "variables": dict(new.variables),
                        "timeout_s": new.timeout_s,
                        "idempotency_key": new.idempotency_key,
                        "request_hash": new.request_hash,
                        "request_id": new.request_id,
                        "lease_expires_at": None,
                        "epoch": 0,
                        "created_at": now,
                        "updated_at": now,
                    }
                )
                row_positions.append(i)
            failures = [(i, r) for i, r in enumerate(results) if isinstance(r, ChronorayError)]
            if atomic and failures:
                raise BatchRejected(failures)  # before any insert: nothing is written
            if rows:
                ids = (
                    conn.execute(
                        insert(tasks).returning(tasks.c.task_id, sort_by_parameter_order=True), rows
                    )
                    .scalars()
                    .all()
                )
                stored = {
                    row.task_id: _task(row)
                    for row in conn.execute(
                        select(*TASK_COLUMNS)
                        .join(scripts, scripts.c.script_id == tasks.c.script_id)
                        .where(tasks.c.task_id.in_(ids))
                    )
                }
                for position, task_id in zip(row_positions, ids, strict=True):
                    results[position] = SubmitResult(task=stored[task_id], created=True)
            for i, twin in echoes:
                first = results[twin]
                results[i] = (
                    SubmitResult(task=first.task, created=False)
                    if isinstance(first, SubmitResult)
                    else first
                )
        return results  # type: ignore[return-value]

    def _idempotent_replay(self, conn, new: NewTask) -> SubmitResult | ChronorayError | None:
        row = conn.execute(
            select(*TASK_COLUMNS)
            .join(scripts, scripts.c.script_id == tasks.c.script_id)
            .where(tasks.c.owner_id == new.owner_id, tasks.c.idempotency_key == new.idempotency_key)
        ).first()
        if row is None:
            return None
        if row.request_hash != new.request_hash:
            return IdempotencyConflict(
                "idempotency key already used with a different request", "idempotency_key"
            )
        return SubmitResult(task=_task(row), created=False)

    def get_task(self, task_id: int, *, owner_id: int | None = None) -> Task:
        with self._read(owner_id) as conn:
            return self._get_task(conn, task_id, owner_id=owner_id)

    def get_task_primary(self, task_id: int, *, owner_id: int | None = None) -> Task:
        """A read that must see this caller's own write."""
        with self._begin() as conn:
            return self._get_task(conn, task_id, owner_id=owner_id)

    @staticmethod
    def _get_task(conn: Connection, task_id: int, *, owner_id: int | None) -> Task:
        query = (
            select(*TASK_COLUMNS)
            .join(scripts, scripts.c.script_id == tasks.c.script_id)
            .where(tasks.c.task_id == task_id)
        )
        if owner_id is not None:
            query = query.where(tasks.c.owner_id == owner_id)
        row = conn.execute(query).first()
        if row is None:
            raise TaskNotFound(f"no task {task_id}", "task_id")
        return _task(row)

    def list_runs(self, task_id: int) -> list[Run]:
        with self._read() as conn:
            rows = conn.execute(
                select(runs).where(runs.c.task_id == task_id).order_by(runs.c.attempt)
            ).all()
        return [_run(row) for row in rows]

    @staticmethod
    def _task_in(task_id: int, status: TaskStatus, owner_id: int | None):
        """This task, if it is in ``status`` (and the owner's, when given)."""
        condition = and_(tasks.c.task_id == task_id, tasks.c.status == status.value)
        if owner_id is not None:
            condition = and_(condition, tasks.c.owner_id == owner_id)
        return condition

    def cancel_task(self, task_id: int, *, owner_id: int | None, now: datetime) -> Task:
        condition = self._task_in(task_id, TaskStatus.SCHEDULED, owner_id)
        with self._begin() as conn:
            changed = conn.execute(
                update(tasks)
                .where(condition)
                .values(status=TaskStatus.CANCELLED.value, updated_at=now)
            ).rowcount
        task = self.get_task_primary(task_id, owner_id=owner_id)
        if not changed and task.status is not TaskStatus.CANCELLED:
            raise TaskNotCancellable(
                f"task {task_id} is {task.status.value}; only scheduled tasks can be cancelled",
                "task_id",
            )
        return task

    def list_tasks(self, query: TaskQuery) -> list[Task]:
        conditions = [tasks.c.owner_id == query.owner_id]
        if query.statuses:
            conditions.append(tasks.c.status.in_(sorted(s.value for s in query.statuses)))
        if query.script_name is not None:
            conditions.append(scripts.c.name == query.script_name)
        if query.schedule_id is not None:
            conditions.append(tasks.c.schedule_id == query.schedule_id)
        if query.due_from is not None:
            conditions.append(tasks.c.execute_at >= query.due_from)
        if query.due_before is not None:
            conditions.append(tasks.c.execute_at < query.due_before)
        if query.below_id is not None:
            conditions.append(tasks.c.task_id < query.below_id)
        with self._read(query.owner_id) as conn:
            rows = conn.execute(
                select(*TASK_COLUMNS)
                .join(scripts, scripts.c.script_id == tasks.c.script_id)
                .where(*conditions)
                .order_by(tasks.c.task_id.desc())
                .limit(query.limit)
            ).all()
        return [_task(row) for row in rows]

    def redrive(self, task_id: int, *, owner_id: int | None, attempts: int, now: datetime) -> Task:
        """Give a dead task ``attempts`` more attempts, due now, at the
        priority it had reached."""
        condition = self._task_in(task_id, TaskStatus.DEAD, owner_id)
        with self._begin() as conn:
            changed = conn.execute(
                update(tasks)
                .where(condition)
                .values(
                    status=TaskStatus.SCHEDULED.value,
                    attempt=tasks.c.attempt + 1,
                    max_attempts=tasks.c.attempt + attempts,
                    execute_at=now,
                    bucket=bucket_of(now),
                    lease_expires_at=None,
                    updated_at=now,
                )
            ).rowcount
        task = self.get_task_primary(task_id, owner_id=owner_id)
        if not changed:
            raise TaskNotRetryable(
                f"task {task_id} is {task.status.value}; only dead tasks can be retried",
                "task_id",
            )
        return task

    # -- the shard's work --------------------------------------------------
    def start_shard(self, shard: int, *, now: datetime) -> int:
        for _ in range(3):
            try:
                with self._begin() as conn:
                    epoch = conn.execute(
                        update(shards)
                        .where(shards.c.shard == shard)
                        .values(epoch=shards.c.epoch + 1, started_at=now)
                        .returning(shards.c.epoch)
                    ).scalar()
                    if epoch is None:
                        conn.execute(insert(shards).values(shard=shard, epoch=1, started_at=now))
                        epoch = 1
                    return epoch
            except IntegrityError:  # two incarnations inserting the first row
                continue
        raise Unavailable(f"could not start shard {shard}")

    def shard_epoch(self, shard: int) -> int | None:
        """The newest incarnation's epoch: an owner holding an older one has
        been superseded and claims nothing."""
        with self._begin() as conn:
            return conn.execute(select(shards.c.epoch).where(shards.c.shard == shard)).scalar()

    @staticmethod
    def _owned_by(wheel: Wheel, shard: int):
        return (tasks.c.bucket // wheel.range_s) % wheel.num_shards == shard

    def due_tasks(
        self, *, wheel: Wheel, shard: int, before: datetime, limit: int
    ) -> list[tuple[int, datetime]]:
        with self._begin() as conn:
            rows = conn.execute(
                select(tasks.c.task_id, tasks.c.execute_at)
                .where(
                    tasks.c.status == TaskStatus.SCHEDULED.value,
                    tasks.c.bucket <= bucket_of(before),
                    tasks.c.execute_at <= before,
                    self._owned_by(wheel, shard),
                )
                .order_by(tasks.c.execute_at)
                .limit(limit)
            ).all()
        return [(row.task_id, row.execute_at) for row in rows]

    def claim(
        self,
        task_ids: Sequence[int],
        *,
        shard: int,
        epoch: int,
        lease_until: datetime,
        now: datetime,
    ) -> Claimed:
        """scheduled → queued, fenced by the shard's epoch: a superseded
        incarnation claims nothing. One-shot tasks in one conditional update;
        schedule occurrences one by one under their policies."""
        if not task_ids:
            return Claimed([])
        current_epoch = exists().where(shards.c.shard == shard, shards.c.epoch == epoch)
        with self._begin() as conn:
            occurrence_ids = set(
                conn.execute(
                    select(tasks.c.task_id).where(
                        tasks.c.task_id.in_(list(task_ids)), tasks.c.schedule_id.is_not(None)
                    )
                ).scalars()
            )
            plain = [t for t in task_ids if t not in occurrence_ids]
            claimed = []
            if plain:
                claimed = (
                    conn.execute(
                        update(tasks)
                        .where(
                            tasks.c.task_id.in_(plain),
                            tasks.c.status == TaskStatus.SCHEDULED.value,
                            current_epoch,
                        )
                        .values(
                            status=TaskStatus.QUEUED.value,
                            epoch=epoch,
                            lease_expires_at=lease_until,
                            updated_at=now,
                        )
                        .returning(tasks.c.task_id)
                    )
                    .scalars()
                    .all()
                )
            fired = occurrences.FireOutcome()
            if occurrence_ids:
                fired = occurrences.fire_occurrences(
                    conn,
                    sorted(occurrence_ids),
                    shard=shard,
                    epoch=epoch,
                    lease_until=lease_until,
                    now=now,
                    rules=self.misfire_rules,
                )
            ids = [*claimed, *fired.fired]
            rows = (
                conn.execute(
                    select(*SPEC_COLUMNS)
                    .join(scripts, scripts.c.script_id == tasks.c.script_id)
                    .where(tasks.c.task_id.in_(ids))
                    .order_by(tasks.c.execute_at)
                ).all()
                if ids
                else []
            )
        return Claimed([_spec(row, shard=shard) for row in rows], fired.follow_ups, fired.cancelled)

    def mark_running(
        self, specs: Sequence[TaskSpec], *, lease_grace_s: float, now: datetime
    ) -> list[tuple[int, int]]:
        """The start gate: queued → running for exactly this (task, attempt,
        epoch), one conditional update each in one transaction. Returns the
        attempts that moved; any other attempt belongs to someone else (a
        newer attempt, a cancel) and its script must not start."""
        if not specs:
            return []
        statement = (
            update(tasks)
            .where(
                tasks.c.task_id == bindparam("b_task_id"),
                tasks.c.attempt == bindparam("b_attempt"),
                tasks.c.epoch == bindparam("b_epoch"),
                tasks.c.status == TaskStatus.QUEUED.value,
            )
            .values(
                status=TaskStatus.RUNNING.value,
                lease_expires_at=bindparam("b_lease"),
                updated_at=now,
            )
        )
        started = []
        with self._begin() as conn:
            for spec in specs:
                changed = conn.execute(
                    statement,
                    {
                        "b_task_id": spec.task_id,
                        "b_attempt": spec.attempt,
                        "b_epoch": spec.epoch,
                        "b_lease": running_lease(spec, lease_grace_s=lease_grace_s, now=now),
                    },
                ).rowcount
                if changed:
                    started.append(spec.key)
        return started

    def record_results(
        self,
        results: Sequence[RunResult],
        *,
        policy: RetryPolicy,
        now: datetime,
        tiers: TierTable | None = None,
        on_outcome: OutcomeHook | None = None,
    ) -> list[tuple[int, datetime]]:
        """Apply each attempt's outcome where the row still matches it
        (attempt, epoch, in flight) and log the run. Returns what to watch
        next: tasks put back for a retry, and schedule occurrences that were
        waiting for a run that has now ended."""
        if not results:
            return []
        watch: list[tuple[int, datetime]] = []
        run_rows, ended_schedules = [], set()
        with self._begin() as conn:
            current = {
                row.task_id: row
                for row in conn.execute(
                    select(
                        tasks.c.task_id,
                        tasks.c.status,
                        tasks.c.max_attempts,
                        tasks.c.schedule_id,
                        tasks.c.lost_count,
                    ).where(tasks.c.task_id.in_({r.task_id for r in results}))
                )
            }
            for result in results:
                row = current.get(result.task_id)
                if row is None:
                    continue
                outcome = after_attempt(
                    attempt=result.attempt,
                    max_attempts=row.max_attempts,
                    priority=result.priority,
                    failure=result.failure,
                    policy=policy,
                    now=now,
                    lost_count=row.lost_count,
                    tiers=tiers,
                    started=may_have_started(result, TaskStatus(row.status)),
                )
                values = {
                    "status": outcome.status.value,
                    "attempt": outcome.attempt,
                    "priority": outcome.priority,
                    "max_attempts": outcome.max_attempts,
                    "lost_count": outcome.lost_count,
                    "lease_expires_at": None,
                    "updated_at": now,
                }
                if outcome.execute_at is not None:
                    values["execute_at"] = outcome.execute_at
                    values["bucket"] = bucket_of(outcome.execute_at)
                changed = conn.execute(
                    update(tasks)
                    .where(
                        tasks.c.task_id == result.task_id,
                        tasks.c.attempt == result.attempt,
                        tasks.c.epoch == result.epoch,
                        tasks.c.status.in_(IN_FLIGHT),
                    )
                    .values(**values)
                ).rowcount
                if not changed:
                    log.info(
                        "stale result ignored",
                        extra={"task_id": result.task_id, "attempt": result.attempt},
                    )
                    continue
                run_rows.append(_run_values(result))
                if on_outcome is not None:
                    on_outcome(result, outcome.status, row.schedule_id)
                if outcome.status is TaskStatus.SCHEDULED:
                    watch.append((result.task_id, outcome.execute_at))
                elif row.schedule_id is not None:
                    ended_schedules.add(row.schedule_id)
            if run_rows:
                conn.execute(insert(runs), run_rows)
            watch += occurrences.waiting_occurrences(conn, ended_schedules, now=now)
        return watch

    # -- schedules -----------------------------------------------------------
    def add_schedule(
        self, new: NewSchedule, *, now: datetime
    ) -> tuple[Schedule, tuple[int, datetime] | None]:
        """The schedule and its first occurrence, in one transaction."""
        with self._begin() as conn:
            return occurrences.add_schedule(conn, new, now=now)

    def get_schedule(self, schedule_id: int, *, owner_id: int | None) -> Schedule:
        with self._begin() as conn:
            return occurrences.get_schedule(conn, schedule_id, owner_id=owner_id)

    def list_schedules(self, *, owner_id: int) -> list[Schedule]:
        with self._read(owner_id) as conn:
            return occurrences.list_schedules(conn, owner_id)

    def change_schedule(
        self, schedule_id: int, *, owner_id: int, changes: dict, now: datetime
    ) -> tuple[Schedule, tuple[int, datetime] | None]:
        with self._begin() as conn:
            return occurrences.change_schedule(
                conn, schedule_id, owner_id=owner_id, changes=changes, now=now
            )

    def delete_schedule(self, schedule_id: int, *, owner_id: int, now: datetime) -> None:
        with self._begin() as conn:
            occurrences.delete_schedule(conn, schedule_id, owner_id=owner_id, now=now)

    def trigger_schedule(
        self, schedule_id: int, *, owner_id: int, now: datetime
    ) -> tuple[int, datetime]:
        with self._begin() as conn:
            return occurrences.trigger(conn, schedule_id, owner_id=owner_id, now=now)

    def schedule_history(self, schedule_id: int, *, owner_id: int, limit: int = 100) -> list[dict]:
        """Occurrences newest first, each with its runs: nominal time,
        status, and per attempt start, lag and outcome."""
        with self._read(owner_id) as conn:
            occurrences.get_schedule(conn, schedule_id, owner_id=owner_id)
            rows = conn.execute(
                select(tasks.c.task_id, tasks.c.nominal_at, tasks.c.status, tasks.c.attempt)
                .where(tasks.c.schedule_id == schedule_id)
                .order_by(tasks.c.nominal_at.desc())
                .limit(limit)
            ).all()
            ids = [r.task_id for r in rows]
            by_task: dict[int, list[Run]] = {}
            if ids:
                for run_row in conn.execute(
                    select(runs).where(runs.c.task_id.in_(ids)).order_by(runs.c.attempt)
                ):
                    by_task.setdefault(run_row.task_id, []).append(_run(run_row))
        return [
            {
                "task_id": r.task_id,
                "nominal_at": r.nominal_at,
                "status": TaskStatus(r.status),
                "attempt": r.attempt,
                "runs": by_task.get(r.task_id, []),
            }
            for r in rows
        ]

    def stale_queued(
        self, *, wheel: Wheel, shard: int, now: datetime, lease_until: datetime, limit: int
    ) -> list[TaskSpec]:
        """Queued attempts whose queue lease ran out (a hand-over that did not
        arrive, or a task still waiting for a slot): lease them again and
        return them, to be handed over again. No attempt is used: the
        dispatcher ignores one it holds, and the start gate lets one start."""
        stale = and_(
            tasks.c.status == TaskStatus.QUEUED.value,
            tasks.c.lease_expires_at < now,
            self._owned_by(wheel, shard),
        )
        with self._begin() as conn:
            # Only what is handed over is leased again: the rest stays stale
            # for the next sweep.
            chosen = select(tasks.c.task_id).where(stale).limit(limit).scalar_subquery()
            ids = (
                conn.execute(
                    update(tasks)
                    .where(tasks.c.task_id.in_(chosen), stale)
                    .values(lease_expires_at=lease_until)
                    .returning(tasks.c.task_id)
                )
                .scalars()
                .all()
            )
            return self._specs(conn, tasks.c.task_id.in_(ids), wheel) if ids else []

    def queued_specs(self, *, wheel: Wheel, shard: int, limit: int) -> list[TaskSpec]:
        with self._begin() as conn:
            return self._specs(
                conn,
                and_(tasks.c.status == TaskStatus.QUEUED.value, self._owned_by(wheel, shard)),
                wheel,
                limit=limit,
            )

    def running_specs(self, *, wheel: Wheel, limit: int) -> list[TaskSpec]:
        """Every attempt the database says is running, on any shard: what a
        dispatcher compares with what executors hold."""
        with self._begin() as conn:
            return self._specs(conn, tasks.c.status == TaskStatus.RUNNING.value, wheel, limit=limit)

    @staticmethod
    def _specs(conn: Connection, where, wheel: Wheel, *, limit: int | None = None):
        rows = conn.execute(
            select(*SPEC_COLUMNS)
            .join(scripts, scripts.c.script_id == tasks.c.script_id)
            .where(where)
            .order_by(tasks.c.execute_at)
            .limit(limit)
        ).all()
        return [_spec(row, shard=wheel.shard_of_bucket(row.bucket)) for row in rows]


def _run_values(result: RunResult) -> dict:
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
