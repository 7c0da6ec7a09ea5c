"""HTTP API for the audit log, its follow-up, the per-resident extract, staff and tokens.

- auditors: the log (filters, paging), chain verification, follow-up samples, spot-check
  marks, CSV/PDF export, the per-resident extract (itself audited);
- IT admins: chain verification, accounts (list, unlock), API tokens (issue, revoke).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlmodel import Session, col, select

from . import accounts, audit, audit_query, auth, followup
from .auth import Principal, Role, require
from .errors import FleetError, NotFound
from .models import utcnow

if TYPE_CHECKING:
    from .service import FleetService

Pseudonym = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Auditor = Annotated[Principal, Depends(require(Role.AUDITOR))]
Overseer = Annotated[Principal, Depends(require(Role.AUDITOR, Role.IT_ADMIN))]
Admin = Annotated[Principal, Depends(require(Role.IT_ADMIN))]
AnyStaff = Annotated[Principal, Depends(require())]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SampleRequest(_Body):
    start: float = Field(description="Period start, epoch seconds")
    end: float = Field(description="Period end (exclusive), epoch seconds")
    size: int = Field(default=20, ge=1, le=followup.MAX_SAMPLE)


class MarkRequest(_Body):
    verdict: followup.Verdict
    comment: Annotated[str, StringConstraints(max_length=1000)] = ""


class TokenRequest(_Body):
    staff_id: Pseudonym
    role: Role


def sample_json(
    sample: followup.FollowUpSample, checks: list[followup.SpotCheck]
) -> dict[str, Any]:
    data = sample.model_dump()
    data["checks"] = [c.model_dump() for c in checks]
    data["checked"] = sum(1 for c in checks if c.checked_at is not None)
    return data


def audit_router(service: FleetService) -> APIRouter:
    router = APIRouter(prefix="/api")
    ops = service.ops

    async def run(fn: Any) -> Any:
        try:
            return await service.db(ops.run, fn)
        except followup.FollowUpError as exc:
            raise HTTPException(400, str(exc)) from None

    @router.get("/audit")
    async def audit_log(
        who: Auditor,
        action: str | None = None,
        actor: str | None = None,
        subject: str | None = None,
        since: float | None = None,
        until: float | None = None,
        before_id: int | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, Any]]:
        f = audit_query.Filters(action, actor, subject, since, until, before_id, limit)
        rows = await run(lambda s: audit_query.search(s, f))
        return [audit_query.entry_json(e) for e in rows]

    @router.get("/audit/verify")
    async def verify(who: Overseer) -> dict[str, Any]:
        report = await run(audit.verify)
        return {
            "ok": report.ok,
            "entries": report.entries,
            "first_broken_id": report.first_broken_id,
            "why": report.why,
            "head": report.head,
        }

    @router.get("/followups")
    async def list_samples(who: Auditor) -> list[dict[str, Any]]:
        return [x.model_dump() for x in await run(followup.samples)]

    @router.post("/followups", status_code=201)
    async def draw(body: SampleRequest, who: Auditor) -> dict[str, Any]:
        def q(s: Session) -> dict[str, Any]:
            drawn = followup.draw_sample(
                s,
                start=body.start,
                end=body.end,
                size=body.size,
                actor=who.staff_id,
                now=service.clock(),
            )
            assert drawn.id is not None
            return sample_json(*followup.sample_checks(s, drawn.id))

        result: dict[str, Any] = await run(q)
        return result

    @router.get("/followups/{sample_id}")
    async def get_sample(sample_id: int, who: Auditor) -> dict[str, Any]:
        result: dict[str, Any] = await run(
            lambda s: sample_json(*followup.sample_checks(s, sample_id))
        )
        return result

    @router.post("/followups/checks/{check_id}")
    async def mark(check_id: int, body: MarkRequest, who: Auditor) -> dict[str, Any]:
        def q(s: Session) -> dict[str, Any]:
            check = followup.mark(
                s,
                check_id,
                verdict=body.verdict,
                comment=body.comment,
                actor=who.staff_id,
                now=service.clock(),
            )
            return check.model_dump()

        result: dict[str, Any] = await run(q)
        return result

    @router.get("/followups/{sample_id}/export")
    async def export(
        sample_id: int, who: Auditor, format: Literal["csv", "pdf"] = "csv"
    ) -> Response:
        def q(s: Session) -> tuple[Any, list[Any], str | None]:
            sample, checks = followup.sample_checks(s, sample_id)
            audit.append(
                s,
                ts=service.clock(),
                actor=who.staff_id,
                action="followup.exported",
                subject=f"sample-{sample_id}",
                format=format,
            )
            return sample, checks, audit.verify(s).head

        sample, checks, head = await run(q)
        name = f"uppfoljning-{sample_id}.{format}"
        disposition = {"Content-Disposition": f'attachment; filename="{name}"'}
        if format == "pdf":
            return Response(
                followup.to_pdf(sample, checks, head),
                media_type="application/pdf",
                headers=disposition,
            )
        return Response(
            followup.to_csv(sample, checks, head),
            media_type="text/csv; charset=utf-8",
            headers=disposition,
        )

    @router.get("/residents/{resident_id}/looks")
    async def extract(
        resident_id: Pseudonym, who: Auditor, format: Literal["json", "csv"] = "json"
    ) -> Any:
        def q(s: Session) -> list[audit_query.ExtractRow]:
            rows = audit_query.resident_extract(s, resident_id)
            audit.append(
                s,
                ts=service.clock(),
                actor=who.staff_id,
                action="audit.extract",
                subject=resident_id,
                looks=len(rows),
            )
            return rows

        rows: list[audit_query.ExtractRow] = await run(q)
        if format == "csv":
            return Response(
                audit_query.extract_csv(rows),
                media_type="text/csv; charset=utf-8",
                headers={"Content-Disposition": f'attachment; filename="{resident_id}.csv"'},
            )
        return [dict(zip(audit_query.EXTRACT_COLUMNS, _cells(r), strict=True)) for r in rows]

    # --- accounts and tokens -----------------------------------------------------------

    @router.get("/me")
    async def me(who: AnyStaff) -> dict[str, Any]:
        return {
            "staff_id": who.staff_id,
            "roles": sorted(r.value for r in who.roles),
            "teams": sorted(who.teams),
        }

    @router.get("/staff")
    async def list_staff(who: Admin) -> list[dict[str, Any]]:
        now = service.clock()

        def q(s: Session) -> list[dict[str, Any]]:
            out = []
            for a in s.exec(select(auth.StaffAccount).order_by(col(auth.StaffAccount.id))):
                data = a.model_dump(mode="json")
                data["login"] = accounts.credential_state(s, a.id, now)
                out.append(data)
            return out

        result: list[dict[str, Any]] = await run(q)
        return result

    @router.post("/staff/{staff_id}/unlock")
    async def unlock(staff_id: Pseudonym, who: Admin) -> dict[str, str]:
        def q(s: Session) -> None:
            try:
                accounts.unlock(s, staff_id, now=service.clock(), actor=who.staff_id)
            except accounts.AccountError:
                raise NotFound("staff account", staff_id) from None

        await run(q)
        return {"staff_id": staff_id, "status": "unlocked"}

    @router.post("/tokens", status_code=201)
    async def issue(body: TokenRequest, who: Admin) -> dict[str, Any]:
        def q(s: Session) -> dict[str, Any]:
            try:
                secret = auth.issue_token(s, body.staff_id, body.role)
            except ValueError as exc:
                raise FleetError(str(exc)) from None
            s.flush()
            row = s.exec(select(auth.ApiToken).order_by(col(auth.ApiToken.id).desc())).first()
            assert row is not None
            audit.append(
                s,
                ts=service.clock(),
                actor=who.staff_id,
                action="token.issued",
                subject=body.staff_id,
                role=body.role.value,
                token_id=row.id,
            )
            return {"id": row.id, "staff_id": body.staff_id, "role": body.role, "token": secret}

        result: dict[str, Any] = await run(q)
        return result

    @router.delete("/tokens/{token_id}")
    async def revoke(token_id: int, who: Admin) -> dict[str, Any]:
        def q(s: Session) -> dict[str, Any]:
            row = s.get(auth.ApiToken, token_id)
            if row is None or row.revoked_at is not None:
                raise NotFound("active token", token_id)
            row.revoked_at = utcnow()
            s.add(row)
            audit.append(
                s,
                ts=service.clock(),
                actor=who.staff_id,
                action="token.revoked",
                subject=row.staff_id,
                token_id=token_id,
            )
            return {"id": token_id, "status": "revoked"}

        result: dict[str, Any] = await run(q)
        return result

    return router


def _cells(row: audit_query.ExtractRow) -> list[Any]:
    return [getattr(row, c) for c in audit_query.EXTRACT_COLUMNS]
