"""SqlTaskRepository: SQLAlchemy Core over PostgreSQL (psycopg 3) and SQLite.

The facade only chooses the transaction (``replicas.Databases``: the primary
for writes, a replica for queries) and calls one function per operation from
the module of its concern: ``accounts``, ``scripts``, ``tasks``, ``firing``,
``schedules``; ``rows`` maps rows to records for all of them."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, select

from scheduling.audit import Start
from scheduling.errors import ChronorayError
from scheduling.figures import LagFigures
from scheduling.lifecycle import RetryPolicy
from scheduling.models import (
    ApiToken,
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
from scheduling.schedules import MisfireRules, NewSchedule, OverlapPolicy, Schedule
from scheduling.tiers import TierTable
from scheduling.timeline import Wheel
from storage.engines import make_engine, make_replica_engine
from storage.repository import Claimed, ConsoleSession, OutcomeHook, TaskQuery
from storage.sql import accounts, firing, rows, schedules, scripts, stats, tasks
from storage.sql.analyze import FreshStatistics
from storage.sql.replicas import Databases


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
        self.databases = Databases(engine, read_engines)
        self.engine = engine
        self.read_engines = self.databases.read_engines
        self.tracks_writes = self.databases.tracks_writes
        self.misfire_rules = misfire_rules or MisfireRules()
        self.statistics = FreshStatistics(engine)

    @classmethod
    def connect(
        cls,
        url: str,
        replica_urls: Sequence[str] = (),
        *,
        pool_size: int = 5,
        misfire_rules: MisfireRules | None = None,
    ) -> SqlTaskRepository:
        """On the primary at ``url``; get and list queries on the replicas."""
        return cls(
            make_engine(url, pool_size=pool_size),
            read_engines=[make_replica_engine(u, pool_size=pool_size) for u in replica_urls],
            misfire_rules=misfire_rules,
        )

    def _write_for(self, one_statement: bool) -> AbstractContextManager[Connection]:
        """Work that is one statement runs in autocommit (one round trip);
        anything else in a transaction."""
        return self.databases.statement() if one_statement else self.databases.begin()

    def note_write(self, owner_id: int) -> None:
        self.databases.note_write(owner_id)

    def ping(self) -> None:
        """Raises Unavailable when the primary database does not answer."""
        with self.databases.begin() as conn:
            conn.execute(select(1))

    # -- users and tokens (always the primary: a revoked token stops at once)
    def ensure_user(self, *, first_name: str, last_name: str, now: datetime) -> int:
        with self.databases.begin() as conn:
            return accounts.ensure_user(conn, first_name=first_name, last_name=last_name, now=now)

    def add_user(self, *, first_name: str, last_name: str, now: datetime) -> User:
        with self.databases.begin() as conn:
            return accounts.add_user(conn, first_name=first_name, last_name=last_name, now=now)

    def get_user(self, user_id: int) -> User:
        with self.databases.begin() as conn:
            return accounts.get_user(conn, user_id)

    def list_users(self) -> list[User]:
        with self.databases.begin() as conn:
            return accounts.list_users(conn)

    def add_token(self, *, user_id: int, token_hash: str, label: str, now: datetime) -> ApiToken:
        with self.databases.begin() as conn:
            return accounts.add_token(
                conn, user_id=user_id, token_hash=token_hash, label=label, now=now
            )

    def revoke_token(self, token_id: int, *, now: datetime) -> ApiToken:
        with self.databases.begin() as conn:
            return accounts.revoke_token(conn, token_id, now=now)

    def user_for_token(self, token_hash: str) -> int | None:
        with self.databases.begin() as conn:
            return accounts.user_for_token(conn, token_hash)

    def count_active(self, owner_id: int) -> tuple[int, int]:
        with self.databases.begin() as conn:
            return accounts.count_active(conn, owner_id)

    # -- scripts -----------------------------------------------------------
    def add_script(
        self, *, owner_id: int, name: str, interpreter: Interpreter, body: bytes, now: datetime
    ) -> tuple[Script, bool]:
        return self.databases.write(
            lambda conn: scripts.add_script(
                conn, owner_id=owner_id, name=name, interpreter=interpreter, body=body, now=now
            ),
            what="store the script",
        )

    def get_script(self, *, owner_id: int, name: str, version: int | None = None) -> Script:
        with self.databases.read(owner_id) as conn:
            return scripts.get_script(conn, owner_id=owner_id, name=name, version=version)

    def list_scripts(self, *, owner_id: int) -> list[Script]:
        with self.databases.read(owner_id) as conn:
            return scripts.list_scripts(conn, owner_id=owner_id)

    def script_versions(self, *, owner_id: int, name: str) -> list[Script]:
        with self.databases.read(owner_id) as conn:
            return scripts.script_versions(conn, owner_id=owner_id, name=name)

    def delete_script(self, *, owner_id: int, name: str, now: datetime) -> int:
        with self.databases.begin() as conn:
            return scripts.delete_script(conn, owner_id=owner_id, name=name, now=now)

    def get_script_body(self, script_id: int) -> bytes:
        with self.databases.begin() as conn:
            return scripts.script_body(conn, script_id)

    # -- submissions and queries -------------------------------------------
    def add_tasks(
        self,
        new_tasks: Sequence[NewTask],
        *,
        now: datetime,
        atomic: bool = False,
        fresh: bool = False,
    ) -> list[SubmitResult | ChronorayError]:
        """Group commit: every valid submission in one transaction (see
        ``tasks.add_tasks``)."""
        results = self.databases.write(
            lambda conn: tasks.add_tasks(conn, new_tasks, now=now, atomic=atomic, fresh=fresh),
            what="store the tasks",
        )
        self.statistics.stored(len(new_tasks))
        return results

    def get_task(self, task_id: int, *, owner_id: int | None = None) -> Task:
        with self.databases.read(owner_id) as conn:
            return tasks.get_task(conn, task_id, owner_id=owner_id)

    def list_runs(self, task_id: int) -> list[Run]:
        with self.databases.read() as conn:
            return rows.runs_of(conn, [task_id]).get(task_id, [])

    def list_tasks(self, query: TaskQuery) -> list[Task]:
        with self.databases.read(query.owner_id) as conn:
            return tasks.list_tasks(conn, query)

    def cancel_task(self, task_id: int, *, owner_id: int | None, now: datetime) -> Task:
        with self.databases.begin() as conn:
            return tasks.cancel_task(conn, task_id, owner_id=owner_id, now=now)

    def redrive(self, task_id: int, *, owner_id: int | None, attempts: int, now: datetime) -> Task:
        with self.databases.begin() as conn:
            return tasks.redrive(conn, task_id, owner_id=owner_id, attempts=attempts, now=now)

    def purge_finished(self, *, before: datetime, limit: int) -> int:
        with self.databases.begin() as conn:
            return tasks.purge_finished(conn, before=before, limit=limit)

    # -- the shard's work (always the primary) ------------------------------
    def start_shard(self, shard: int, *, now: datetime) -> int:
        return self.databases.write(
            lambda conn: firing.start_shard(conn, shard, now=now), what=f"start shard {shard}"
        )

    def shard_epoch(self, shard: int) -> int | None:
        with self.databases.begin() as conn:
            return firing.shard_epoch(conn, shard)

    def due_tasks(
        self, *, wheel: Wheel, shard: int, before: datetime, limit: int
    ) -> list[tuple[int, datetime]]:
        with self.databases.begin() as conn:
            return firing.due_tasks(conn, wheel=wheel, shard=shard, before=before, limit=limit)

    def claim(
        self,
        task_ids: Sequence[int],
        *,
        shard: int,
        epoch: int,
        lease_until: datetime,
        now: datetime,
    ) -> Claimed:
        with self.databases.begin() as conn:
            return firing.claim(
                conn,
                task_ids,
                shard=shard,
                epoch=epoch,
                lease_until=lease_until,
                now=now,
                rules=self.misfire_rules,
            )

    def mark_running(
        self, specs: Sequence[TaskSpec], *, lease_grace_s: float, now: datetime
    ) -> list[tuple[int, int]]:
        if not specs:
            return []
        with self._write_for(firing.gate_is_one_statement(self.engine.dialect.name, specs)) as conn:
            return firing.mark_running(conn, specs, lease_grace_s=lease_grace_s, now=now)

    def record_results(
        self,
        results: Sequence[RunResult],
        *,
        policy: RetryPolicy,
        now: datetime,
        tiers: TierTable | None = None,
        on_outcome: OutcomeHook | None = None,
    ) -> list[tuple[int, datetime]]:
        if not results:
            return []
        with self._write_for(
            firing.results_are_one_statement(self.engine.dialect.name, results)
        ) as conn:
            return firing.record_results(
                conn, results, policy=policy, now=now, tiers=tiers, on_outcome=on_outcome
            )

    def warm_up(self, *, connections: int, now: datetime) -> None:
        with ExitStack() as opened:
            for _ in range(connections - 1):
                opened.enter_context(self.databases.begin())
            with self.databases.begin() as conn:
                firing.warm_up(conn, now=now)

    def stale_queued(
        self, *, wheel: Wheel, shard: int, now: datetime, lease_until: datetime, limit: int
    ) -> list[TaskSpec]:
        with self.databases.begin() as conn:
            return firing.stale_queued(
                conn, wheel=wheel, shard=shard, now=now, lease_until=lease_until, limit=limit
            )

    def queued_specs(self, *, wheel: Wheel, shard: int, limit: int) -> list[TaskSpec]:
        with self.databases.begin() as conn:
            return firing.queued_specs(conn, wheel=wheel, shard=shard, limit=limit)

    def long_queued(
        self, *, wheel: Wheel, lease_ends_before: datetime, limit: int
    ) -> list[TaskSpec]:
        with self.databases.begin() as conn:
            return firing.long_queued(
                conn, wheel=wheel, lease_ends_before=lease_ends_before, limit=limit
            )

    def running_specs(self, *, wheel: Wheel, limit: int) -> list[TaskSpec]:
        with self.databases.begin() as conn:
            return firing.running_specs(conn, wheel=wheel, limit=limit)

    # -- schedules -----------------------------------------------------------
    def add_schedule(
        self, new: NewSchedule, *, now: datetime
    ) -> tuple[Schedule, tuple[int, datetime] | None]:
        """The schedule and its first occurrence, in one transaction."""
        with self.databases.begin() as conn:
            return schedules.add_schedule(conn, new, now=now)

    def get_schedule(self, schedule_id: int, *, owner_id: int | None) -> Schedule:
        with self.databases.begin() as conn:
            return schedules.get_schedule(conn, schedule_id, owner_id=owner_id)

    def list_schedules(self, *, owner_id: int) -> list[Schedule]:
        with self.databases.read(owner_id) as conn:
            return schedules.list_schedules(conn, owner_id)

    def change_schedule(
        self, schedule_id: int, *, owner_id: int, changes: dict[str, Any], now: datetime
    ) -> tuple[Schedule, tuple[int, datetime] | None]:
        with self.databases.begin() as conn:
            return schedules.change_schedule(
                conn, schedule_id, owner_id=owner_id, changes=changes, now=now
            )

    def delete_schedule(self, schedule_id: int, *, owner_id: int, now: datetime) -> None:
        with self.databases.begin() as conn:
            schedules.delete_schedule(conn, schedule_id, owner_id=owner_id, now=now)

    def trigger_schedule(
        self, schedule_id: int, *, owner_id: int, now: datetime
    ) -> tuple[int, datetime]:
        with self.databases.begin() as conn:
            return schedules.trigger(conn, schedule_id, owner_id=owner_id, now=now)

    def backfill_schedule(
        self,
        schedule_id: int,
        *,
        owner_id: int,
        fires: Sequence[datetime],
        overlap: OverlapPolicy,
        now: datetime,
    ) -> list[tuple[int, datetime]]:
        with self.databases.begin() as conn:
            return schedules.backfill(
                conn, schedule_id, owner_id=owner_id, fires=fires, overlap=overlap, now=now
            )

    def schedule_occurrences(
        self, schedule_ids: Sequence[int], *, owner_id: int, start: datetime, end: datetime
    ) -> tuple[dict[int, list[tuple[int, datetime, TaskStatus]]], dict[int, list[Start]]]:
        """The caller checked that ``owner_id`` owns each schedule."""
        with self.databases.read(owner_id) as conn:
            return schedules.occurrences_between(conn, schedule_ids, start=start, end=end)

    # -- the console's figures -------------------------------------------------
    def task_counts(self, owner_id: int) -> dict[str, int]:
        with self.databases.read(owner_id) as conn:
            return stats.status_counts(conn, owner_id)

    def queued_by_priority(self, owner_id: int) -> dict[int, int]:
        with self.databases.read(owner_id) as conn:
            return stats.queued_by_priority(conn, owner_id)

    def lag_figures(
        self, owner_id: int, *, since: datetime, until: datetime, bin_s: float
    ) -> LagFigures:
        with self.databases.read(owner_id) as conn:
            return stats.lag_figures(conn, owner_id, since=since, until=until, bin_s=bin_s)

    # -- console sessions (always the primary: a logout ends one at once) ------
    def add_console_session(self, session: ConsoleSession) -> None:
        with self.databases.begin() as conn:
            stats.add_session(conn, session)

    def console_session(self, session_hash: str, *, now: datetime) -> ConsoleSession | None:
        with self.databases.begin() as conn:
            return stats.get_session(conn, session_hash, now=now)

    def end_console_session(self, session_hash: str) -> None:
        with self.databases.begin() as conn:
            stats.end_session(conn, session_hash)

    def schedule_history(
        self, schedule_id: int, *, owner_id: int, limit: int = 100
    ) -> list[dict[str, Any]]:
        with self.databases.read(owner_id) as conn:
            return schedules.schedule_history(conn, schedule_id, owner_id=owner_id, limit=limit)
