"""The night staff's page: tonight's checks in time order, looks and outcomes, visits, calls.

Built on the care-plan checks (``fleet/checks.py``, ``fleet/plan_service.py``): the same
operations as ``POST /api/checks/{id}/look`` and ``/outcome``, in the caller's name and
restricted to their teams (a check belongs to its plan's team). Plain forms that work
without JavaScript (post, then redirect back); ``/static/live.js`` polls ``/night/live``
every few seconds and swaps the list in place when it changed (``ETag``), keeping focus.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlmodel import Session, col, select

from .. import sessions
from ..auth import Role
from ..errors import FleetError, NotFound
from ..models import Device, Visit, VisitStatus
from ..plan_models import (
    Check,
    CheckKind,
    CheckState,
    EscalationStep,
    Outcome,
    StepResult,
    StepStatus,
    VisitLink,
)
from ..plan_rules import load_tz, night_at
from ..scope import Scope
from .common import SECURITY_HEADERS, Pages, page_scope, redirect

if TYPE_CHECKING:
    from ..service import FleetService

LOOKABLE = (CheckState.UPCOMING, CheckState.OPEN, CheckState.LOOKED)


@dataclass
class CheckRow:
    check: Check
    state: str  # display state key (st_*)
    can_look: bool
    can_record: bool


@dataclass
class Night:
    checks: list[CheckRow] = field(default_factory=list)
    visits: list[Visit] = field(default_factory=list)
    calls: list[tuple[EscalationStep, Check]] = field(default_factory=list)


def display_state(check: Check, now: float) -> str:
    state = check.state
    if state is CheckState.UPCOMING and check.start_at <= now < check.end_at:
        state = CheckState.OPEN
    if check.outcome is Outcome.NOT_SEEN and state not in (
        CheckState.RECHECK_DUE,
        CheckState.ESCALATED,
    ):
        return "st_not_seen"
    return f"st_{state.value}"


def _team_ok(scope: Scope, team: str | None) -> bool:
    return scope.fleet_wide or (team is not None and team in scope.teams)


def load_night(s: Session, scope: Scope, now: float, tz: str) -> Night:
    tonight = night_at(datetime.fromtimestamp(now, UTC), load_tz(tz))
    out = Night()
    stmt = select(Check).where(Check.night == tonight)
    if not scope.fleet_wide:
        stmt = stmt.where(col(Check.team).in_(sorted(scope.teams)))
    for check in s.exec(stmt.order_by(col(Check.start_at), col(Check.id))):
        open_now = check.start_at <= now < check.end_at
        out.checks.append(
            CheckRow(
                check,
                display_state(check, now),
                can_look=open_now and check.outcome is None and check.state in LOOKABLE,
                can_record=check.looks > 0 and check.outcome is None and check.state in LOOKABLE,
            )
        )
    visits = s.exec(
        select(Visit, VisitLink, Device)
        .join(VisitLink, col(VisitLink.visit_id) == col(Visit.id), isouter=True)
        .join(Device, col(Device.id) == col(Visit.device_id), isouter=True)
        .where(Visit.status != VisitStatus.CLOSED)
        .order_by(col(Visit.due_at))
    ).all()
    for visit, link, device in visits:
        if scope.allows(device) or (link is not None and _team_ok(scope, link.team)):
            out.visits.append(visit)
    steps = s.exec(
        select(EscalationStep, Check)
        .join(Check, col(Check.id) == col(EscalationStep.check_id))
        .where(EscalationStep.status == StepStatus.OPEN, EscalationStep.action == "call")
        .order_by(col(EscalationStep.due_at))
    ).all()
    out.calls = [(step, check) for step, check in steps if _team_ok(scope, check.team)]
    return out


def night_router(service: FleetService, pages: Pages) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    rt = service.plans
    # Defaults, not annotations: the dependency is built here (annotations are strings).
    night_staff = Depends(page_scope(service, Role.NIGHT_STAFF))

    async def data(scope: Scope) -> Night:
        now, tz = service.clock(), service.settings.tz
        night: Night = await service.db(service.ops.run, lambda s: load_night(s, scope, now, tz))
        return night

    async def check_in_scope(scope: Scope, check_id: int) -> None:
        def q(s: Session) -> None:
            check = s.get(Check, check_id)
            if check is None or not _team_ok(scope, check.team):
                raise NotFound("check", check_id)

        await service.db(service.ops.run, q)

    async def visit_in_scope(scope: Scope, visit_id: int) -> None:
        def q(s: Session) -> None:
            visit = s.get(Visit, visit_id)
            link = s.get(VisitLink, visit_id)
            device = s.get(Device, visit.device_id) if visit and visit.device_id else None
            ok = scope.allows(device) or (link is not None and _team_ok(scope, link.team))
            if visit is None or not ok:
                raise NotFound("visit", visit_id)

        await service.db(service.ops.run, q)

    async def page(request: Request, scope: Scope, status: int = 200, error: str = "") -> Response:
        night = await data(scope)
        ok = request.query_params.get("ok")
        return pages.render(
            request,
            "night.html",
            status,
            night=night,
            now=service.clock(),
            ok=ok if ok in ("look", "outcome", "visit") else None,
            error=error,
            kinds=CheckKind,
        )

    @router.get("/night")
    async def night_page(request: Request, scope: Scope = night_staff) -> Response:
        return await page(request, scope)

    @router.get("/night/live")
    async def night_live(request: Request, scope: Scope = night_staff) -> Response:
        night = await data(scope)
        html = pages.fragment(request, "_night_live.html", night=night, now=service.clock())
        etag = '"' + hashlib.sha256(html.encode()).hexdigest()[:32] + '"'
        headers = SECURITY_HEADERS | {"ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(html, media_type="text/html; charset=utf-8", headers=headers)

    async def act(request: Request, scope: Scope, fn: Any, ok: str, anchor: str) -> Response:
        try:
            await fn()
        except NotFound as exc:  # also another team's: the same answer as a missing one
            return await page(request, scope, 404, error=str(exc))
        except FleetError as exc:
            return await page(request, scope, 409, error=str(exc))
        return redirect(f"/night?ok={ok}#{anchor}")

    @router.post("/night/checks/{check_id}/look")
    async def look(request: Request, check_id: int, scope: Scope = night_staff) -> Response:
        async def fn() -> None:
            await check_in_scope(scope, check_id)
            await rt.look(check_id, scope.principal)

        return await act(request, scope, fn, "look", f"check-{check_id}")

    @router.post("/night/checks/{check_id}/outcome")
    async def outcome(request: Request, check_id: int, scope: Scope = night_staff) -> Response:
        form = await sessions.form(request)

        async def fn() -> None:
            await check_in_scope(scope, check_id)
            try:
                value = Outcome(form.get("outcome", ""))
            except ValueError:
                raise FleetError("unknown outcome") from None
            await rt.outcome(check_id, value, scope.principal)

        return await act(request, scope, fn, "outcome", f"check-{check_id}")

    @router.post("/night/visits/{visit_id}/acknowledge")
    async def ack_visit(request: Request, visit_id: int, scope: Scope = night_staff) -> Response:
        async def fn() -> None:
            await visit_in_scope(scope, visit_id)
            await service.db(
                service.ops.acknowledge_visit, visit_id, scope.staff_id, service.clock()
            )

        return await act(request, scope, fn, "visit", f"visit-{visit_id}")

    @router.post("/night/visits/{visit_id}/close")
    async def close_visit(request: Request, visit_id: int, scope: Scope = night_staff) -> Response:
        form = await sessions.form(request)
        result = form.get("outcome", "").strip()[:200]

        async def fn() -> None:
            await visit_in_scope(scope, visit_id)
            if not result:
                raise FleetError("say what the visit found")
            await service.db(
                service.ops.close_visit, visit_id, scope.staff_id, result, service.clock()
            )

        return await act(request, scope, fn, "visit", "visits")

    @router.post("/night/steps/{step_id}/complete")
    async def complete_step(request: Request, step_id: int, scope: Scope = night_staff) -> Response:
        form = await sessions.form(request)

        async def fn() -> None:
            def q(s: Session) -> None:
                step = s.get(EscalationStep, step_id)
                check = s.get(Check, step.check_id) if step else None
                if step is None or check is None or not _team_ok(scope, check.team):
                    raise NotFound("escalation step", step_id)

            await service.db(service.ops.run, q)
            try:
                result = StepResult(form.get("result", ""))
            except ValueError:
                raise FleetError("unknown result") from None
            await rt.complete_step(step_id, result, scope.principal)

        return await act(request, scope, fn, "visit", "calls")

    return router
