"""chronoray.Client: a Python driver's handle on a running deployment.

It talks to the actors directly (no HTTP), so it works inside
``ray job submit`` drivers; input is validated by the same rules as HTTP.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import ray

from scheduling.errors import ChronorayError, InvalidInput
from scheduling.models import ApiToken, Interpreter, Run, Script, Task, User
from scheduling.schedules import Schedule
from serve_app.operations import check_caps


def _iso_times(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in fields.items()}


@dataclass(frozen=True)
class TaskView:
    task: Task
    runs: list[Run]


class Client:
    """Acts as the user whose ``token`` it is given (or ``CHRONORAY_TOKEN``);
    without one, as the local user of the embedded default. A driver runs
    inside the cluster, next to the database, so the token decides whose
    work it sees, as over HTTP; it is no wall against code that already
    holds the cluster's credentials."""

    def __init__(
        self,
        address: str = "auto",
        *,
        namespace: str = "chronoray",
        token: str | None = None,
        admin_token: str | None = None,
    ) -> None:
        from actors.handles import dispatcher_handle
        from chronoray.auth import Authenticator
        from serve_app.deployment import LOCAL_USER, ShardSubmitter
        from storage.engines import make_engine
        from storage.sql import SqlTaskRepository

        if not ray.is_initialized():
            ray.init(address=address, namespace=namespace, log_to_driver=False)
        self.settings = ray.get(dispatcher_handle(namespace).settings.remote())
        self._repo = SqlTaskRepository(
            make_engine(self.settings.database_url, pool_size=2),
            read_engines=[
                make_engine(url, pool_size=2) for url in self.settings.database_replica_urls
            ],
        )
        self._submitter = ShardSubmitter(self.settings)
        self._auth = Authenticator(self._repo.user_for_token, admin_token=self.settings.admin_token)
        self._admin = (
            admin_token is not None and self._auth.authenticate(admin_token).admin
        )  # checked on each admin call
        token = token or os.environ.get("CHRONORAY_TOKEN")
        if token:
            self.owner_id = self._auth.authenticate(token).require_user()
        else:
            self.owner_id = self._repo.ensure_user(
                first_name=LOCAL_USER[0], last_name=LOCAL_USER[1], now=datetime.now(timezone.utc)
            )

    def register_script(self, name: str, body: str, *, interpreter: str = "bash") -> Script:
        """As ``POST /v1/scripts``: a changed body is a new version."""
        return self.upload_script(name, body.encode(), interpreter=interpreter)

    def upload_script(self, name: str, body: bytes, *, interpreter: str = "bash") -> Script:
        """As ``PUT /v1/scripts/{name}``: any bytes; the same content again
        is the same version."""
        from serve_app.operations import store_script

        script, _ = store_script(
            self._repo,
            self.settings,
            owner_id=self.owner_id,
            name=name,
            interpreter=Interpreter(interpreter),
            body=body,
            now=datetime.now(timezone.utc),
        )
        return script

    def list_scripts(self) -> list[Script]:
        return self._repo.list_scripts(owner_id=self.owner_id)

    def get_script(self, name: str, *, version: int | None = None) -> Script:
        return self._repo.get_script(owner_id=self.owner_id, name=name, version=version)

    def script_versions(self, name: str) -> list[Script]:
        return self._repo.script_versions(owner_id=self.owner_id, name=name)

    def script_body(self, name: str, *, version: int | None = None) -> bytes:
        return self._repo.get_script_body(self.get_script(name, version=version).script_id)

    def delete_script(self, name: str) -> int:
        """Every version; ScriptInUse (409) while a pending task or schedule uses it."""
        return self._repo.delete_script(
            owner_id=self.owner_id, name=name, now=datetime.now(timezone.utc)
        )

    # -- users and tokens (the admin token) --------------------------------------
    def _require_admin(self) -> None:
        if not self._admin:
            from scheduling.errors import Forbidden

            raise Forbidden("needs the admin token: Client(admin_token=...)")

    def create_user(self, first_name: str, last_name: str) -> User:
        from serve_app.schemas import UserIn

        self._require_admin()
        body = UserIn.parse({"first_name": first_name, "last_name": last_name})
        return self._repo.add_user(
            first_name=body.first_name, last_name=body.last_name, now=datetime.now(timezone.utc)
        )

    def get_user(self, user_id: int) -> User:
        self._require_admin()
        return self._repo.get_user(user_id)

    def list_users(self) -> list[User]:
        self._require_admin()
        return self._repo.list_users()

    def issue_token(self, user_id: int, *, label: str = "") -> tuple[ApiToken, str]:
        """The token's record and the token itself (shown once)."""
        from chronoray.auth import issue_token

        self._require_admin()
        return issue_token(self._repo, user_id=user_id, label=label, now=datetime.now(timezone.utc))

    def revoke_token(self, token_id: int) -> ApiToken:
        self._require_admin()
        return self._repo.revoke_token(token_id, now=datetime.now(timezone.utc))

    def me(self) -> User:
        return self._repo.get_user(self.owner_id)

    def submit(self, script: str, execute_at: datetime | float | str, **fields: Any) -> Task:
        [task] = self.submit_many([{"script": script, "execute_at": execute_at, **fields}])
        return task

    def submit_many(self, requests: Sequence[Mapping[str, Any]]) -> list[Task]:
        """Each request has the fields of ``POST /v1/tasks``. Raises the
        first error; tasks before it in the list are stored."""
        from serve_app.operations import new_task
        from serve_app.schemas import TaskIn

        news = []
        for request in requests:
            request = dict(request)
            if isinstance(request.get("execute_at"), datetime):
                request["execute_at"] = request["execute_at"].isoformat()
            news.append(
                new_task(TaskIn.parse(request), owner_id=self.owner_id, settings=self.settings)
            )
        check_caps(self._repo, self.settings, self.owner_id, tasks=len(news))
        results = self._submitter.submit_blocking(news)
        tasks = []
        for result in results:
            if isinstance(result, ChronorayError):
                raise result
            tasks.append(result.task)
        return tasks

    def submit_batch(self, requests: Sequence[Mapping[str, Any]]) -> list[Task]:
        """All or nothing, in one transaction: as ``POST /v1/tasks:batch``."""
        from serve_app.operations import new_batch, store_batch

        news = new_batch(
            [_iso_times(r) for r in requests], owner_id=self.owner_id, settings=self.settings
        )
        check_caps(self._repo, self.settings, self.owner_id, tasks=len(news))
        results = store_batch(self._repo, news, now=datetime.now(timezone.utc))
        self._submitter.track_blocking([(r.task.task_id, r.task.execute_at) for r in results])
        return [r.task for r in results]

    # -- schedules -----------------------------------------------------------
    def create_schedule(self, script: str, cron: str, **fields: Any) -> Schedule:
        """Fields as in ``POST /v1/schedules`` (timezone, variables, priority,
        misfire_policy, overlap_policy, jitter_s, start_at, end_at, paused)."""
        from serve_app.operations import new_schedule
        from serve_app.schemas import ScheduleIn

        now = datetime.now(timezone.utc)
        body = ScheduleIn.parse({"script": script, "cron": cron, **_iso_times(fields)})
        new = new_schedule(body, owner_id=self.owner_id, settings=self.settings, now=now)
        check_caps(self._repo, self.settings, self.owner_id, schedules=1)
        schedule, follow_up = self._repo.add_schedule(new, now=now)
        if follow_up:
            self._submitter.track_blocking([follow_up])
        return schedule

    def get_schedule(self, schedule_id: int) -> Schedule:
        return self._repo.get_schedule(schedule_id, owner_id=self.owner_id)

    def list_schedules(self) -> list[Schedule]:
        return self._repo.list_schedules(owner_id=self.owner_id)

    def change_schedule(self, schedule_id: int, **changes: Any) -> Schedule:
        from scheduling.cron import validate_schedule
        from serve_app.operations import schedule_changes
        from serve_app.schemas import SchedulePatch

        now = datetime.now(timezone.utc)
        current = self.get_schedule(schedule_id)
        values = schedule_changes(
            SchedulePatch.parse(_iso_times(changes)), settings=self.settings, now=now
        )
        if "cron" in values or "timezone" in values:
            validate_schedule(
                values.get("cron", current.cron),
                values.get("timezone", current.timezone),
                now=now,
                min_interval_s=self.settings.min_schedule_interval_s,
            )
        schedule, follow_up = self._repo.change_schedule(
            schedule_id, owner_id=self.owner_id, changes=values, now=now
        )
        if follow_up:
            self._submitter.track_blocking([follow_up])
        return schedule

    def delete_schedule(self, schedule_id: int) -> None:
        self._repo.delete_schedule(
            schedule_id, owner_id=self.owner_id, now=datetime.now(timezone.utc)
        )

    def trigger_schedule(self, schedule_id: int) -> int:
        task_id, at = self._repo.trigger_schedule(
            schedule_id, owner_id=self.owner_id, now=datetime.now(timezone.utc)
        )
        self._submitter.track_blocking([(task_id, at)])
        return task_id

    def preview_schedule(self, schedule_id: int, *, count: int = 10) -> list[datetime]:
        """The next fire times (UTC), as ``GET /v1/schedules/{id}/preview``."""
        from serve_app.operations import upcoming_fires

        if not 1 <= count <= 100:
            raise InvalidInput("must be between 1 and 100", "count")
        return upcoming_fires(self.get_schedule(schedule_id), count)

    def schedule_history(self, schedule_id: int, *, limit: int = 100) -> list[dict]:
        return self._repo.schedule_history(schedule_id, owner_id=self.owner_id, limit=limit)

    def get(self, task_id: int) -> TaskView:
        task = self._repo.get_task(task_id, owner_id=self.owner_id)
        return TaskView(task=task, runs=self._repo.list_runs(task_id))

    def runs(self, task_id: int) -> list[Run]:
        """Every attempt of one of this user's tasks."""
        from serve_app.operations import task_runs

        return task_runs(self._repo, task_id, owner_id=self.owner_id)

    def run_output(self, task_id: int, attempt: int) -> str:
        from serve_app.operations import run_of

        return run_of(self.runs(task_id), task_id, attempt).output_tail

    def cancel(self, task_id: int) -> Task:
        return self._repo.cancel_task(
            task_id, owner_id=self.owner_id, now=datetime.now(timezone.utc)
        )

    def list_tasks(
        self,
        *,
        status: Sequence[str] = (),
        script: str | None = None,
        schedule_id: int | None = None,
        due_from: str | float | None = None,
        due_before: str | float | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[Task], str | None]:
        """One page of this user's tasks, newest first, and the cursor of
        the next page (``None`` at the end): as ``GET /v1/tasks``."""
        from serve_app.schemas import task_page, task_query

        if not 1 <= limit <= 1000:
            raise InvalidInput("must be between 1 and 1000", "limit")
        query = task_query(
            owner_id=self.owner_id,
            status=status,
            script=script,
            schedule_id=schedule_id,
            due_from=None if due_from is None else str(due_from),
            due_before=None if due_before is None else str(due_before),
            limit=limit,
            cursor=cursor,
        )
        return task_page(self._repo, query)

    def dead(self, *, limit: int = 100) -> list[Task]:
        """Tasks that used up their attempts, newest first."""
        return self.list_tasks(status=["dead"], limit=limit)[0]

    def retry(self, task_id: int, *, attempts: int = 1) -> Task:
        """Run a dead task again, with ``attempts`` more attempts."""
        from serve_app.operations import redrive

        task = redrive(
            self._repo,
            self.settings,
            task_id,
            owner_id=self.owner_id,
            attempts=attempts,
            now=datetime.now(timezone.utc),
        )
        self._submitter.track_blocking([(task.task_id, task.execute_at)])
        return task

    def executors(self) -> dict:
        """The pool's view: each tier's live, starting and unplaceable
        executors, and each executor's state and heartbeat age."""
        from actors.handles import pool_handle

        return ray.get(pool_handle(self.settings.namespace).status.remote())

    def wait(
        self, task_ids: Iterable[int], *, timeout_s: float = 120.0, poll_s: float = 0.2
    ) -> list[TaskView]:
        """Until every task is final (succeeded, dead, cancelled)."""
        ids = list(task_ids)
        pending = list(ids)
        done: dict[int, TaskView] = {}
        deadline = time.monotonic() + timeout_s
        while pending:
            for task_id in list(pending):
                view = self.get(task_id)
                if view.task.status.is_final:
                    done[task_id] = view
                    pending.remove(task_id)
            if pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(pending)} tasks not final after {timeout_s} s")
                time.sleep(poll_s)
        return [done[t] for t in ids]
