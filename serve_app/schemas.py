"""Request and response bodies. Unknown fields are refused."""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)
from typing_extensions import Self

from scheduling.errors import InvalidInput
from scheduling.models import ApiToken, Interpreter, Run, Script, Task, TaskStatus, User
from scheduling.schedules import MisfirePolicy, OverlapPolicy, Schedule
from scheduling.validation import validate_script_name, validate_variables
from storage.repository import TaskQuery

MAX_EPOCH_S = 253402300799  # 9999-12-31T23:59:59Z


def parse_instant(value: Any, field: str = "execute_at") -> datetime:
    """ISO 8601 with an offset, or epoch seconds; naive times are refused
    because the server's zone is no business of the caller's."""
    if isinstance(value, bool):
        raise InvalidInput("must be an ISO 8601 time with offset or epoch seconds", field)
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or not 0 <= value <= MAX_EPOCH_S:
            raise InvalidInput("epoch seconds out of range", field)
        return datetime.fromtimestamp(value, tz=timezone.utc)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise InvalidInput(f"not an ISO 8601 time: {value[:64]!r}", field) from None
        if parsed.tzinfo is None or parsed.utcoffset() is None:
            raise InvalidInput("time has no UTC offset (add Z or +HH:MM)", field)
        return parsed.astimezone(timezone.utc)
    raise InvalidInput("must be an ISO 8601 time with offset or epoch seconds", field)


