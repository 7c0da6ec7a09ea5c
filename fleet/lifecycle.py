"""Equipment lifecycle: retire, swap and return, each revoking and re-locking.

Every end of service goes the same way (:meth:`Lifecycles.end_service`):

1. the device's windows are switched off and its care plan unlinked (nothing will arm it);
2. a signed ``disarm`` is sent, and if the device is online the fleet waits (bounded)
   for it to report LOCKED: *re-locked if reachable*;
3. its certificates are revoked, the CRL is published to Mosquitto and verified live,
   and its open MQTT session is taken over and closed (``fleet/certs.py``);
4. the record and history say what happened, and who did it; the audit log too.

A **swap** pairs the replacement first (``tillsyn device swap OLD CODE``): the new device
inherits resident, plan, site and team; when its commissioning test passes, the old
device's windows and plan move to it and the old device ends its service as
``swapped_out``. Until then the old device keeps working: a failed replacement never
leaves a resident without supervision. A **return** puts the hardware back in stock:
it ends the service first if needed, then drops the resident link (the history keeps it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from sqlmodel import Session, col, select

from tillsyn_protocol import CommandKind, LockState

from . import audit
from .certs import RevocationResult
from .inventory import CertStatus, DeviceCertificate, DeviceRecord, Lifecycle, add_history
from .models import Connectivity, Device, Window
from .outbound import Publish
from .pairing_errors import LifecycleRefused
from .query import among

if TYPE_CHECKING:
    from .pairing import Actor, Pairing, PairRequest

__all__ = ["Lifecycles"]

log = logging.getLogger(__name__)

RELOCK_WAIT_S = 15.0
_POLL_S = 0.25
_ENDED = {"retired": Lifecycle.RETIRED, "swapped_out": Lifecycle.SWAPPED_OUT}
_METRIC_REASON = {"retired": "retired", "swapped_out": "swapped", "returned": "returned"}


def _unlink_plans(session: Session, device_id: str) -> list[int]:
    try:
        from .plan_models import CarePlan
    except ImportError:  # pragma: no cover - plans not installed
        return []
    moved = []
    for plan in session.exec(select(CarePlan).where(CarePlan.device_id == device_id)):
        plan.device_id = None
        session.add(plan)
        if plan.id is not None:
            moved.append(plan.id)
    return moved


class Lifecycles:
    def __init__(self, pairing: Pairing) -> None:
        self.p = pairing

    # --- database side -------------------------------------------------------------------

    def _prepare_end(
        self, session: Session, device_id: str, actor: Actor | None, *, now: float, why: str
    ) -> tuple[Publish | None, bool, list[str]]:
        """Stop arming it, send a disarm; returns (disarm, online, certificate serials)."""
        device = session.get(Device, device_id)
        record = session.get(DeviceRecord, device_id)
        if record is None or (actor is not None and not actor.allows(device)):
            raise LifecycleRefused("unknown_device", f"no paired device {device_id}", status=404)
        if record.state not in (Lifecycle.LIVE, Lifecycle.COMMISSIONING, Lifecycle.FAILED):
            raise LifecycleRefused("not_in_service", f"{device_id} is already {record.state.value}")
        assert device is not None
        for window in session.exec(select(Window).where(Window.device_id == device_id)):
            if window.active:
                window.active = False
                session.add(window)
        _unlink_plans(session, device_id)
        device.hold_until = None
        session.add(device)
        pub = None
        if device.reported_state is not LockState.LOCKED or device.connectivity is (
            Connectivity.ONLINE
        ):
            pub = self.p.service.ops.ledger.issue(
                session, device, CommandKind.DISARM, now=now, actor=actor.staff_id if actor else why
            )
        serials = session.exec(
            select(DeviceCertificate.serial).where(
                DeviceCertificate.device_id == device_id,
                col(DeviceCertificate.status).in_([CertStatus.ACTIVE, CertStatus.PENDING]),
            )
        ).all()
        return pub, device.connectivity is Connectivity.ONLINE, list(serials)

    @staticmethod
    def _finish_end(
        session: Session,
        device_id: str,
        staff: str,
        *,
        now: float,
        why: str,
        relocked: bool,
        result: RevocationResult,
        replaced_by: str | None,
    ) -> DeviceRecord:
        record = session.get(DeviceRecord, device_id)
        assert record is not None
        record.state = _ENDED.get(why, Lifecycle.RETIRED)
        record.ended_at, record.ended_by = now, staff
        if replaced_by is not None:
            record.replaced_by = replaced_by
        session.add(record)
        for cert in session.exec(
            select(DeviceCertificate).where(among(DeviceCertificate.serial, list(result.serials)))
        ):
            cert.status, cert.ended_at, cert.reason = CertStatus.REVOKED, now, why[:32]
            session.add(cert)
        add_history(
            session,
            device_id=device_id,
            serial=record.serial,
            ts=now,
            action=why,
            actor=staff,
            relocked=relocked,
            replaced_by=replaced_by,
            resident=record.resident_id,
            **result.as_dict(),
        )
        audit.append(
            session,
            ts=now,
            actor=staff,
            action="device.ended",
            subject=device_id,
            why=why,
            relocked=relocked,
            replaced_by=replaced_by,
            **result.as_dict(),
        )
        return record

    @staticmethod
    def _mark_returned(session: Session, device_id: str, staff: str, *, now: float) -> None:
        record = session.get(DeviceRecord, device_id)
        device = session.get(Device, device_id)
        assert record is not None and device is not None
        resident = record.resident_id
        record.state = Lifecycle.RETURNED
        record.ended_at = record.ended_at or now
        record.ended_by = record.ended_by or staff
        record.resident_id = None
        record.plan_id = None
        record.site = None
        device.resident_id = None
        device.site = None
        session.add(record)
        session.add(device)
        add_history(
            session,
            device_id=device_id,
            serial=record.serial,
            ts=now,
            action="returned",
            actor=staff,
            resident=resident,
        )
        audit.append(session, ts=now, actor=staff, action="device.returned", subject=device_id)

    @staticmethod
    def _move_to(session: Session, old_id: str, new_id: str, *, now: float, staff: str) -> None:
        """The replacement takes over the old device's windows and care plans."""
        moved = 0
        for window in session.exec(select(Window).where(Window.device_id == old_id)):
            if window.active:
                window.device_id = new_id
                session.add(window)
                moved += 1
        plans = []
        try:
            from .plan_models import CarePlan

            for plan in session.exec(select(CarePlan).where(CarePlan.device_id == old_id)):
                plan.device_id = new_id
                session.add(plan)
                plans.append(plan.id)
        except ImportError:  # pragma: no cover - plans not installed
            pass
        new = session.get(DeviceRecord, new_id)
        assert new is not None
        add_history(
            session,
            device_id=new_id,
            serial=new.serial,
            ts=now,
            action="swapped_in",
            actor=staff,
            replaces=old_id,
            windows=moved,
            plans=plans,
        )

    # --- operations ----------------------------------------------------------------------

    async def _wait_locked(self, device_id: str) -> bool:
        deadline = time.monotonic() + RELOCK_WAIT_S
        while time.monotonic() < deadline:
            device = await self.p.db(lambda s: s.get(Device, device_id))
            if (
                device is not None
                and device.reported_state is LockState.LOCKED
                and (device.armed_until is None)
            ):
                return True
            if device is None or device.connectivity is not Connectivity.ONLINE:
                return False
            await asyncio.sleep(_POLL_S)
        return False

    async def end_service(
        self,
        actor: Actor | None,
        device_id: str,
        *,
        why: str,
        staff: str,
        replaced_by: str | None = None,
        metric_reason: str | None = None,
    ) -> dict[str, Any]:
        now = self.p.clock()
        try:
            pub, online, serials = await self.p.db(
                self._prepare_end, device_id, actor, now=now, why=why
            )
        except LifecycleRefused as exc:
            await self.p.refused(exc, actor=staff, subject=device_id)
            raise
        relocked = False
        if pub is not None:
            await self.p.service.publish([pub])
            if online:
                relocked = await self._wait_locked(device_id)
        else:
            relocked = True  # reported LOCKED and not online: nothing to re-lock
        result = await self.p.ca.revoke_and_disconnect(serials, disconnect=device_id)
        record = await self.p.db(
            self._finish_end,
            device_id,
            staff,
            now=self.p.clock(),
            why=why,
            relocked=relocked,
            result=result,
            replaced_by=replaced_by,
        )
        for _ in serials:
            self.p.count("revocations", reason=metric_reason or _METRIC_REASON.get(why, "other"))
        await self.p.service.reconcile([device_id])
        log.info("device=%s %s (relocked=%s)", device_id, why, relocked)
        return {
            "device_id": device_id,
            "state": record.state.value,
            "relocked": relocked,
            **result.as_dict(),
        }

    async def retire(self, actor: Actor, device_id: str) -> dict[str, Any]:
        return await self.end_service(actor, device_id, why="retired", staff=actor.staff_id)

    async def return_equipment(self, actor: Actor, device_id: str) -> dict[str, Any]:
        record = await self.p.db(lambda s: s.get(DeviceRecord, device_id))
        device = await self.p.db(lambda s: s.get(Device, device_id))
        if record is None or not actor.allows(device):
            exc = LifecycleRefused("unknown_device", f"no paired device {device_id}", status=404)
            await self.p.refused(exc, actor=actor.staff_id, subject=device_id)
            raise exc
        if record.state is Lifecycle.RETURNED:
            exc = LifecycleRefused("already_returned", f"{device_id} was already returned")
            await self.p.refused(exc, actor=actor.staff_id, subject=device_id)
            raise exc
        result: dict[str, Any] = {}
        if record.state in (Lifecycle.LIVE, Lifecycle.COMMISSIONING, Lifecycle.FAILED):
            result = await self.end_service(
                actor, device_id, why="retired", staff=actor.staff_id, metric_reason="returned"
            )
        await self.p.db(self._mark_returned, device_id, actor.staff_id, now=self.p.clock())
        return {**result, "device_id": device_id, "state": Lifecycle.RETURNED.value}

    async def swap(self, actor: Actor, old_id: str, req: PairRequest) -> dict[str, Any]:
        """Pair the replacement now; the old device ends when the new one is live."""
        from dataclasses import replace

        return await self.p.pair(actor, replace(req, replaces=old_id))

    async def complete_swap(self, old_id: str, new_id: str, staff: str) -> None:
        await self.p.db(self._move_to, old_id, new_id, now=self.p.clock(), staff=staff)
        try:
            await self.end_service(None, old_id, why="swapped_out", staff=staff, replaced_by=new_id)
        except LifecycleRefused as exc:  # already ended by hand meanwhile
            log.info("swap of %s: %s", old_id, exc.why)
