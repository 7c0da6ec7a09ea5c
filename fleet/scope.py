"""Who may see which devices: roles and teams, applied to every device-scoped endpoint.

IT admins and auditors act fleet-wide. Night staff and technicians act only on devices whose
``team`` is one of their account's teams; a device with no team is visible to IT admins
(and auditors) only. A device outside the caller's scope answers 404, exactly like one that
does not exist, so a wrong-team request learns nothing.

The scope depends on the roles an endpoint admits: a person who is both auditor and night
staff gets the fleet-wide view where auditors are admitted and their teams' view where only
night staff are (``scoped(Role.NIGHT_STAFF)`` for starting a look).

Usage::

    @router.get("/api/things/{device_id}")
    async def thing(device_id: str, scope: Annotated[Scope, Depends(scoped(Role.IT_ADMIN))]):
        device = await service.db(ops.run, lambda s: scope.device(s, device_id))
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Depends
from sqlalchemy.sql import Select
from sqlmodel import Session, col, select

from .auth import Principal, Role, require
from .errors import NotFound
from .models import Device

WIDE_ROLES = frozenset({Role.IT_ADMIN, Role.AUDITOR})
S = TypeVar("S", bound=Select[Any])


@dataclass(frozen=True, slots=True)
class Scope:
    principal: Principal
    fleet_wide: bool

    @property
    def staff_id(self) -> str:
        return self.principal.staff_id

    def allows(self, device: Device | None) -> bool:
        if self.fleet_wide:
            return True
        return device is not None and device.team is not None and device.team in self.teams

    @property
    def teams(self) -> frozenset[str]:
        return self.principal.teams

    def device(self, session: Session, device_id: str) -> Device:
        """The device if it exists and is in scope, else :class:`NotFound`."""
        device = session.get(Device, device_id)
        if device is None or not self.allows(device):
            raise NotFound("device", device_id)
        return device

    def device_ids(self, session: Session) -> set[str] | None:
        """Devices in scope (``None``: all of them)."""
        if self.fleet_wide:
            return None
        stmt = select(Device.id).where(col(Device.team).in_(sorted(self.teams)))
        return set(session.exec(stmt).all())

    def where_device(self, stmt: S, device_id_column: Any) -> S:
        """Restrict a select over rows with a device id column to devices in scope."""
        if self.fleet_wide:
            return stmt
        in_teams = select(Device.id).where(col(Device.team).in_(sorted(self.teams)))
        return stmt.where(col(device_id_column).in_(in_teams))


ScopeDependency = Callable[..., Coroutine[Any, Any, Scope]]


def scoped(*roles: Role) -> ScopeDependency:
    """FastAPI dependency: the caller's :class:`Scope` for an endpoint admitting ``roles``."""
    admitted = frozenset(roles)
    authenticated = Depends(require(*roles))  # a default, not an annotation: ``roles`` is local

    async def dependency(principal: Principal = authenticated) -> Scope:
        return Scope(principal, bool(principal.roles & admitted & WIDE_ROLES))

    dependency.roles = admitted  # type: ignore[attr-defined]  # read by the policy test
    return dependency
