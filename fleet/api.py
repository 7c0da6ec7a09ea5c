"""HTTP API (JSON): devices, windows, commands, looks, visits; health and metrics.

Every ``/api`` endpoint declares the roles it admits (``scoped(...)``/``require(...)``) and
restricts night staff and technicians to their teams' devices (:mod:`fleet.scope`);
``tests/unit/test_access_matrix.py`` holds the expected policy of every route and fails on
a route without one. ``/healthz`` and ``/readyz`` are open (they say nothing about
residents); ``/metrics`` is open unless ``metrics_public = false`` (then IT admins' tokens):
it carries counts and device ids, no resident ids, and is meant for a scraper on the host
or a private network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from sqlmodel import col, select

from tillsyn_protocol import DeviceKind
from tillsyn_protocol.messages import DeviceId, StaffId

from .api_audit import audit_router
from .api_pairing import mount_pairing
from .api_plans import add_plan_routes
from .auth import Principal, Role
from .errors import Conflict, FleetError, NotFound
from .models import Command, CommandStatus, Device, Look, Visit, VisitStatus, Window
from .pages import mount_pages
from .scope import Scope, scoped
from .visits import visit_json

if TYPE_CHECKING:
    from .service import FleetService

Pseudonym = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceCreate(_Body):
    id: DeviceId
    kind: DeviceKind = DeviceKind.CAMERA
    resident_id: Pseudonym | None = None
    site: Pseudonym | None = None
    team: Pseudonym | None = None


class WindowCreate(_Body):
    device_id: DeviceId
    start: Annotated[str, StringConstraints(pattern=r"^([01]\d|2[0-3]):[0-5]\d(:[0-5]\d)?$")]
    duration_s: int = Field(ge=1, le=6 * 3600)
    weekdays: Annotated[str, StringConstraints(pattern=r"^[0-6]{1,7}$")] = "0123456"
    tz: str | None = None

    @field_validator("start")
    @classmethod
    def _seconds(cls, value: str) -> str:
        return value if value.count(":") == 2 else value + ":00"


class LookRequest(_Body):
    staff_id: StaffId | None = None  # the caller; another staff id is refused
    max_s: int | None = Field(default=None, ge=1, le=600)


class VisitClose(_Body):
    by: StaffId | None = None  # the caller; another staff id is refused
    outcome: Annotated[str, StringConstraints(min_length=1, max_length=200)]


class VisitAck(_Body):
    by: StaffId | None = None


def _as_caller(scope: Scope, claimed: str | None) -> str:
    """Staff act in their own name only: a body naming someone else is refused."""
    if claimed is not None and claimed != scope.staff_id:
        raise HTTPException(403, "cannot act in another staff member's name")
    return scope.staff_id


# Who may call what (the policy test enumerates the routes and checks each one).
ANY_STAFF = (Role.IT_ADMIN, Role.TECHNICIAN, Role.NIGHT_STAFF, Role.AUDITOR)
Viewer = Annotated[Scope, Depends(scoped(*ANY_STAFF))]
Installer = Annotated[Scope, Depends(scoped(Role.IT_ADMIN, Role.TECHNICIAN))]
PlanAdmin = Annotated[Scope, Depends(scoped(Role.IT_ADMIN))]
LedgerReader = Annotated[Scope, Depends(scoped(Role.IT_ADMIN, Role.TECHNICIAN, Role.AUDITOR))]
Looker = Annotated[Scope, Depends(scoped(Role.NIGHT_STAFF))]
LookReader = Annotated[Scope, Depends(scoped(Role.NIGHT_STAFF, Role.AUDITOR))]
VisitReader = Annotated[Scope, Depends(scoped(Role.IT_ADMIN, Role.NIGHT_STAFF, Role.AUDITOR))]


def create_app(service: FleetService) -> FastAPI:
    app = FastAPI(title="Tillsyn Fleet", version="0.1.0")
    ops = service.ops
    app.state.authenticate = service.authenticate

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, exc: Conflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(FleetError)
    async def _fleet_error(_: Request, exc: FleetError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        checks = await service.readiness()
        leader = checks.pop("scheduler_leader", None)  # a standby replica is ready too
        ok = all(checks.values())
        body = {"ready": ok, "checks": checks, "scheduler_leader": leader}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics_access(request: Request) -> Principal | None:
        if service.settings.metrics_public:
            return None
        principal = await service.authenticate(request)
        if principal is None:
            raise HTTPException(401, "authentication required")
        if not principal.has(Role.IT_ADMIN):
            raise HTTPException(403, "requires role it_admin")
        return principal

    @app.get("/metrics", dependencies=[Depends(metrics_access)])
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/devices")
    async def list_devices(scope: Viewer) -> list[dict[str, Any]]:
        stmt = scope.where_device(select(Device).order_by(col(Device.id)), Device.id)
        rows = await service.db(ops.run, lambda s: s.exec(stmt).all())
        return [service.device_json(d) for d in rows]

    @app.get("/api/devices/{device_id}")
    async def get_device(device_id: str, scope: Viewer) -> dict[str, Any]:
        device = await service.db(ops.run, lambda s: scope.device(s, device_id))
        return service.device_json(device)

    @app.post("/api/devices", status_code=201)
    async def register_device(body: DeviceCreate, scope: Installer) -> dict[str, Any]:
        if not scope.fleet_wide and (body.team is None or body.team not in scope.teams):
            raise HTTPException(403, "a technician registers devices into one of their teams")
        device = await service.register_device(Device(**body.model_dump()), scope.staff_id)
        return service.device_json(device)

    @app.get("/api/windows")
    async def list_windows(scope: Viewer, device_id: str | None = None) -> list[dict[str, Any]]:
        def q(s: Any) -> Any:
            stmt = select(Window).where(col(Window.active)).order_by(col(Window.id))
            stmt = scope.where_device(stmt, Window.device_id)
            if device_id:
                stmt = stmt.where(Window.device_id == device_id)
            return s.exec(stmt).all()

        return [w.model_dump(mode="json") for w in await service.db(ops.run, q)]

    @app.post("/api/windows", status_code=201)
    async def add_window(body: WindowCreate, scope: PlanAdmin) -> dict[str, Any]:
        data = body.model_dump()
        window = Window(
            device_id=data["device_id"],
            start_local=data["start"],
            duration_s=data["duration_s"],
            weekdays=data["weekdays"],
            tz=data["tz"] or service.settings.tz,
        )
        created = await service.add_window(window, scope.staff_id)
        return created.model_dump(mode="json")

    @app.delete("/api/windows/{window_id}")
    async def remove_window(window_id: int, scope: PlanAdmin) -> dict[str, Any]:
        window = await service.remove_window(window_id, scope.staff_id)
        return window.model_dump(mode="json")

    @app.get("/api/commands")
    async def list_commands(
        scope: LedgerReader,
        device_id: str | None = None,
        status: CommandStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, Any]]:
        def q(s: Any) -> Any:
            stmt = select(Command).order_by(col(Command.id).desc()).limit(limit)
            stmt = scope.where_device(stmt, Command.device_id)
            if device_id:
                stmt = stmt.where(Command.device_id == device_id)
            if status:
                stmt = stmt.where(Command.status == status)
            return s.exec(stmt).all()

        rows = await service.db(ops.run, q)
        return [c.model_dump(mode="json", exclude={"token"}) for c in rows]

    @app.post("/api/devices/{device_id}/looks", status_code=201)
    async def start_look(device_id: str, body: LookRequest, scope: Looker) -> dict[str, Any]:
        staff_id = _as_caller(scope, body.staff_id)
        await service.db(ops.run, lambda s: scope.device(s, device_id))
        look = await service.start_look(device_id, staff_id, body.max_s)
        return look.model_dump(mode="json")

    @app.get("/api/looks")
    async def list_looks(scope: LookReader, device_id: str | None = None) -> list[dict[str, Any]]:
        def q(s: Any) -> Any:
            stmt = select(Look).order_by(col(Look.requested_at).desc()).limit(500)
            stmt = scope.where_device(stmt, Look.device_id)
            if device_id:
                stmt = stmt.where(Look.device_id == device_id)
            return s.exec(stmt).all()

        return [x.model_dump(mode="json") for x in await service.db(ops.run, q)]

    @app.get("/api/visits")
    async def list_visits(
        scope: VisitReader, status: VisitStatus | None = None, device_id: str | None = None
    ) -> list[dict[str, Any]]:
        def q(s: Any) -> Any:
            stmt = scope.where_device(select(Visit).order_by(col(Visit.due_at)), Visit.device_id)
            if status:
                stmt = stmt.where(Visit.status == status)
            if device_id:
                stmt = stmt.where(Visit.device_id == device_id)
            return s.exec(stmt).all()

        return [visit_json(v) for v in await service.db(ops.run, q)]

    def _visit_in_scope(scope: Scope, visit_id: int) -> None:
        def q(s: Any) -> None:
            visit = s.get(Visit, visit_id)
            device = s.get(Device, visit.device_id) if visit and visit.device_id else None
            if visit is None or not scope.allows(device):
                raise NotFound("visit", visit_id)

        return ops.run(q)

    @app.post("/api/visits/{visit_id}/acknowledge")
    async def acknowledge_visit(visit_id: int, body: VisitAck, scope: Looker) -> dict[str, Any]:
        by = _as_caller(scope, body.by)
        await service.db(_visit_in_scope, scope, visit_id)
        visit = await service.db(ops.acknowledge_visit, visit_id, by, service.clock())
        return visit_json(visit)

    @app.post("/api/visits/{visit_id}/close")
    async def close_visit(visit_id: int, body: VisitClose, scope: Looker) -> dict[str, Any]:
        by = _as_caller(scope, body.by)
        await service.db(_visit_in_scope, scope, visit_id)
        visit = await service.db(ops.close_visit, visit_id, by, body.outcome, service.clock())
        return visit_json(visit)

    mount_pairing(app, service)  # pairing, inventory, certificates (fleet/api_pairing.py)
    add_plan_routes(app, service)  # care plans, checks, coverage (fleet/api_plans.py)
    app.include_router(audit_router(service))  # audit, follow-up, staff, tokens (api_audit.py)
    mount_pages(app, service)  # login, night staff, technician, auditor pages (fleet/pages/)
    return app
