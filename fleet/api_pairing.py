"""Staff API of pairing, certificates and the equipment lifecycle, plus the ``/pair`` page.

- ``GET /pair`` (+ ``/pair/app.js``, ``/pair/app.css``): anyone (its calls need a login);
- ``POST /api/pairing/lookup``, ``POST /api/pairing``, ``POST /api/pairing/deny``,
  ``GET /api/pairing/{id}``: technicians;
- ``POST /api/devices/{id}/retest|retire|return``: technicians and IT admins;
  ``POST /api/devices/{id}/swap``: technicians;
- ``GET /api/inventory`` (``?format=csv``), ``GET /api/inventory/{id}``,
  ``GET /api/certificates/expiring``: technicians, IT admins, auditors.

A caller without the role gets 403 *and an audit entry* (``pairing.refused``, reason
``role``): pairing is exactly what nobody but a technician may do. Every other refusal
is audited by :class:`fleet.pairing.Pairing` and answered with its status and message.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, StringConstraints

from tillsyn_protocol import DeviceKind

from .auth import Role
from .inventory import certificates_expiring, inventory_rows, to_csv
from .pairing import Actor, PairRequest
from .pairing_errors import PairingRefused
from .pairing_page import PAGE_CSP, PAIR_CSS, PAIR_HTML, PAIR_JS

if TYPE_CHECKING:
    from .pairing import Pairing
    from .service import FleetService

__all__ = ["mount_pairing"]

Pseudonym = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
CodeText = Annotated[str, StringConstraints(min_length=1, max_length=32)]
Serial = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]

_PAGE_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CodeBody(_Body):
    code: CodeText


class PairBody(_Body):
    code: CodeText
    resident_id: Pseudonym
    plan_id: Pseudonym | None = None
    serial: Serial | None = None
    site: Pseudonym | None = None
    team: Pseudonym | None = None


class SwapBody(_Body):
    code: CodeText
    serial: Serial | None = None
    site: Pseudonym | None = None


def _actor_dependency(*roles: Role) -> Callable[[Request], Coroutine[Any, Any, Actor]]:
    admitted = frozenset(roles)

    async def dependency(request: Request) -> Actor:
        pairing: Pairing = request.app.state.pairing
        principal = await request.app.state.authenticate(request)
        if principal is None:
            raise HTTPException(
                401, "authentication required", headers={"WWW-Authenticate": "Bearer"}
            )
        if not principal.has(*roles):
            why = f"requires role {' or '.join(r.value for r in roles)}"
            await pairing.refused(
                PairingRefused("role", why, status=403),
                actor=principal.staff_id,
                path=request.url.path[:100],
            )
            raise HTTPException(403, why)
        return Actor.admitted(principal, admitted)

    dependency.roles = admitted  # type: ignore[attr-defined]  # read by the policy test
    return dependency


# Who may call what: pairing is the technician's alone; the lifecycle also IT's; the
# inventory is readable by auditors too.
Technician = Annotated[Actor, Depends(_actor_dependency(Role.TECHNICIAN))]
Operator = Annotated[Actor, Depends(_actor_dependency(Role.TECHNICIAN, Role.IT_ADMIN))]
Reader = Annotated[Actor, Depends(_actor_dependency(Role.TECHNICIAN, Role.IT_ADMIN, Role.AUDITOR))]


def mount_pairing(app: FastAPI, service: FleetService) -> None:
    """Add the pairing routes to the staff API (no-op when pairing is not configured)."""
    pairing = getattr(service, "pairing", None)
    if pairing is None:
        return
    app.state.pairing = pairing
    app.include_router(_router(pairing))

    @app.exception_handler(PairingRefused)
    async def _refused(_: Request, exc: PairingRefused) -> JSONResponse:
        return JSONResponse({"detail": exc.why, "reason": exc.reason}, status_code=exc.status)


def _router(pairing: Pairing) -> APIRouter:
    router = APIRouter()

    # --- the page ------------------------------------------------------------------------

    @router.get("/pair", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAIR_HTML, headers=_PAGE_HEADERS)

    @router.get("/pair/app.js", include_in_schema=False)
    async def page_js() -> Response:
        return Response(PAIR_JS, media_type="text/javascript", headers=_PAGE_HEADERS)

    @router.get("/pair/app.css", include_in_schema=False)
    async def page_css() -> Response:
        return Response(PAIR_CSS, media_type="text/css", headers=_PAGE_HEADERS)

    # --- pairing -------------------------------------------------------------------------

    @router.post("/api/pairing/lookup")
    async def lookup(body: CodeBody, actor: Technician) -> dict[str, Any]:
        return await pairing.lookup(actor, body.code)

    @router.post("/api/pairing", status_code=201)
    async def pair(body: PairBody, actor: Technician) -> dict[str, Any]:
        return await pairing.pair(actor, PairRequest(**body.model_dump()))

    @router.post("/api/pairing/deny")
    async def deny(body: CodeBody, actor: Technician) -> dict[str, Any]:
        return await pairing.deny(actor, body.code)

    @router.get("/api/pairing/{pairing_id}")
    async def pairing_status(pairing_id: int, actor: Technician) -> dict[str, Any]:
        return await pairing.status(actor, pairing_id)

    # --- lifecycle -----------------------------------------------------------------------

    @router.post("/api/devices/{device_id}/retest", status_code=202)
    async def retest(device_id: str, actor: Operator) -> dict[str, Any]:
        return await pairing.retest(actor, device_id)

    @router.post("/api/devices/{device_id}/retire")
    async def retire(device_id: str, actor: Operator) -> dict[str, Any]:
        return await pairing.lifecycle.retire(actor, device_id)

    @router.post("/api/devices/{device_id}/return")
    async def return_equipment(device_id: str, actor: Operator) -> dict[str, Any]:
        return await pairing.lifecycle.return_equipment(actor, device_id)

    @router.post("/api/devices/{device_id}/swap", status_code=201)
    async def swap(device_id: str, body: SwapBody, actor: Technician) -> dict[str, Any]:
        req = PairRequest(code=body.code, serial=body.serial, site=body.site)
        return await pairing.lifecycle.swap(actor, device_id, req)

    # --- inventory -----------------------------------------------------------------------

    @router.get("/api/inventory", response_model=None)
    async def inventory(
        actor: Reader,
        kind: DeviceKind | None = None,
        site: str | None = None,
        state: str | None = None,
        serial: str | None = None,
        format: Literal["json", "csv"] = "json",
    ) -> list[dict[str, Any]] | Response:
        def q(session: Any) -> list[dict[str, Any]]:
            ids = None
            if not actor.fleet_wide:
                ids = [d.id for d in session.exec(_select_devices()).all() if actor.allows(d)]
            return inventory_rows(
                session, kind=kind, site=site, state=state, serial=serial, device_ids=ids
            )

        rows = await pairing.db(q)
        if format == "csv":
            return Response(
                to_csv(rows),
                media_type="text/csv; charset=utf-8",
                headers={"Content-Disposition": 'attachment; filename="inventory.csv"'},
            )
        for row in rows:
            row.pop("cert_not_after", None)
        return rows

    @router.get("/api/inventory/{device_id}")
    async def inventory_device(device_id: str, actor: Reader) -> dict[str, Any]:
        return await pairing.device(actor, device_id)

    @router.get("/api/certificates/expiring")
    async def expiring(
        actor: Reader, days: Annotated[float, Query(gt=0, le=3650)] = 30
    ) -> list[dict[str, Any]]:
        def q(session: Any) -> list[dict[str, Any]]:
            ids = None
            if not actor.fleet_wide:
                ids = [d.id for d in session.exec(_select_devices()).all() if actor.allows(d)]
            before = pairing.clock() + days * 86400
            certs = certificates_expiring(session, before=before, device_ids=ids)
            return [c.model_dump(mode="json", exclude={"pem"}) for c in certs]

        return await pairing.db(q)

    return router


def _select_devices() -> Any:
    from sqlmodel import select

    from .models import Device

    return select(Device)
