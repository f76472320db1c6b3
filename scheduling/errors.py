"""Domain errors. One root; each leaf also inherits the matching built-in.
They live on the ground floor: the pure scheduling code and storage raise
them; ``chronoray.errors`` re-exports them for users.

Errors cross Ray process boundaries, so every constructor takes exactly what
ends up in ``args`` and instances survive pickling unchanged. The HTTP layer
maps them to status codes in one table (serve_app/errors.py).
"""

from __future__ import annotations


class ChronorayError(Exception):
    """Root of every error chronoray raises on purpose."""

    code = "chronoray_error"

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail, field)
        self.detail = detail
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.detail}" if self.field else self.detail


class InvalidInput(ChronorayError, ValueError):
    code = "invalid_input"


class UnknownField(InvalidInput):
    code = "unknown_field"


class MalformedJson(InvalidInput):
    code = "malformed_json"


class NotFound(ChronorayError, LookupError):
    code = "not_found"


class TaskNotFound(NotFound):
    code = "task_not_found"


class ScriptNotFound(NotFound):
    code = "script_not_found"


class ScheduleNotFound(NotFound):
    code = "schedule_not_found"


class RunNotFound(NotFound):
    code = "run_not_found"


class UserNotFound(NotFound):
    code = "user_not_found"


class TokenNotFound(NotFound):
    code = "token_not_found"


class Unauthorized(ChronorayError, PermissionError):
    """No token, or one that is unknown or revoked."""

    code = "unauthorized"


class Forbidden(ChronorayError, PermissionError):
    """A valid token for the wrong kind of caller (a user's token on an
    admin route). Never used for another tenant's objects: those are 404."""

    code = "forbidden"


class UnsupportedMediaType(ChronorayError, ValueError):
    code = "unsupported_media_type"


class RateLimited(ChronorayError):
    """Too many requests, or too much active work, for one user."""

    code = "rate_limited"

    def __init__(self, detail: str, field: str | None = None, retry_after_s: float = 1.0) -> None:
        super().__init__(detail, field)
        self.args = (detail, field, retry_after_s)
        self.retry_after_s = retry_after_s


class Conflict(ChronorayError):
    code = "conflict"


class TaskNotCancellable(Conflict):
    code = "task_not_cancellable"


class ScriptInUse(Conflict):
    code = "script_in_use"


class TaskNotRetryable(Conflict):
    """Only a dead task can be retried by hand."""

    code = "task_not_retryable"


class IdempotencyConflict(Conflict):
    code = "idempotency_conflict"


class TooLarge(ChronorayError, ValueError):
    code = "too_large"


class Unavailable(ChronorayError, RuntimeError):
    """A dependency (database, actors) cannot serve right now; retry later."""

    code = "unavailable"


class BatchRejected(Exception):
    """An all-or-nothing batch stored nothing because these items failed
    (index, error); the caller reports the first."""

    def __init__(self, failures: list[tuple[int, ChronorayError]]) -> None:
        super().__init__(failures)
        self.failures = failures


def in_batch(error: ChronorayError, index: int, name: str = "tasks") -> ChronorayError:
    """The same error, its field naming the item of a batch: tasks[3].script."""
    where = f"{name}[{index}]"
    field = f"{where}.{error.field}" if error.field else where
    return type(error)(f"item {index}: {error.detail}", field)
