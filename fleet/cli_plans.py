"""``tillsyn plans|checks|escalations|night``: care plans and tonight's work, over the API.

Every call acts as the staff member whose API token is given (``--token`` or
``TILLSYN_TOKEN``; ``tillsyn staff token ...``); the fleet records that person as the actor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .cli import _call, _show, json_opt

F = TypeVar("F", bound=Callable[..., Any])

reason_opt = click.option("--reason", required=True, help="Why (kept in the audit log).")
PLAN_COLUMNS = ["id", "resident_id", "device_id", "status", "check_times", "window_s", "team"]


@click.group()
def plans() -> None:
    """Care plans (genomförandeplaner)."""


@plans.command("list")
@click.option("--status", type=click.Choice(["draft", "active", "ended"]), default=None)
@json_opt
def plans_list(status: str | None, as_json: bool) -> None:
    rows = _call("GET", "/api/plans", params={"status": status} if status else {})
    for r in rows:
        r["check_times"] = ",".join(r["check_times"])
    _show(rows, as_json, PLAN_COLUMNS)


@plans.command("show")
@click.argument("plan_id", type=int)
def plans_show(plan_id: int) -> None:
    click.echo(json.dumps(_call("GET", f"/api/plans/{plan_id}"), indent=2))


def _plan_body(**options: Any) -> dict[str, Any]:
    body = {k: v for k, v in options.items() if v is not None and v != ()}
    if "check_times" in body:
        body["check_times"] = [t for part in body["check_times"] for t in part.split(",") if t]
    if "escalation" in body:
        body["escalation"] = body["escalation"].split(",")
    if "window_min" in body:
        body["window_s"] = int(body.pop("window_min") * 60)
    if "recheck_min" in body:
        body["recheck_delay_s"] = int(body.pop("recheck_min") * 60)
    return body


def _plan_options(required: bool) -> Callable[[F], F]:
    def wrap(fn: F) -> F:
        for opt in reversed(
            [
                click.option("--device", "device_id"),
                click.option("--team"),
                click.option(
                    "--at",
                    "check_times",
                    multiple=True,
                    required=required,
                    help="Check time HH:MM (repeat, or comma-separated).",
                ),
                click.option("--window-min", type=float, required=required),
                click.option("--nights", help="Evenings a night begins, 0 = Monday."),
                click.option("--look-s", type=int),
                click.option("--recheck-min", type=float),
                click.option("--escalation", help="Steps, e.g. call,visit (ends with visit)."),
                click.option("--valid-from"),
                click.option("--valid-until"),
                click.option("--consent-ref"),
                click.option("--consent-date"),
                click.option("--tz"),
            ]
        ):
            fn = opt(fn)
        return fn

    return wrap


@plans.command("create")
@click.argument("resident_id")
@_plan_options(required=True)
@click.option("--activate", is_flag=True, help="Active at once (needs consent).")
@reason_opt
@json_opt
def plans_create(resident_id: str, activate: bool, reason: str, as_json: bool, **opts: Any) -> None:
    """Create a plan for RESIDENT_ID (a pseudonym)."""
    body = _plan_body(**opts) | {"resident_id": resident_id, "activate": activate, "reason": reason}
    row = _call("POST", "/api/plans", json=body)
    row["check_times"] = ",".join(row["check_times"])
    _show(row, as_json, PLAN_COLUMNS)


@plans.command("update")
@click.argument("plan_id", type=int)
@_plan_options(required=False)
@reason_opt
@json_opt
def plans_update(plan_id: int, reason: str, as_json: bool, **opts: Any) -> None:
    """Change a plan (only the options given)."""
    row = _call("PATCH", f"/api/plans/{plan_id}", json=_plan_body(**opts) | {"reason": reason})
    row["check_times"] = ",".join(row["check_times"])
    _show(row, as_json, PLAN_COLUMNS)


@plans.command("activate")
@click.argument("plan_id", type=int)
@reason_opt
def plans_activate(plan_id: int, reason: str) -> None:
    _call("POST", f"/api/plans/{plan_id}/activate", json={"reason": reason})
    click.echo(f"plan {plan_id} active")


@plans.command("end")
@click.argument("plan_id", type=int)
@reason_opt
def plans_end(plan_id: int, reason: str) -> None:
    """End the service now (a window open now closes at once)."""
    _call("POST", f"/api/plans/{plan_id}/end", json={"reason": reason})
    click.echo(f"plan {plan_id} ended")


@plans.command("pause")
@click.argument("plan_id", type=int)
@click.option("--kind", type=click.Choice(["hospital", "travel", "other"]), default="other")
@click.option("--start", default=None, help="ISO date-time (plan's zone); default now.")
@click.option("--end", default=None, help="ISO date-time; default: until resumed.")
@reason_opt
def plans_pause(plan_id: int, kind: str, start: str | None, end: str | None, reason: str) -> None:
    body = {"kind": kind, "start": start, "end": end, "reason": reason}
    row = _call("POST", f"/api/plans/{plan_id}/pauses", json=body)
    click.echo(f"plan {plan_id}: pause {row['id']} recorded")


@plans.command("resume")
@click.argument("plan_id", type=int)
@click.argument("pause_id", type=int)
@reason_opt
def plans_resume(plan_id: int, pause_id: int, reason: str) -> None:
    _call("POST", f"/api/plans/{plan_id}/pauses/{pause_id}/end", json={"reason": reason})
    click.echo(f"plan {plan_id}: pause {pause_id} ended")


@plans.command("opt-out")
@click.argument("plan_id", type=int)
@click.argument("night")
@reason_opt
@click.option("--withdraw", is_flag=True, help="Take the opt-out back.")
def plans_opt_out(plan_id: int, night: str, reason: str, withdraw: bool) -> None:
    """The resident opts out of NIGHT (the date the evening begins)."""
    if withdraw:
        _call("DELETE", f"/api/plans/{plan_id}/opt-outs/{night}", params={"reason": reason})
        click.echo(f"plan {plan_id}: opt-out of {night} withdrawn")
    else:
        _call("POST", f"/api/plans/{plan_id}/opt-outs", json={"night": night, "reason": reason})
        click.echo(f"plan {plan_id}: opted out of the night of {night}")


CHECK_COLUMNS = ["id", "resident_id", "device_id", "agreed", "kind", "start_at", "state", "looks"]


@click.group()
def checks() -> None:
    """Tonight's checks: list, look, record the outcome."""


