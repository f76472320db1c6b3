"""The steps operations share: validation against the settings, caps,
batches. Pure or over the repository; the Service composes them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from pydantic import TypeAdapter, ValidationError

from chronoray.settings import Settings
from scheduling.cron import validate_schedule
from scheduling.errors import (
    BatchRejected,
    ChronorayError,
    InvalidInput,
    RunNotFound,
    TooLarge,
    in_batch,
)
from scheduling.models import (
    Interpreter,
    NewTask,
    Run,
    Script,
    SubmitResult,
    Task,
    new_request_id,
    trusted,
)
from scheduling.schedules import MisfirePolicy, NewSchedule, OverlapPolicy, Schedule, first_fire
from scheduling.validation import validate_script_name
from service.requests import ScheduleFields, ScheduleIn, TaskIn, encode_cursor, parse_instant
from storage.repository import Accounts, Repository, TaskQuery

LOCAL_USER = ("local", "user")  # whom the embedded default acts for without a token


def local_user(repo: Accounts, *, now: datetime) -> int:
    """The local user's id, created on first use."""
    first, last = LOCAL_USER
    return repo.ensure_user(first_name=first, last_name=last, now=now)


def bounded(value: int, low: int, high: int, field: str) -> int:
    """``value``, or InvalidInput naming ``field`` when outside [low, high]."""
    if not low <= value <= high:
        raise InvalidInput(f"must be between {low} and {high}", field)
    return value


def redrive(
    repo: Repository,
    settings: Settings,
    task_id: int,
    *,
    owner_id: int,
    attempts: int,
    now: datetime,
) -> Task:
    """A dead task, due now with ``attempts`` more attempts (the caller
    tells its shard)."""
    bounded(attempts, 1, settings.max_attempts_limit, "attempts")
    return repo.redrive(task_id, owner_id=owner_id, attempts=attempts, now=now)


def store_script(
    repo: Repository,
    settings: Settings,
    *,
    owner_id: int,
    name: str,
    interpreter: Interpreter,
    body: bytes,
    now: datetime,
) -> tuple[Script, bool]:
    """A script, or a new version of it: (the version, whether it is new)."""
    validate_script_name(name, "name")
    if len(body) > settings.max_script_bytes:
        raise TooLarge(f"script over {settings.max_script_bytes} bytes", "body")
    if not body:
        raise InvalidInput("the script is empty", "body")
    return repo.add_script(
        owner_id=owner_id, name=name, interpreter=interpreter, body=body, now=now
    )


def task_runs(repo: Repository, task_id: int, *, owner_id: int) -> list[Run]:
    """Every attempt of one of this owner's tasks (TaskNotFound for another's)."""
    repo.get_task(task_id, owner_id=owner_id)
    return repo.list_runs(task_id)


def upcoming_fires(schedule: Schedule, count: int) -> list[datetime]:
    """The next ``count`` fire times of a schedule (none while paused or ended)."""
    if schedule.next_fire_at is None:
        return []
    start = schedule.next_fire_at
    fires = [start, *schedule.cron_schedule.upcoming(start, count - 1)]
    return [f for f in fires if schedule.end_at is None or f <= schedule.end_at]


def run_of(runs: Sequence[Run], task_id: int, attempt: int) -> Run:
    for run in runs:
        if run.attempt == attempt:
            return run
    raise RunNotFound(f"task {task_id} has no run of attempt {attempt}", "attempt")


def new_batch(items: Sequence[Any], *, owner_id: int, settings: Settings) -> list[NewTask]:
    """Validate every item of an all-or-nothing batch; an error names its
    item (``tasks[3].execute_at``)."""
    if not items:
        raise InvalidInput("at least one task", "tasks")
    if len(items) > settings.max_batch_tasks:
        raise TooLarge(f"at most {settings.max_batch_tasks} tasks in one batch", "tasks")
    try:
        # One call for the whole list: 2 µs a task less than one by one.
        bodies = _TASK_LIST.validate_python(items)
    except ValidationError:
        # One by one, so that the error is the first item's that fails,
        # whether its fault is found by TaskIn or by new_task's limits.
        bodies = None
    news = []
    for index, item in enumerate(items):
        try:
            if bodies is not None:
                body = bodies[index]
            elif isinstance(item, Mapping):
                body = TaskIn.parse(dict(item))
            else:
                raise InvalidInput("must be an object with the fields of POST /v1/tasks")
            news.append(new_task(body, owner_id=owner_id, settings=settings))
        except ChronorayError as exc:
            raise in_batch(exc, index) from None
    return news


_TASK_LIST = TypeAdapter(list[TaskIn])


