"""`chronoray schedules …`."""

from __future__ import annotations

import typer

from chronoray.cli.base import (
    JSON_OPTION,
    api,
    show,
    table,
    variables_of,
)

schedules_app = typer.Typer(help="CRON schedules.", no_args_is_help=True)


@schedules_app.command("create")
def schedules_create(
    script: str,
    cron: str,
    timezone_name: str = typer.Option("UTC", "--timezone", help="IANA zone, e.g. Europe/Berlin"),
    var: list[str] = typer.Option([], "--var", help="NAME=value, repeatable"),
    misfire: str = typer.Option("fire_once", help="skip, fire_once or fire_all"),
    overlap: str = typer.Option("skip", help="allow, skip, buffer_one or cancel_previous"),
    priority: int = typer.Option(0),
    as_json: bool = JSON_OPTION,
) -> None:
    """Run a script on a CRON expression in a time zone."""
    body = api().call(
        "POST",
        "/v1/schedules",
        json={
            "script": script,
            "cron": cron,
            "timezone": timezone_name,
            "variables": variables_of(var),
            "misfire_policy": misfire,
            "overlap_policy": overlap,
            "priority": priority,
        },
    )
    show(body, as_json, f"schedule {body['schedule_id']}: next fire {body['next_fire_local']}")


@schedules_app.command("list")
def schedules_list(as_json: bool = JSON_OPTION) -> None:
    body = api().call("GET", "/v1/schedules")
    columns = {
        "id": "schedule_id",
        "script": "script",
        "cron": "cron",
        "zone": "timezone",
        "next fire": "next_fire_local",
        "paused": "paused",
        "missed": "missed_fires",
        "skipped": "skipped_fires",
    }
    show(body, as_json, table(body["schedules"], columns))


@schedules_app.command("show")
def schedules_show(schedule_id: int, as_json: bool = JSON_OPTION) -> None:
    """One schedule: expression, zone, policies, next fire, counts."""
    body = api().call("GET", f"/v1/schedules/{schedule_id}")
    show(
        body,
        as_json,
        f"schedule {body['schedule_id']}  {body['script']}  '{body['cron']}' {body['timezone']}  "
        f"misfire {body['misfire_policy']}  overlap {body['overlap_policy']}  paused {body['paused']}\n"
        f"next fire {body['next_fire_local']}  missed {body['missed_fires']}  skipped {body['skipped_fires']}",
    )


@schedules_app.command("update")
def schedules_update(
    schedule_id: int,
    cron: str | None = typer.Option(None, help="a new expression"),
    timezone_name: str | None = typer.Option(None, "--timezone"),
    misfire: str | None = typer.Option(None),
    overlap: str | None = typer.Option(None),
    priority: int | None = typer.Option(None),
    as_json: bool = JSON_OPTION,
) -> None:
    """Change a schedule; its pending occurrence follows the new definition."""
    changes = {
        "cron": cron,
        "timezone": timezone_name,
        "misfire_policy": misfire,
        "overlap_policy": overlap,
        "priority": priority,
    }
    body = api().call(
        "PATCH",
        f"/v1/schedules/{schedule_id}",
        json={k: v for k, v in changes.items() if v is not None},
    )
    show(body, as_json, f"schedule {schedule_id}: next fire {body['next_fire_local']}")


@schedules_app.command("preview")
def schedules_preview(
    schedule_id: int,
    count: int = typer.Option(10),
    as_json: bool = JSON_OPTION,
) -> None:
    """The next fire times, in UTC and in the schedule's zone."""
    body = api().call("GET", f"/v1/schedules/{schedule_id}/preview", params={"count": count})
    show(body, as_json, "\n".join(f"{f['utc']}  {f['local']}" for f in body["fires"]))


@schedules_app.command("pause")
def schedules_pause(schedule_id: int, as_json: bool = JSON_OPTION) -> None:
    body = api().call("PATCH", f"/v1/schedules/{schedule_id}", json={"paused": True})
    show(body, as_json, f"schedule {schedule_id} paused")


@schedules_app.command("resume")
def schedules_resume(schedule_id: int, as_json: bool = JSON_OPTION) -> None:
    body = api().call("PATCH", f"/v1/schedules/{schedule_id}", json={"paused": False})
    show(body, as_json, f"schedule {schedule_id} resumed: next fire {body['next_fire_local']}")


@schedules_app.command("trigger")
def schedules_trigger(schedule_id: int, as_json: bool = JSON_OPTION) -> None:
    body = api().call("POST", f"/v1/schedules/{schedule_id}/trigger")
    show(body, as_json, f"schedule {schedule_id}: task {body['task_id']} runs now")


@schedules_app.command("delete")
def schedules_delete(schedule_id: int, as_json: bool = JSON_OPTION) -> None:
    body = api().call("DELETE", f"/v1/schedules/{schedule_id}")
    show(body, as_json, f"schedule {schedule_id} deleted")


@schedules_app.command("runs")
def schedules_runs(schedule_id: int, as_json: bool = JSON_OPTION) -> None:
    """Occurrences with nominal time, start, lag and status."""
    body = api().call("GET", f"/v1/schedules/{schedule_id}/runs")
    columns = {
        "nominal": "nominal_at",
        "status": "status",
        "attempt": "attempt",
        "started": lambda o: (o["runs"][-1] if o["runs"] else {}).get("started_at"),
        "lag ms": lambda o: (o["runs"][-1] if o["runs"] else {}).get("lag_ms"),
    }
    show(body, as_json, table(body["occurrences"], columns))


@schedules_app.command("backfill")
def schedules_backfill(
    schedule_id: int,
    start: str = typer.Option(..., "--from", help="ISO 8601 with offset, e.g. 2026-12-01T10:00Z"),
    end: str = typer.Option(..., "--to", help="not after now"),
    overlap: str = typer.Option("allow", help="allow, skip, buffer_one or cancel_previous"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Run the times of a past window [from, to) that have no occurrence yet, once each."""
    body = api().call(
        "POST",
        f"/v1/schedules/{schedule_id}/backfill",
        json={"from": start, "to": end, "overlap_policy": overlap},
    )
    show(
        body,
        as_json,
        f"schedule {schedule_id}: {len(body['fires'])} times in the window, "
        f"{len(body['created'])} backfilled, {body['existing']} had an occurrence already",
    )


@schedules_app.command("audit")
def schedules_audit(
    schedule_id: int,
    start: str | None = typer.Option(None, "--from", help="default: 24 h before --to"),
    end: str | None = typer.Option(None, "--to", help="default: now"),
    late_after_s: float = typer.Option(60.0, help="a first start later than this is late"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Expected fires against what ran: missed, late, duplicated."""
    params: dict[str, str | float] = {"late_after_s": late_after_s}
    if start:
        params["from"] = start
    if end:
        params["to"] = end
    body = api().call("GET", f"/v1/schedules/{schedule_id}/audit", params=params)
    summary = (
        f"schedule {schedule_id} {body['from']} → {body['to']}: expected {body['expected']}, "
        f"ran {body['ran']}, missed {body['missed']}, late {body['late']}, "
        f"duplicated {body['duplicated']}"
    )
    findings = table(
        body["findings"],
        {"time": "nominal_at", "finding": "kind", "task": "task_id", "detail": "detail"},
    )
    show(body, as_json, *([findings] if body["findings"] else []), summary)
