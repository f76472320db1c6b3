"""What callers send: request models and the parsing every caller shares
(HTTP routes, chronoray.Client, the console). Unknown fields are refused;
a validation failure is a domain error naming its field."""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
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
    ValidationError,
    ValidationInfo,
    field_validator,
)
from typing_extensions import Self

from scheduling.errors import ChronorayError, InvalidInput, MalformedJson, UnknownField
from scheduling.models import Interpreter, TaskStatus
from scheduling.schedules import MisfirePolicy, OverlapPolicy
from scheduling.validation import validate_script_name, validate_variables
from storage.repository import TaskQuery

MAX_EPOCH_S = 253402300799  # 9999-12-31T23:59:59Z


def parse_instant(value: Any, field: str = "execute_at") -> datetime:
    """ISO 8601 with an offset, or epoch seconds; naive times are refused
    because the server's zone is no business of the caller's."""
    if isinstance(value, bool):
        raise InvalidInput("must be an ISO 8601 time with offset or epoch seconds", field)
    if isinstance(value, datetime):  # from Python callers (chronoray.Client)
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidInput("time has no UTC offset (add a tzinfo)", field)
        return value.astimezone(timezone.utc)
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


def media_type(content_type: str) -> str:
    """``text/plain; charset=utf-8`` → ``text/plain``."""
    return content_type.split(";", 1)[0].strip().lower()


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


# What a client may never set; named in the error so it is not taken for a typo.
SERVER_FIELDS = frozenset(
    {
        "owner",
        "owner_id",
        "user_id",
        "status",
        "attempt",
        "task_id",
        "script_id",
        "schedule_id",
        "run_id",
        "epoch",
        "created_at",
        "updated_at",
        "lease_expires_at",
        "lost_count",
        "bucket",
    }
)


def error_from_validation(errors: Sequence[Mapping[str, Any]]) -> ChronorayError:
    """The first pydantic error as a domain error naming its field."""
    first: Mapping[str, Any] = (
        errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
    )
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(location) or "body"
    kind = first.get("type")
    if kind == "json_invalid":
        return MalformedJson("request body is not valid JSON", "body")
    if kind == "extra_forbidden":
        if location and location[-1] in SERVER_FIELDS:
            return UnknownField(f"{field!r} is set by the server, not the client", field)
        return UnknownField(f"unknown field {field!r}", field)
    ctx_error = (first.get("ctx") or {}).get("error")
    if isinstance(ctx_error, ChronorayError):  # raised by our own validators
        return type(ctx_error)(ctx_error.detail, ctx_error.field or field)
    return InvalidInput(str(first.get("msg", "invalid value")), field)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def parse(cls, fields: Mapping[str, Any]) -> Self:
        """For callers without FastAPI (chronoray.Client): the same rules,
        the same domain errors."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise error_from_validation(list(exc.errors())) from None


class UserIn(Strict):
    first_name: StrictStr = Field(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")
    last_name: StrictStr = Field(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")


class TokenIn(Strict):
    label: StrictStr = Field(default="", max_length=100, pattern=r"^[^\x00-\x1f\x7f]*$")


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
    def _execute_at(cls, value: Any) -> Any:
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


class TaskBatchIn(Strict):
    """``POST /v1/tasks:batch``: items are checked one by one (their errors
    name the item), so they arrive here as plain objects."""

    tasks: list[Any]


class RetryIn(Strict):
    """A redrive of a dead task: how many more attempts it gets."""

    attempts: StrictInt = Field(1, ge=1)


class BackfillIn(Strict):
    """A past window of a schedule to run: every nominal time in [from, to)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    start: Any = Field(alias="from", description="ISO 8601 with offset, or epoch s")
    end: Any = Field(alias="to", description="not after now")
    overlap_policy: OverlapPolicy = Field(
        OverlapPolicy.ALLOW, description="how the backfilled runs overlap each other and live ones"
    )

    @field_validator("start", "end", mode="before")
    @classmethod
    def _instant(cls, value: Any, info: ValidationInfo) -> Any:
        parse_instant(value, {"start": "from", "end": "to"}.get(info.field_name or "", "time"))
        return value


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
    def _variables(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return None if value is None else validate_variables(value)

    @field_validator("start_at", "end_at", mode="before")
    @classmethod
    def _bounds(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            parse_instant(value, info.field_name or "time")
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