def encode_cursor(task_id: int) -> str:
    return base64.urlsafe_b64encode(f"below:{task_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, value = text.partition(":")
        if kind != "below" or not value.isdigit():
            raise ValueError(text)
        return int(value)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("not a cursor this API gave out", "cursor") from None


def query_instant(value: str | None, field: str) -> datetime | None:
    """Query strings carry text: epoch seconds arrive as digits."""
    if value is None:
        return None
    try:
        return parse_instant(float(value), field)
    except ValueError:
        return parse_instant(value, field)


def task_query(
    *,
    owner_id: int,
    status: Sequence[str] = (),
    script: str | None = None,
    schedule_id: int | None = None,
    due_from: str | None = None,
    due_before: str | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> TaskQuery:
    """A list request's filters, validated: the same for HTTP and Client."""
    statuses = set()
    for value in status:
        try:
            statuses.add(TaskStatus(value))
        except ValueError:
            known = ", ".join(s.value for s in TaskStatus)
            raise InvalidInput(
                f"unknown status {value[:32]!r} (one of {known})", "status"
            ) from None
    return TaskQuery(
        owner_id=owner_id,
        statuses=frozenset(statuses),
        script_name=script,
        schedule_id=schedule_id,
        due_from=query_instant(due_from, "due_from"),
        due_before=query_instant(due_before, "due_before"),
        below_id=decode_cursor(cursor) if cursor else None,
        limit=limit,
    )


def task_page(repo, query: TaskQuery) -> tuple[list[Task], str | None]:
    """One page for ``query`` and the cursor of the next (``None`` at the
    end): one row more than the page says whether there is a next."""
    rows = repo.list_tasks(replace(query, limit=query.limit + 1))
    page = rows[: query.limit]
    more = len(rows) > query.limit
    return page, encode_cursor(page[-1].task_id) if more else None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def parse(cls, fields: dict) -> Self:
        """For callers without FastAPI (chronoray.Client): the same rules,
        the same domain errors."""
        from pydantic import ValidationError

        from serve_app.errors import error_from_validation

        try:
            return cls(**fields)
        except ValidationError as exc:
            raise error_from_validation(exc.errors()) from None


class UserIn(Strict):
    first_name: StrictStr = Field(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")
    last_name: StrictStr = Field(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")


class TokenIn(Strict):
    label: StrictStr = Field(default="", max_length=100, pattern=r"^[^\x00-\x1f\x7f]*$")


def user_out(user: User) -> dict:
    return {
        "user_id": user.user_id,
        "first_name": user.first_name,
        "last_name": user.last_name,
        "created_at": _iso(user.created_at),
    }


def token_out(token: ApiToken) -> dict:
    return {
        "token_id": token.token_id,
        "user_id": token.user_id,
        "label": token.label,
        "created_at": _iso(token.created_at),
        "revoked_at": _iso(token.revoked_at),
    }


class ScriptIn(Strict):
    name: StrictStr
    interpreter: Interpreter = Interpreter.BASH
    body: StrictStr

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_script_name(value, "name")


class TaskIn(Strict):
    script: StrictStr
    execute_at: Any  # ISO 8601 text or epoch seconds; checked by parse_instant
    variables: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    priority: StrictInt = Field(default=0, ge=0)
    max_attempts: StrictInt = Field(default=3, ge=1)
    timeout_s: StrictFloat | None = Field(default=None, gt=0, allow_inf_nan=False)
    idempotency_key: StrictStr | None = Field(default=None, min_length=1, max_length=200)

    @field_validator("script")
    @classmethod
    def _script(cls, value: str) -> str:
        return validate_script_name(value, "script")

    @field_validator("execute_at", mode="before")
    @classmethod
    def _execute_at(cls, value):
        if value is not None:  # None: checked where it is used (sendTask takes cron instead)
            parse_instant(value)  # raised InvalidInput becomes a 422 naming the field
        return value

    @field_validator("variables")
    @classmethod
    def _variables(cls, value: dict[str, str]) -> dict[str, str]:
        return validate_variables(value)

    def request_hash(self) -> str:
        """Tells a replay (same body) from a reuse of the key (other body)."""
        fields = self.model_dump(mode="json", exclude={"idempotency_key"})
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def script_out(script: Script) -> dict:
    return {
        "script_id": script.script_id,
        "name": script.name,
        "version": script.version,
        "sha256": script.sha256,
        "interpreter": script.interpreter.value,
        "size_bytes": script.size_bytes,
        "created_at": _iso(script.created_at),
    }


def run_out(run: Run) -> dict:
    return {
        "attempt": run.attempt,
        "priority": run.priority,
        "status": "succeeded" if run.failure is None else "failed",
        "failure": run.failure.value if run.failure else None,
        "exit_code": run.exit_code,
        "executor_id": run.executor_id,
        "tier": run.tier,
        "node_id": run.node_id,
        "due_at": _iso(run.due_at),
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "fire_lag_ms": None if run.fire_lag_ms is None else round(run.fire_lag_ms, 3),
        "output": run.output_tail,
    }


def task_out(task: Task, runs: list[Run] | None = None) -> dict:
    body = {
        "task_id": task.task_id,
        "status": task.status.value,
        "script": task.script_name,
        "execute_at": _iso(task.execute_at),
        "priority": task.priority,
        "attempt": task.attempt,
        "max_attempts": task.max_attempts,
        "timeout_s": task.timeout_s,
        "variables": dict(task.variables),
        "idempotency_key": task.idempotency_key,
        "created_at": _iso(task.created_at),
        "updated_at": _iso(task.updated_at),
    }
    if runs is not None:
        body["runs"] = [run_out(r) for r in runs]
        last = runs[-1] if runs else None
        body["output"] = last.output_tail if last else None
        body["fire_lag_ms"] = run_out(last)["fire_lag_ms"] if last else None
    return body


class TaskBatchIn(Strict):
    """``POST /v1/tasks:batch``: items are checked one by one (their errors
    name the item), so they arrive here as plain objects."""

    tasks: list[Any]


class RetryIn(Strict):
    """A redrive of a dead task: how many more attempts it gets."""

    attempts: StrictInt = Field(1, ge=1)


class ScheduleFields(Strict):
    """Fields a schedule shares between create and change."""

    variables: dict[StrictStr, StrictStr] | None = None
    priority: StrictInt | None = Field(default=None, ge=0)
    max_attempts: StrictInt | None = Field(default=None, ge=1)
    timeout_s: StrictFloat | None = Field(default=None, gt=0, allow_inf_nan=False)
    misfire_policy: MisfirePolicy | None = None
    overlap_policy: OverlapPolicy | None = None
    jitter_s: StrictFloat | None = Field(default=None, ge=0, le=3600, allow_inf_nan=False)
    start_at: Any = None
    end_at: Any = None
    paused: StrictBool | None = None

    @field_validator("variables")
    @classmethod
    def _variables(cls, value):
        return None if value is None else validate_variables(value)

    @field_validator("start_at", "end_at", mode="before")
    @classmethod
    def _bounds(cls, value, info):
        if value is not None:
            parse_instant(value, info.field_name)
        return value


class ScheduleIn(ScheduleFields):
    script: StrictStr
    cron: StrictStr
    timezone: StrictStr = "UTC"

    @field_validator("script")
    @classmethod
    def _script(cls, value: str) -> str:
        return validate_script_name(value, "script")


class SchedulePatch(ScheduleFields):
    cron: StrictStr | None = None
    timezone: StrictStr | None = None


class SendTaskIn(TaskIn):
    """The original API: ``execute_at`` for once, or ``cron`` (+ timezone)
    for a schedule."""

    execute_at: Any = None
    cron: StrictStr | None = None
    timezone: StrictStr | None = None


def schedule_out(schedule: Schedule) -> dict:
    zone = schedule.cron_schedule.zone
    return {
        "schedule_id": schedule.schedule_id,
        "script": schedule.script_name,
        "cron": schedule.cron,
        "timezone": schedule.timezone,
        "variables": dict(schedule.variables),
        "priority": schedule.priority,
        "max_attempts": schedule.max_attempts,
        "timeout_s": schedule.timeout_s,
        "misfire_policy": schedule.misfire_policy.value,
        "overlap_policy": schedule.overlap_policy.value,
        "jitter_s": schedule.jitter_s,
        "start_at": _iso(schedule.start_at),
        "end_at": _iso(schedule.end_at),
        "paused": schedule.paused,
        "next_fire_at": _iso(schedule.next_fire_at),
        "next_fire_local": _iso(schedule.next_fire_at.astimezone(zone))
        if schedule.next_fire_at
        else None,
        "missed_fires": schedule.missed_fires,
        "skipped_fires": schedule.skipped_fires,
        "created_at": _iso(schedule.created_at),
        "updated_at": _iso(schedule.updated_at),
    }


def history_out(entry: dict) -> dict:
    return {
        "task_id": entry["task_id"],
        "nominal_at": _iso(entry["nominal_at"]),
        "status": entry["status"].value,
        "attempt": entry["attempt"],
        "runs": [
            {
                "attempt": run.attempt,
                "status": "succeeded" if run.failure is None else "failed",
                "failure": run.failure.value if run.failure else None,
                "started_at": _iso(run.started_at),
                "finished_at": _iso(run.finished_at),
                "lag_ms": None
                if run.started_at is None
                else round((run.started_at - entry["nominal_at"]).total_seconds() * 1000, 3),
                "exit_code": run.exit_code,
            }
            for run in entry["runs"]
        ],
    }