@checks.command("list")
@click.option("--night", default=None, help="YYYY-MM-DD (default tonight).")
@click.option("--unrecorded", is_flag=True, help="Only checks that ended with no outcome.")
@json_opt
def checks_list(night: str | None, unrecorded: bool, as_json: bool) -> None:
    params: dict[str, Any] = {"night": night} if night else {}
    if unrecorded:
        params["unrecorded"] = "true"
    _show(_call("GET", "/api/checks", params=params), as_json, CHECK_COLUMNS)


@checks.command("look")
@click.argument("check_id", type=int)
def checks_look(check_id: int) -> None:
    """Start a look (camera on for at most the plan's look length)."""
    row = _call("POST", f"/api/checks/{check_id}/look")
    click.echo(f"look {row['id']} started on {row['device_id']}")


@checks.command("outcome")
@click.argument("check_id", type=int)
@click.argument("outcome", type=click.Choice(["seen", "not-seen", "something-wrong"]))
def checks_outcome(check_id: int, outcome: str) -> None:
    """Record OUTCOME: seen (and fine), not-seen (recheck), something-wrong (visit now)."""
    row = _call(
        "POST", f"/api/checks/{check_id}/outcome", json={"outcome": outcome.replace("-", "_")}
    )
    click.echo(f"check {check_id}: {row['state']}")


@click.group()
def escalations() -> None:
    """Escalation steps (call tasks) waiting for staff."""


@escalations.command("list")
@json_opt
def escalations_list(as_json: bool) -> None:
    rows = _call("GET", "/api/escalations")
    _show(rows, as_json, ["id", "check_id", "resident_id", "step", "action", "why", "due_at"])


@escalations.command("done")
@click.argument("step_id", type=int)
@click.argument("result", type=click.Choice(["resolved", "not-resolved"]))
def escalations_done(step_id: int, result: str) -> None:
    """A call task is done: resolved (chain ends) or not-resolved (next step)."""
    body = {"result": result.replace("-", "_")}
    row = _call("POST", f"/api/escalations/{step_id}/complete", json=body)
    click.echo(f"step {step_id}: {row['status']} ({row['result']})")


@click.group()
def night() -> None:
    """A night's visits and coverage."""


@night.command("visits")
@click.argument("night_date")
@click.option("--team", default=None)
@json_opt
def night_visits(night_date: str, team: str | None, as_json: bool) -> None:
    rows = _call("GET", f"/api/nights/{night_date}/visits", params={"team": team} if team else {})
    _show(rows, as_json, ["id", "cause", "resident_id", "team", "due_at", "status"])


@night.command("coverage")
@click.option("--night", "night_date", default=None, help="YYYY-MM-DD (default: last night).")
def night_coverage(night_date: str | None) -> None:
    """Every active plan paired and healthy, every check with an outcome or a visit?"""
    data = _call("GET", "/api/coverage", params={"night": night_date} if night_date else {})
    click.echo(f"night {data['night']}: {data['plans']} plans, {data['checks']} checks")
    for p in data["problems"]:
        click.echo(f"  PROBLEM plan {p['plan_id']} ({p['resident_id']}): {p['kind']}: {p['why']}")
    if data["problems"]:
        raise click.exceptions.Exit(1)
    click.echo("  ok")


GROUPS = (plans, checks, escalations, night)
