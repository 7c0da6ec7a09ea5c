"""The technician's device list and the auditor's pages (log, follow-up, extract)."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from datetime import time as dtime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlmodel import Session, col, select

from .. import audit, audit_query, followup, sessions
from ..auth import Role
from ..errors import FleetError
from ..models import Device
from ..scope import Scope
from .common import Pages, page_scope, redirect

if TYPE_CHECKING:
    from ..service import FleetService

PAGE_SIZE = 50


def _day(text: str | None, tz: ZoneInfo, *, end: bool = False) -> float | None:
    if not text:
        return None
    try:
        day = date.fromisoformat(text[:10])
    except ValueError:
        return None
    return datetime.combine(day + timedelta(days=1 if end else 0), dtime(0), tz).timestamp()


def staff_router(service: FleetService, pages: Pages) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    # Defaults, not annotations: the dependencies are built here (annotations are strings).
    installer = Depends(page_scope(service, Role.TECHNICIAN, Role.IT_ADMIN))
    auditor = Depends(page_scope(service, Role.AUDITOR))

    def tz() -> ZoneInfo:
        return ZoneInfo(service.settings.tz)

    async def run(fn: Any) -> Any:
        return await service.db(service.ops.run, fn)

    # --- technician ------------------------------------------------------------------

    @router.get("/tech")
    async def tech(request: Request, scope: Scope = installer) -> Response:
        stmt = scope.where_device(select(Device).order_by(col(Device.id)), Device.id)
        devices = await run(lambda s: list(s.exec(stmt).all()))
        return pages.render(request, "tech.html", devices=devices)

    # --- auditor: the log ------------------------------------------------------------

    @router.get("/audit")
    async def audit_log(request: Request, scope: Scope = auditor) -> Response:
        q = request.query_params
        filters = audit_query.Filters(
            action=q.get("action") or None,
            actor=q.get("actor") or None,
            subject=q.get("subject") or None,
            since=_day(q.get("from"), tz()),
            until=_day(q.get("to"), tz(), end=True),
            before_id=int(q["before"]) if q.get("before", "").isdigit() else None,
            limit=PAGE_SIZE,
        )

        def load(s: Session) -> tuple[list[dict[str, Any]], audit.ChainReport]:
            rows = [audit_query.entry_json(e) for e in audit_query.search(s, filters)]
            return rows, audit.verify(s)

        rows, report = await run(load)
        keep = {k: v for k, v in q.items() if k in ("action", "actor", "subject", "from", "to")}
        return pages.render(
            request,
            "audit_log.html",
            rows=rows,
            report=report,
            f=keep,
            older=rows[-1]["id"] if len(rows) == PAGE_SIZE else None,
        )

    # --- auditor: follow-up ----------------------------------------------------------

    @router.get("/audit/followup")
    async def followups(request: Request, scope: Scope = auditor, error: str = "") -> Response:
        samples = await run(followup.samples)
        today = datetime.now(tz()).date()
        return pages.render(
            request,
            "followups.html",
            400 if error else 200,
            samples=samples,
            error=error,
            default_from=(today - timedelta(days=7)).isoformat(),
            default_to=(today - timedelta(days=1)).isoformat(),
        )

    @router.post("/audit/followup")
    async def draw(request: Request, scope: Scope = auditor) -> Response:
        form = await sessions.form(request)
        start = _day(form.get("from"), tz())
        end = _day(form.get("to"), tz(), end=True)
        try:
            size = int(form.get("size", "20"))
        except ValueError:
            size = 0

        def q(s: Session) -> int:
            if start is None or end is None:
                raise followup.FollowUpError("give a period (from and to)")
            drawn = followup.draw_sample(
                s, start=start, end=end, size=size, actor=scope.staff_id, now=service.clock()
            )
            assert drawn.id is not None
            return drawn.id

        try:
            sample_id = await run(q)
        except FleetError as exc:
            return await followups(request, scope, error=str(exc))
        return redirect(f"/audit/followup/{sample_id}")

    @router.get("/audit/followup/{sample_id}")
    async def sample(
        request: Request, sample_id: int, scope: Scope = auditor, error: str = ""
    ) -> Response:
        drawn, checks = await run(lambda s: followup.sample_checks(s, sample_id))
        return pages.render(
            request,
            "followup.html",
            400 if error else 200,
            sample=drawn,
            checks=checks,
            error=error,
            checked=sum(1 for c in checks if c.checked_at is not None),
        )

    @router.post("/audit/followup/{sample_id}/checks/{check_id}")
    async def mark(
        request: Request, sample_id: int, check_id: int, scope: Scope = auditor
    ) -> Response:
        form = await sessions.form(request)

        def q(s: Session) -> None:
            try:
                verdict = followup.Verdict(form.get("verdict", ""))
            except ValueError:
                raise followup.FollowUpError("choose a verdict") from None
            followup.mark(
                s,
                check_id,
                verdict=verdict,
                comment=form.get("comment", ""),
                actor=scope.staff_id,
                now=service.clock(),
            )

        try:
            await run(q)
        except FleetError as exc:
            return await sample(request, sample_id, scope, error=str(exc))
        return redirect(f"/audit/followup/{sample_id}#check-{check_id}")

    # --- auditor: per-resident extract -----------------------------------------------

    @router.get("/audit/resident")
    async def resident(request: Request, scope: Scope = auditor) -> Response:
        wanted = request.query_params.get("resident", "").strip()[:64]
        rows: list[audit_query.ExtractRow] | None = None
        if wanted:

            def q(s: Session) -> list[audit_query.ExtractRow]:
                found = audit_query.resident_extract(s, wanted)
                audit.append(
                    s,
                    ts=service.clock(),
                    actor=scope.staff_id,
                    action="audit.extract",
                    subject=wanted,
                    looks=len(found),
                )
                return found

            rows = await run(q)
        return pages.render(request, "resident.html", resident=wanted, rows=rows)

    return router
