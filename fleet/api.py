"""HTTP API (JSON): devices, windows, commands, looks, visits; health and metrics.

Bound to loopback by default; staff authentication arrives with the accounts work, until
then the API must not be exposed beyond the host (see docs/architecture.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from sqlmodel import col, select

from tillsyn_protocol import DeviceKind
from tillsyn_protocol.messages import DeviceId, StaffId

from .errors import Conflict, FleetError, NotFound
from .models import Command, CommandStatus, Device, Look, Visit, VisitStatus, Window
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
    staff_id: StaffId
    max_s: int | None = Field(default=None, ge=1, le=600)


class VisitClose(_Body):
    by: StaffId
    outcome: Annotated[str, StringConstraints(min_length=1, max_length=200)]


class VisitAck(_Body):
    by: StaffId


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
        ok = all(checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/devices")
    async def list_devices() -> list[dict[str, Any]]:
        rows = await service.db(ops.run, lambda s: s.exec(select(Device)).all())
        return [service.device_json(d) for d in rows]

    @app.get("/api/devices/{device_id}")
    async def get_device(device_id: str) -> dict[str, Any]:
        device = await service.db(ops.run, lambda s: s.get(Device, device_id))
        if device is None:
            raise NotFound("device", device_id)
        return service.device_json(device)

    @app.post("/api/devices", status_code=201)
    async def register_device(body: DeviceCreate) -> dict[str, Any]:
        device = await service.register_device(Device(**body.model_dump()))
        return service.device_json(device)

    @app.get("/api/windows")
    async def list_windows(device_id: str | None = None) -> list[dict[str, Any]]:
        def q(s: Any) -> Any:
            stmt = select(Window).where(col(Window.active))
            if device_id:
                stmt = stmt.where(Window.device_id == device_id)
            return s.exec(stmt).all()

        return [w.model_dump(mode="json") for w in await service.db(ops.run, q)]

    @app.post("/api/windows", status_code=201)
    async def add_window(body: WindowCreate) -> dict[str, Any]:
        data = body.model_dump()
        window = Window(
            device_id=data["device_id"],
            start_local=data["start"],
            duration_s=data["duration_s"],
            weekdays=data["weekdays"],
            tz=data["tz"] or service.settings.tz,
        )
        created = await service.add_window(window)
        return created.model_dump(mode="json")

    @app.delete("/api/windows/{window_id}")
    async def remove_window(window_id: int) -> dict[str, Any]:
        window = await service.remove_window(window_id)
        return window.model_dump(mode="json")

    @app.get("/api/commands")
    async def list_commands(
        device_id: str | None = None,
        status: CommandStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, Any]]:
        def q(s: Any) -> Any:
            stmt = select(Command).order_by(col(Command.id).desc()).limit(limit)
            if device_id:
                stmt = stmt.where(Command.device_id == device_id)
            if status:
                stmt = stmt.where(Command.status == status)
            return s.exec(stmt).all()

        rows = await service.db(ops.run, q)
        return [c.model_dump(mode="json", exclude={"token"}) for c in rows]

    @app.post("/api/devices/{device_id}/looks", status_code=201)
    async def start_look(device_id: str, body: LookRequest) -> dict[str, Any]:
        look = await service.start_look(device_id, body.staff_id, body.max_s)
        return look.model_dump(mode="json")

    @app.get("/api/looks")
    async def list_looks(device_id: str | None = None) -> list[dict[str, Any]]:
        def q(s: Any) -> Any:
            stmt = select(Look).order_by(col(Look.requested_at).desc()).limit(500)
            if device_id:
                stmt = stmt.where(Look.device_id == device_id)
            return s.exec(stmt).all()

        return [x.model_dump(mode="json") for x in await service.db(ops.run, q)]

    @app.get("/api/visits")
    async def list_visits(
        status: VisitStatus | None = None, device_id: str | None = None
    ) -> list[dict[str, Any]]:
        def q(s: Any) -> Any:
            stmt = select(Visit).order_by(col(Visit.due_at))
            if status:
                stmt = stmt.where(Visit.status == status)
            if device_id:
                stmt = stmt.where(Visit.device_id == device_id)
            return s.exec(stmt).all()

        return [visit_json(v) for v in await service.db(ops.run, q)]

    @app.post("/api/visits/{visit_id}/acknowledge")
    async def acknowledge_visit(visit_id: int, body: VisitAck) -> dict[str, Any]:
        visit = await service.db(ops.acknowledge_visit, visit_id, body.by, service.clock())
        return visit_json(visit)

    @app.post("/api/visits/{visit_id}/close")
    async def close_visit(visit_id: int, body: VisitClose) -> dict[str, Any]:
        visit = await service.db(ops.close_visit, visit_id, body.by, body.outcome, service.clock())
        return visit_json(visit)

    return app
