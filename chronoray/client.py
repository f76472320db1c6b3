"""chronoray.Client: a Python driver's handle on a running deployment, a
synchronous face over the Service the HTTP API calls. It reaches the actors
directly (no HTTP), so it works inside ``ray job submit`` drivers."""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import ray

from actors.handles import DRIVER_CALL_TIMEOUT_S, ShardRouter, dispatcher_handle
from scheduling.audit import Audit
from scheduling.errors import ChronorayError, Forbidden
from scheduling.models import ApiToken, Interpreter, Run, Script, Task, User
from scheduling.schedules import Schedule
from service.core import DEFAULT_LATE_S, BackfillResult, Service, TaskView
from service.requests import BackfillIn, ScheduleIn, SchedulePatch, TaskIn, TokenIn, UserIn
from storage.sql import SqlTaskRepository

T = TypeVar("T")


@functools.cache
def _loop() -> asyncio.AbstractEventLoop:
    """One event loop on a thread of its own, for every Client of this
    process: the Service is async; a driver is not."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="chronoray-client", daemon=True).start()
    return loop


def _run(call: Coroutine[Any, Any, T]) -> T:
    return asyncio.run_coroutine_threadsafe(call, _loop()).result()


class Client:
    """Acts as the user whose ``token`` it is given (or ``CHRONORAY_TOKEN``),
    else as the embedded default's local user. The token decides whose work
    it sees; it is no wall against code that holds the cluster's credentials.
    ``call_timeout_s`` bounds each call to a shard: one that does not answer
    by then raises Unavailable (the call may still be taken later: retry
    with the same idempotency key)."""

    def __init__(
        self,
        address: str = "auto",
        *,
        namespace: str = "chronoray",
        token: str | None = None,
        admin_token: str | None = None,
        call_timeout_s: float = DRIVER_CALL_TIMEOUT_S,
    ) -> None:
        if not ray.is_initialized():
            ray.init(address=address, namespace=namespace, log_to_driver=False)
        self.settings = ray.get(dispatcher_handle(namespace).settings.remote())
        repo = SqlTaskRepository.connect(
            self.settings.database_url, self.settings.database_replica_urls, pool_size=2
        )
        router = ShardRouter(
            wheel=self.settings.wheel, namespace=namespace, timeout_s=call_timeout_s
        )
        self._service = Service(repo=repo, router=router, settings=self.settings)
        self._admin = admin_token is not None and _run(self._service.caller(admin_token)).admin
        token = token or os.environ.get("CHRONORAY_TOKEN")
        me = self._service.caller(token) if token else None
        self.owner_id = _run(me).require_user() if me else _run(self._service.local_user())

    def _as_admin(self) -> Service:
        if not self._admin:
            raise Forbidden("needs the admin token: Client(admin_token=...)")
        return self._service

    def register_script(self, name: str, body: str, *, interpreter: str = "bash") -> Script:
        """As ``POST /v1/scripts``: a changed body is a new version."""
        return self.upload_script(name, body.encode(), interpreter=interpreter)

    def upload_script(self, name: str, body: bytes, *, interpreter: str = "bash") -> Script:
        """As ``PUT /v1/scripts/{name}``: the same content again is the same version."""
        kind = Interpreter(interpreter)
        return _run(self._service.upload_script(self.owner_id, name, body, kind))[0]

    def list_scripts(self) -> list[Script]:
        return _run(self._service.list_scripts(self.owner_id))

    def get_script(self, name: str, *, version: int | None = None) -> Script:
        return _run(self._service.get_script(self.owner_id, name, version))

    def script_versions(self, name: str) -> list[Script]:
        return _run(self._service.script_versions(self.owner_id, name))

    def script_body(self, name: str, *, version: int | None = None) -> bytes:
        return _run(self._service.script_body(self.owner_id, name, version))

    def delete_script(self, name: str) -> int:
        """Every version; ScriptInUse (409) while a pending task or schedule uses it."""
        return _run(self._service.delete_script(self.owner_id, name))

    def create_user(self, first_name: str, last_name: str) -> User:
        body = UserIn.parse({"first_name": first_name, "last_name": last_name})
        return _run(self._as_admin().create_user(body))

    def get_user(self, user_id: int) -> User:
        return _run(self._as_admin().get_user(user_id))

    def list_users(self) -> list[User]:
        return _run(self._as_admin().list_users())

    def issue_token(self, user_id: int, *, label: str = "") -> tuple[ApiToken, str]:
        """The token's record and the token itself (shown once)."""
        return _run(self._as_admin().issue_token(user_id, TokenIn.parse({"label": label})))

    def revoke_token(self, token_id: int) -> ApiToken:
        return _run(self._as_admin().revoke_token(token_id))

    def me(self) -> User:
        return _run(self._service.me(self.owner_id))

    def submit(self, script: str, execute_at: datetime | float | str, **fields: Any) -> Task:
        [task] = self.submit_many([{"script": script, "execute_at": execute_at, **fields}])
        return task

    def submit_many(self, requests: Sequence[Mapping[str, Any]]) -> list[Task]:
        """Each request has the fields of ``POST /v1/tasks``. Raises the
        first error; tasks before it in the list are stored."""
        bodies = [TaskIn.parse(request) for request in requests]
        results = _run(self._service.submit_tasks(self.owner_id, bodies))
        if errors := [r for r in results if isinstance(r, ChronorayError)]:
            raise errors[0]
        return [result.task for result in results]  # type: ignore[union-attr]

    def submit_batch(self, requests: Sequence[Mapping[str, Any]]) -> list[Task]:
        """All or nothing, in one transaction: as ``POST /v1/tasks:batch``."""
        return [r.task for r in _run(self._service.submit_batch(self.owner_id, requests))]

    def get(self, task_id: int) -> TaskView:
        return _run(self._service.get_task(self.owner_id, task_id))

    def runs(self, task_id: int) -> list[Run]:
        return _run(self._service.list_runs(self.owner_id, task_id))

    def run_output(self, task_id: int, attempt: int) -> str:
        return _run(self._service.run_output(self.owner_id, task_id, attempt))

    def cancel(self, task_id: int) -> Task:
        return _run(self._service.cancel_task(self.owner_id, task_id))

    def list_tasks(self, **filters: Any) -> tuple[list[Task], str | None]:
        """One page of this user's tasks, newest first, and the cursor of the
        next page (``None`` at the end): as ``GET /v1/tasks`` (status, script,
        schedule_id, due_from, due_before, limit, cursor)."""
        return _run(self._service.list_tasks(self.owner_id, **filters))

    def dead(self, *, limit: int = 100) -> list[Task]:
        return _run(self._service.list_dead(self.owner_id, limit))

    def retry(self, task_id: int, *, attempts: int = 1) -> Task:
        """Run a dead task again, with ``attempts`` more attempts."""
        return _run(self._service.retry_task(self.owner_id, task_id, attempts))

    def executors(self) -> dict:
        """The pool's view: tiers and executors, with states and heartbeat ages."""
        return _run(self._service.list_executors())

    def wait(
        self, task_ids: Iterable[int], *, timeout_s: float = 120.0, poll_s: float = 0.2
    ) -> list[TaskView]:
        """Until every task is final (succeeded, dead, cancelled)."""
        ids = list(task_ids)
        return _run(self._service.wait_final(self.owner_id, ids, timeout_s, poll_s))

    def create_schedule(self, script: str, cron: str, **fields: Any) -> Schedule:
        """Fields as in ``POST /v1/schedules`` (timezone, variables, priority,
        misfire_policy, overlap_policy, jitter_s, start_at, end_at, paused)."""
        body = ScheduleIn.parse({"script": script, "cron": cron, **fields})
        return _run(self._service.create_schedule(self.owner_id, body))

    def get_schedule(self, schedule_id: int) -> Schedule:
        return _run(self._service.get_schedule(self.owner_id, schedule_id))

    def list_schedules(self) -> list[Schedule]:
        return _run(self._service.list_schedules(self.owner_id))

    def change_schedule(self, schedule_id: int, **changes: Any) -> Schedule:
        patch = SchedulePatch.parse(changes)
        return _run(self._service.change_schedule(self.owner_id, schedule_id, patch))

    def delete_schedule(self, schedule_id: int) -> None:
        _run(self._service.delete_schedule(self.owner_id, schedule_id))

    def trigger_schedule(self, schedule_id: int) -> int:
        return _run(self._service.trigger_schedule(self.owner_id, schedule_id))[0]

    def preview_schedule(self, schedule_id: int, *, count: int = 10) -> list[datetime]:
        """The next fire times (UTC), as ``GET /v1/schedules/{id}/preview``."""
        return _run(self._service.preview_schedule(self.owner_id, schedule_id, count))[1]

    def schedule_history(self, schedule_id: int, *, limit: int = 100) -> list[dict]:
        return _run(self._service.schedule_history(self.owner_id, schedule_id, limit))

    def backfill_schedule(
        self,
        schedule_id: int,
        start: datetime | str,
        end: datetime | str,
        *,
        overlap_policy: str = "allow",
    ) -> BackfillResult:
        """As ``POST /v1/schedules/{id}/backfill``: every time of [start, end)
        that has no occurrence yet runs once."""
        body = BackfillIn.parse({"from": start, "to": end, "overlap_policy": overlap_policy})
        return _run(self._service.backfill_schedule(self.owner_id, schedule_id, body))

    def audit_schedule(
        self,
        schedule_id: int,
        start: datetime | str | None = None,
        end: datetime | str | None = None,
        *,
        late_after_s: float = DEFAULT_LATE_S,
    ) -> Audit:
        """As ``GET /v1/schedules/{id}/audit``: expected fires against what ran."""
        return _run(
            self._service.audit_schedule(
                self.owner_id, schedule_id, start=start, end=end, late_after_s=late_after_s
            )
        )[1]

    def preview_expression(
        self, cron: str, timezone: str = "UTC", *, count: int = 5
    ) -> list[datetime]:
        """As ``GET /v1/schedules:preview``: the next fires of an expression."""
        return _run(self._service.preview_expression(cron, timezone, count))
