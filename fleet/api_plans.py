"""HTTP API for care plans, checks, looks, outcomes, escalations, nightly lists and coverage.

Who may do what:

- plans are created, changed, activated, paused, resumed and ended by ``it_admin``;
- opt-outs are recorded by ``it_admin`` or ``night_staff`` (the resident tells them);
- looks, outcomes and escalation steps are ``night_staff`` work, in their own name;
- reading: ``it_admin``, ``night_staff`` (their teams only) and ``auditor``.

Every change carries a ``reason`` and lands in the audit log with the caller as actor.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Query
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlmodel import Session, col, select

from . import checks, coverage, plans
from .auth import Role
from .errors import NotFound
from .models import Visit
from .plan_models import (
    CarePlan,
    Check,
    CheckState,
    EscalationStep,
    Outcome,
    PlanStatus,
    StepResult,
    StepStatus,
    VisitLink,
)
from .plan_rules import load_tz, night_at
from .scope import Scope, scoped
from .visits import visit_json

if TYPE_CHECKING:
    from .service import FleetService

Pseudonym = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Ref = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._/:-]{1,64}$")]
Reason = Annotated[str, StringConstraints(min_length=1, max_length=200)]
TimeOfDay = Annotated[str, StringConstraints(pattern=r"^([01]\d|2[0-3]):[0-5]\d(:[0-5]\d)?$")]
DeviceRef = Annotated[str, StringConstraints(pattern=r"^dev-[a-z0-9][a-z0-9-]{1,59}$")]

Admin = Annotated[Scope, Depends(scoped(Role.IT_ADMIN))]
Reader = Annotated[Scope, Depends(scoped(Role.IT_ADMIN, Role.NIGHT_STAFF, Role.AUDITOR))]
Staff = Annotated[Scope, Depends(scoped(Role.NIGHT_STAFF))]
OptOuter = Annotated[Scope, Depends(scoped(Role.IT_ADMIN, Role.NIGHT_STAFF))]
Overseer = Annotated[Scope, Depends(scoped(Role.IT_ADMIN, Role.AUDITOR))]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlanFields(_Body):
    device_id: DeviceRef | None = None
    team: Pseudonym | None = None
    tz: Annotated[str, StringConstraints(max_length=64)] | None = None
    check_times: list[TimeOfDay] | None = Field(default=None, min_length=1, max_length=24)
    nights: Annotated[str, StringConstraints(pattern=r"^[0-6]{1,7}$")] | None = None
    window_s: int | None = Field(default=None, ge=1, le=6 * 3600)
    look_s: int | None = Field(default=None, ge=1, le=600)
    recheck_delay_s: int | None = Field(default=None, ge=60, le=6 * 3600)
    escalation: list[str] | None = Field(default=None, min_length=1, max_length=5)
    call_timeout_s: int | None = Field(default=None, ge=60, le=6 * 3600)
    escalate_unrecorded: bool | None = None
    visit_on_opt_out: bool | None = None
    valid_from: date | None = None
    valid_until: date | None = None
    consent_ref: Ref | None = None
    consent_date: date | None = None
    has_cohabitant: bool | None = None
    cohabitant_consent_ref: Ref | None = None
    cohabitant_consent_date: date | None = None


class PlanCreate(PlanFields):
    resident_id: Pseudonym
    check_times: list[TimeOfDay] = Field(min_length=1, max_length=24)
    window_s: int = Field(ge=1, le=6 * 3600)
    activate: bool = False
    reason: Reason


class PlanUpdate(PlanFields):
    reason: Reason


class ReasonBody(_Body):
    reason: Reason


class PauseCreate(_Body):
    start: datetime | None = None  # default now; without a zone: the plan's time zone
    end: datetime | None = None  # None: until resumed
    kind: Annotated[str, StringConstraints(pattern=r"^(hospital|travel|other)$")] = "other"
    reason: Reason


class PauseEnd(_Body):
    at: datetime | None = None
    reason: Reason


class OptOutCreate(_Body):
    night: date  # the evening the night begins
    reason: Reason


class OutcomeBody(_Body):
    outcome: Outcome


class StepDone(_Body):
    result: Annotated[str, StringConstraints(pattern=r"^(resolved|not_resolved)$")]


def _epoch(value: datetime | None, tz: str) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=load_tz(tz))
    return value.timestamp()


def _team_ok(scope: Scope, team: str | None) -> bool:
    return scope.fleet_wide or (team is not None and team in scope.teams)


def _plan_in_scope(s: Session, scope: Scope, plan_id: int) -> CarePlan:
    plan = s.get(CarePlan, plan_id)
    if plan is None or not _team_ok(scope, plan.team):
        raise NotFound("plan", plan_id)
    return plan


def _check_in_scope(s: Session, scope: Scope, check_id: int) -> Check:
    check = s.get(Check, check_id)
    if check is None or not _team_ok(scope, check.team):
        raise NotFound("check", check_id)
    return check


def add_plan_routes(app: FastAPI, service: FleetService) -> None:
    """Mount the care-plan routes on the app (plain routes, each with its own policy)."""
    rt = service.plans

    def tonight() -> date:
        return night_at(datetime.fromtimestamp(service.clock(), UTC), load_tz(service.settings.tz))

    # --- plans -------------------------------------------------------------------------

    @app.get("/api/plans")
    async def list_plans(
        scope: Reader,
        status: PlanStatus | None = None,
        resident_id: str | None = None,
        device_id: str | None = None,
    ) -> list[dict[str, Any]]:
        def q(s: Session) -> list[dict[str, Any]]:
            stmt = select(CarePlan).order_by(col(CarePlan.id))
            if status:
                stmt = stmt.where(CarePlan.status == status)
            if resident_id:
                stmt = stmt.where(CarePlan.resident_id == resident_id)
            if device_id:
                stmt = stmt.where(CarePlan.device_id == device_id)
            rows = [p for p in s.exec(stmt) if _team_ok(scope, p.team)]
            return [plans.plan_json(s, p) for p in rows]

        return await rt.query(q)

    @app.get("/api/plans/{plan_id}")
    async def get_plan(plan_id: int, scope: Reader) -> dict[str, Any]:
        return await rt.query(lambda s: plans.plan_json(s, _plan_in_scope(s, scope, plan_id)))

    @app.post("/api/plans", status_code=201)
    async def create_plan(body: PlanCreate, scope: Admin) -> dict[str, Any]:
        values = body.model_dump(exclude_none=True, exclude={"activate", "reason"})
        values.setdefault("tz", service.settings.tz)
        values.setdefault("valid_from", tonight())
        return await rt.create_plan(values, scope.principal, body.reason, body.activate)

    @app.patch("/api/plans/{plan_id}")
    async def update_plan(plan_id: int, body: PlanUpdate, scope: Admin) -> dict[str, Any]:
        changes = body.model_dump(exclude_unset=True, exclude={"reason"})
        return await rt.update_plan(plan_id, changes, scope.principal, body.reason)

    @app.post("/api/plans/{plan_id}/activate")
    async def activate_plan(plan_id: int, body: ReasonBody, scope: Admin) -> dict[str, Any]:
        return await rt.plan_action(plan_id, "activate", scope.principal, body.reason)

    @app.post("/api/plans/{plan_id}/end")
    async def end_plan(plan_id: int, body: ReasonBody, scope: Admin) -> dict[str, Any]:
        return await rt.plan_action(plan_id, "end", scope.principal, body.reason)

    @app.post("/api/plans/{plan_id}/pauses", status_code=201)
    async def pause_plan(plan_id: int, body: PauseCreate, scope: Admin) -> dict[str, Any]:
        tz = (await rt.query(lambda s: plans.get(s, plan_id))).tz
        return await rt.pause(
            plan_id,
            _epoch(body.start, tz),
            _epoch(body.end, tz),
            body.kind,
            scope.principal,
            body.reason,
        )

    @app.post("/api/plans/{plan_id}/pauses/{pause_id}/end")
    async def resume_plan(
        plan_id: int, pause_id: int, body: PauseEnd, scope: Admin
    ) -> dict[str, Any]:
        tz = (await rt.query(lambda s: plans.get(s, plan_id))).tz
        return await rt.resume(plan_id, pause_id, _epoch(body.at, tz), scope.principal, body.reason)

    @app.post("/api/plans/{plan_id}/opt-outs", status_code=201)
    async def opt_out(plan_id: int, body: OptOutCreate, scope: OptOuter) -> dict[str, Any]:
        await rt.query(lambda s: _plan_in_scope(s, scope, plan_id))
        return await rt.opt_out(plan_id, body.night, scope.principal, body.reason)

    @app.delete("/api/plans/{plan_id}/opt-outs/{night}")
    async def withdraw_opt_out(
        plan_id: int, night: date, scope: OptOuter, reason: Reason = "withdrawn"
    ) -> dict[str, Any]:
        await rt.query(lambda s: _plan_in_scope(s, scope, plan_id))
        return await rt.opt_out(plan_id, night, scope.principal, reason, withdraw=True)

    # --- checks ------------------------------------------------------------------------

    @app.get("/api/checks")
    async def list_checks(
        scope: Reader,
        night: date | None = None,
        state: CheckState | None = None,
        plan_id: int | None = None,
        device_id: str | None = None,
        unrecorded: bool | None = None,
        limit: Annotated[int, Query(ge=1, le=2000)] = 500,
    ) -> list[dict[str, Any]]:
        """Checks in time order; ``night`` defaults to tonight (the night now belongs to)."""
        the_night = night or tonight()

        def q(s: Session) -> list[dict[str, Any]]:
            stmt = select(Check).where(Check.night == the_night)
            if state:
                stmt = stmt.where(Check.state == state)
            if plan_id is not None:
                stmt = stmt.where(Check.plan_id == plan_id)
            if device_id:
                stmt = stmt.where(Check.device_id == device_id)
            if unrecorded is not None:
                stmt = stmt.where(Check.unrecorded == unrecorded)
            if not scope.fleet_wide:
                stmt = stmt.where(col(Check.team).in_(sorted(scope.teams)))
            rows = s.exec(stmt.order_by(col(Check.start_at)).limit(limit)).all()
            return [checks.check_json(c) for c in rows]

        return await rt.query(q)

    @app.get("/api/checks/{check_id}")
    async def get_check(check_id: int, scope: Reader) -> dict[str, Any]:
        return await rt.query(lambda s: checks.check_json(_check_in_scope(s, scope, check_id)))

    @app.post("/api/checks/{check_id}/look", status_code=201)
    async def look(check_id: int, scope: Staff) -> dict[str, Any]:
        await rt.query(lambda s: _check_in_scope(s, scope, check_id))
        return await rt.look(check_id, scope.principal)

    @app.post("/api/checks/{check_id}/outcome")
    async def outcome(check_id: int, body: OutcomeBody, scope: Staff) -> dict[str, Any]:
        await rt.query(lambda s: _check_in_scope(s, scope, check_id))
        return await rt.outcome(check_id, body.outcome, scope.principal)

    # --- escalations -------------------------------------------------------------------

    @app.get("/api/escalations")
    async def list_escalations(
        scope: Reader, status: StepStatus | None = StepStatus.OPEN
    ) -> list[dict[str, Any]]:
        def q(s: Session) -> list[dict[str, Any]]:
            stmt = select(EscalationStep, Check.team).join(
                Check, col(Check.id) == col(EscalationStep.check_id)
            )
            if status:
                stmt = stmt.where(EscalationStep.status == status)
            rows = s.exec(stmt.order_by(col(EscalationStep.id))).all()
            return [checks.step_json(step) for step, team in rows if _team_ok(scope, team)]

        return await rt.query(q)

    @app.post("/api/escalations/{step_id}/complete")
    async def complete_step(step_id: int, body: StepDone, scope: Staff) -> dict[str, Any]:
        def in_scope(s: Session) -> None:
            step = s.get(EscalationStep, step_id)
            if step is None:
                raise NotFound("escalation step", step_id)
            _check_in_scope(s, scope, step.check_id)

        await rt.query(in_scope)
        return await rt.complete_step(step_id, StepResult(body.result), scope.principal)

    # --- the night: visits, coverage, scheduler ----------------------------------------

    @app.get("/api/nights/{night}/visits")
    async def night_visits(
        night: date, scope: Reader, team: str | None = None
    ) -> list[dict[str, Any]]:
        """Visits of one night (by the checks they replace), optionally of one team."""

        def q(s: Session) -> list[dict[str, Any]]:
            stmt = (
                select(Visit, VisitLink)
                .join(VisitLink, col(VisitLink.visit_id) == col(Visit.id))
                .where(VisitLink.night == night)
            )
            if team:
                stmt = stmt.where(VisitLink.team == team)
            out = []
            for visit, link in s.exec(stmt.order_by(col(Visit.due_at))).all():
                if _team_ok(scope, link.team):
                    out.append(visit_json(visit) | {"check_id": link.check_id, "team": link.team})
            return out

        return await rt.query(q)

    @app.get("/api/coverage")
    async def coverage_now(scope: Overseer, night: date | None = None) -> dict[str, Any]:
        """Coverage of a night (default: the last night that has ended)."""
        the_night = night or tonight() - timedelta(days=1)
        return await rt.query(lambda s: coverage.report(s, the_night))

    @app.get("/api/coverage/reports")
    async def coverage_reports(scope: Overseer) -> list[dict[str, Any]]:
        return await rt.query(coverage.reports)

    @app.get("/api/scheduler")
    async def scheduler_state(scope: Admin) -> dict[str, Any]:
        return {
            "leader": rt.leader,
            "lock": rt.lock.where,
            "running": service.scheduler.leading,
            "jobs": service.scheduler.jobs(),
            "alerts": service.scheduler.alerts,
        }
