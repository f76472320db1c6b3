"""Response bodies: many tasks rendered at once read as each rendered alone."""

import json
from datetime import datetime, timedelta, timezone

from fastapi.responses import JSONResponse

from scheduling.models import Task, TaskStatus
from serve_app.render import JsonAnswer, task_out, tasks_out

NOW = datetime(2026, 12, 6, 1, 2, 3, 456789, tzinfo=timezone.utc)
PARIS = timezone(timedelta(hours=1))


def task(task_id: int, execute_at: datetime, created_at: datetime = NOW) -> Task:
    return Task(
        task_id=task_id,
        owner_id=1,
        script_id=1,
        script_name="job.sh",
        execute_at=execute_at,
        status=TaskStatus.SCHEDULED,
        priority=0,
        attempt=1,
        max_attempts=3,
        variables={"A": "1"},
        timeout_s=300.0,
        idempotency_key=None,
        created_at=created_at,
        updated_at=created_at,
    )


def test_tasks_rendered_together_read_as_each_alone():
    tasks = [
        task(1, NOW + timedelta(seconds=1)),
        task(2, NOW + timedelta(seconds=1)),  # the same instant again
        task(3, NOW.astimezone(PARIS)),  # equal to NOW, written in another zone
        task(4, NOW, created_at=NOW.astimezone(PARIS)),
    ]
    together = tasks_out(tasks)
    assert together == [task_out(t) for t in tasks]
    assert together[2]["execute_at"] == "2026-12-06T02:02:03.456789+01:00"
    assert together[3]["created_at"] == "2026-12-06T02:02:03.456789+01:00"
    assert together[0]["created_at"] == "2026-12-06T01:02:03.456789+00:00"


def test_answers_read_as_what_starlette_would_write():
    body = {
        "tasks": tasks_out([task(1, NOW), task(2, NOW.astimezone(PARIS))]),
        "text": 'é \u2028 \x01 " \\ 🙂',
        "numbers": [0, -1, 2**62, 0.1, 300.0, 1e16, 1e22],
        "nothing": None,
        "flags": [True, False],
    }
    assert JsonAnswer(body).body == JSONResponse(body).body
    tiny = {"timeout_s": [1.5e-7, 1e-5, 5e-324]}  # written 1.5e-7 and 0.00001, not 1.5e-07, 1e-05
    assert json.loads(JsonAnswer(tiny).body) == json.loads(JSONResponse(tiny).body) == tiny