def store_batch(repo: Repository, news: Sequence[NewTask], *, now: datetime) -> list[SubmitResult]:
    """One transaction: every task, or none (the first failure is raised,
    naming its item). ``news`` come from ``new_batch`` in this call: their
    request ids are new, so none is looked up. That lookup was 1,000 index
    probes per batch, and in later rounds of ``bench.million`` a slow plan
    of it held PostgreSQL's every active sample."""
    try:
        results = repo.add_tasks(news, now=now, atomic=True, fresh=True)
    except BatchRejected as rejected:
        index, error = rejected.failures[0]
        raise in_batch(error, index) from None
    stored = []
    for index, result in enumerate(results):  # atomic: an error was raised above
        if isinstance(result, ChronorayError):
            raise in_batch(result, index)
        stored.append(result)
    return stored


def new_task(body: TaskIn, *, owner_id: int, settings: Settings) -> NewTask:
    if body.priority > settings.max_priority:
        raise InvalidInput(f"must be at most {settings.max_priority}", "priority")
    if body.max_attempts > settings.max_attempts_limit:
        raise InvalidInput(f"must be at most {settings.max_attempts_limit}", "max_attempts")
    timeout_s = float(body.timeout_s) if body.timeout_s is not None else settings.default_timeout_s
    if timeout_s > settings.max_timeout_s:
        raise InvalidInput(f"must be at most {settings.max_timeout_s}", "timeout_s")
    # every value checked here or by TaskIn (parse_instant's are aware)
    return trusted(
        NewTask,
        {
            "owner_id": owner_id,
            "script_name": body.script,
            "execute_at": parse_instant(body.execute_at),
            "variables": body.variables,
            "priority": body.priority,
            "max_attempts": body.max_attempts,
            "timeout_s": timeout_s,
            "idempotency_key": body.idempotency_key,
            # only a key can be replayed: without one there is nothing to compare
            "request_hash": body.request_hash() if body.idempotency_key is not None else None,
            "request_id": new_request_id(),
        },
    )


SCHEDULE_DEFAULTS = {
    "variables": {},
    "priority": 0,
    "max_attempts": 3,
    "misfire_policy": MisfirePolicy.FIRE_ONCE,
    "overlap_policy": OverlapPolicy.SKIP,
    "jitter_s": 0.0,
    "paused": False,
}


def schedule_changes(body: ScheduleFields, *, settings: Settings, now: datetime) -> dict[str, Any]:
    """Validated, explicitly set fields of a create or change request."""
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    if "priority" in changes and changes["priority"] > settings.max_priority:
        raise InvalidInput(f"must be at most {settings.max_priority}", "priority")
    if "max_attempts" in changes and changes["max_attempts"] > settings.max_attempts_limit:
        raise InvalidInput(f"must be at most {settings.max_attempts_limit}", "max_attempts")
    if "timeout_s" in changes and changes["timeout_s"] > settings.max_timeout_s:
        raise InvalidInput(f"must be at most {settings.max_timeout_s}", "timeout_s")
    for bound in ("start_at", "end_at"):
        if bound in changes:
            changes[bound] = parse_instant(changes[bound], bound)
    if (
        changes.get("start_at")
        and changes.get("end_at")
        and changes["end_at"] <= changes["start_at"]
    ):
        raise InvalidInput("must be after start_at", "end_at")
    return changes


def new_schedule(
    body: ScheduleIn, *, owner_id: int, settings: Settings, now: datetime
) -> NewSchedule:
    fields: dict[str, Any] = {**SCHEDULE_DEFAULTS, "timeout_s": settings.default_timeout_s}
    fields.update(schedule_changes(body, settings=settings, now=now))
    for identity in ("script", "cron", "timezone"):
        fields.pop(identity, None)
    validate_schedule(
        body.cron, body.timezone, now=now, min_interval_s=settings.min_schedule_interval_s
    )
    new = NewSchedule(
        owner_id=owner_id, script_name=body.script, cron=body.cron, timezone=body.timezone, **fields
    )
    if first_fire(new, now=now) is None:
        raise InvalidInput("the schedule never fires between start_at and end_at", "end_at")
    return new


def task_page(repo: Repository, query: TaskQuery) -> tuple[list[Task], str | None]:
    """One page for ``query`` and the cursor of the next (``None`` at the
    end): one row more than the page says whether there is a next."""
    rows = repo.list_tasks(replace(query, limit=query.limit + 1))
    page = rows[: query.limit]
    more = len(rows) > query.limit
    return page, encode_cursor(page[-1].task_id) if more else None
