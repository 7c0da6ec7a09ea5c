"""Pairing: a technician turns a device's user code into a certified, commissioned device.

:class:`Pairing` is the pairing subsystem of the fleet service (one task group):

- ``pairing:enroll-https`` the device-facing enrollment listener (``fleet/api_enroll.py``);
- ``pairing:csr-link``     certificate renewal over MQTT (``fleet/renewal.py``);
- one task per commissioning test (``fleet/commissioning.py``).

The technician's operations (``lookup``, ``pair``, ``deny``) and the lifecycle ones
(``fleet/lifecycle.py``) are methods here, called by the API (``fleet/api_pairing.py``).
Database work runs on the service's single database thread; every refusal is audited in
its own transaction (the refused change itself is rolled back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sqlmodel import Session, col, select

from tillsyn_protocol.enrollment import (
    DeviceAuthorization,
    DeviceAuthorizationRequest,
    DeviceCredentials,
    TokenError,
)

from . import audit, enrollment
from .auth import Principal, Role
from .certs import DeviceCA, IssuedCert
from .inventory import (
    CertStatus,
    CommissioningRun,
    DeviceCertificate,
    DeviceHistory,
    DeviceRecord,
    Enrollment,
    EnrollmentStatus,
    Lifecycle,
    add_history,
)
from .models import Connectivity, Device
from .pairing_errors import CodeRefused, LifecycleRefused, PairingRefused

if TYPE_CHECKING:
    from .service import FleetService

__all__ = ["Actor", "PairRequest", "Pairing", "approve", "lookup"]

log = logging.getLogger(__name__)
T = TypeVar("T")

WIDE_ROLES = frozenset({Role.IT_ADMIN, Role.AUDITOR})
HOUSEKEEPING_S = 30.0
ENDED = (Lifecycle.RETIRED, Lifecycle.SWAPPED_OUT, Lifecycle.RETURNED)


@dataclass(frozen=True, slots=True)
class PairRequest:
    code: str
    resident_id: str | None = None
    plan_id: str | None = None
    serial: str | None = None  # what the technician reads on the device's label
    site: str | None = None
    team: str | None = None
    replaces: str | None = None  # swap: the device this one replaces on the same plan


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts, and which devices they may act on (mirrors ``fleet/scope.py``: IT admins
    and auditors fleet-wide where the endpoint admits them, technicians their teams)."""

    principal: Principal
    fleet_wide: bool = False

    @classmethod
    def admitted(cls, principal: Principal, roles: frozenset[Role]) -> Actor:
        return cls(principal, bool(principal.roles & roles & WIDE_ROLES))

    @property
    def staff_id(self) -> str:
        return self.principal.staff_id

    def allows(self, device: Device | None) -> bool:
        if device is None:
            return False
        if self.fleet_wide:
            return True
        team = getattr(device, "team", None)
        return team is not None and team in self.principal.teams

    def default_team(self, asked: str | None) -> str | None:
        if asked is not None:
            if not self.fleet_wide and asked not in self.principal.teams:
                raise PairingRefused("team_not_yours", f"you are not in team {asked}", status=403)
            return asked
        teams = sorted(self.principal.teams)
        return teams[0] if len(teams) == 1 else None


# --- synchronous operations (database thread) ----------------------------------------------


def lookup(session: Session, code: str, *, now: float) -> dict[str, Any]:
    row = enrollment.find_for_technician(session, code, now=now)
    return {
        "serial": row.serial,
        "kind": row.kind.value,
        "firmware": row.firmware,
        "device_id": row.device_id,
        "expires_in": max(0, int(row.expires_at - now)),
    }


def approve(
    session: Session, req: PairRequest, actor: Actor, *, ca: DeviceCA, now: float
) -> tuple[Enrollment, DeviceRecord, IssuedCert, int]:
    """Everything a pairing decides, in one transaction; returns the commissioning run id."""
    row = enrollment.find_for_technician(session, req.code, now=now)
    if req.serial is not None and req.serial != row.serial:
        raise CodeRefused(
            "serial_mismatch",
            f"the device with this code reports serial {row.serial}, not {req.serial}",
            status=409,
        )
    live = enrollment.live_elsewhere(session, row.serial)
    if live is not None:
        raise PairingRefused(
            "serial_live",
            f"serial {row.serial} is already in service as {live.device_id} "
            f"(site {live.site or '-'}): retire or swap that device first",
            status=409,
        )
    resident, plan, site, team = req.resident_id, req.plan_id, req.site, req.team
    if req.replaces is not None:
        old = session.get(DeviceRecord, req.replaces)
        old_device = session.get(Device, req.replaces)
        if old is None or not actor.allows(old_device):
            raise LifecycleRefused(
                "unknown_device", f"no device {req.replaces} to replace", status=404
            )
        if old.state not in (Lifecycle.LIVE, Lifecycle.FAILED, Lifecycle.COMMISSIONING):
            raise LifecycleRefused(
                "not_in_service", f"{req.replaces} is {old.state.value}: nothing to swap"
            )
        if old.replaced_by is not None:
            raise LifecycleRefused(
                "swap_pending", f"{req.replaces} is already being replaced by {old.replaced_by}"
            )
        resident = resident or old.resident_id
        plan = plan or old.plan_id
        site = site or old.site
        team = team or (getattr(old_device, "team", None) if old_device else None)
    if resident is None:
        raise PairingRefused("resident_missing", "say which resident the device is for")
    team = actor.default_team(team)
    csr, device_id = ca.check_enrollment_csr(row.csr)
    if device_id != row.device_id or session.get(Device, device_id) is not None:
        raise PairingRefused("key_already_paired", "this device key is already paired", status=409)
    issued = ca.issue(csr, device_id, now)

    device = Device(id=device_id, kind=row.kind, resident_id=resident, site=site)
    if team is not None and hasattr(device, "team"):
        device.team = team
    session.add(device)
    session.flush()
    record = DeviceRecord(
        device_id=device_id,
        serial=row.serial,
        kind=row.kind,
        site=site,
        resident_id=resident,
        plan_id=plan,
        state=Lifecycle.COMMISSIONING,
        enrollment_id=row.id,
        paired_at=now,
        paired_by=actor.staff_id,
        replaces=req.replaces,
    )
    session.add(record)
    session.add(
        DeviceCertificate(
            serial=issued.serial,
            device_id=device_id,
            status=CertStatus.ACTIVE,
            not_before=issued.not_before,
            not_after=issued.not_after,
            renew_after=issued.renew_after,
            issued_at=now,
            public_key_sha256=issued.public_key_sha256,
            pem=issued.pem,
        )
    )
    if req.replaces is not None:
        old_record = session.get(DeviceRecord, req.replaces)
        assert old_record is not None
        old_record.replaced_by = device_id
        session.add(old_record)
    row.status, row.decided_at, row.decided_by = EnrollmentStatus.APPROVED, now, actor.staff_id
    row.cert_serial = issued.serial
    session.add(row)
    run = CommissioningRun(
        device_id=device_id, enrollment_id=row.id, technician=actor.staff_id, started_at=now
    )
    session.add(run)
    session.flush()
    assert run.id is not None
    add_history(
        session,
        device_id=device_id,
        serial=row.serial,
        ts=now,
        action="paired",
        actor=actor.staff_id,
        resident=resident,
        plan=plan,
        site=site,
        cert=issued.serial,
        replaces=req.replaces,
    )
    audit.append(
        session,
        ts=now,
        actor=actor.staff_id,
        action="device.paired",
        subject=device_id,
        serial=row.serial,
        kind=row.kind.value,
        resident=resident,
        plan=plan,
        site=site,
        team=team,
        cert=issued.serial,
        not_after=issued.not_after,
        replaces=req.replaces,
    )
    return row, record, issued, run.id


def deny(session: Session, code: str, actor: Actor, *, now: float) -> Enrollment:
    row = enrollment.find_for_technician(session, code, now=now)
    row.status, row.decided_at, row.decided_by = EnrollmentStatus.DENIED, now, actor.staff_id
    session.add(row)
    audit.append(
        session,
        ts=now,
        actor=actor.staff_id,
        action="enroll.denied",
        subject=row.device_id,
        serial=row.serial,
    )
    return row


def audit_refusal(
    session: Session,
    exc: PairingRefused,
    *,
    actor: str,
    subject: str | None,
    now: float,
    action: str = "pairing.refused",
    **kw: Any,
) -> None:
    audit.append(
        session,
        ts=now,
        actor=actor,
        action=action,
        subject=subject,
        reason=exc.reason,
        why=exc.why,
        **kw,
    )


def pairing_view(session: Session, enrollment_id: int, actor: Actor) -> dict[str, Any]:
    row = session.get(Enrollment, enrollment_id)
    device = session.get(Device, row.device_id) if row else None
    if row is None or row.status not in (EnrollmentStatus.APPROVED, EnrollmentStatus.DELIVERED):
        raise LifecycleRefused("unknown_pairing", f"no pairing {enrollment_id}", status=404)
    if not actor.allows(device) and row.decided_by != actor.staff_id:
        raise LifecycleRefused("unknown_pairing", f"no pairing {enrollment_id}", status=404)
    record = session.get(DeviceRecord, row.device_id)
    run = session.exec(
        select(CommissioningRun)
        .where(CommissioningRun.device_id == row.device_id)
        .order_by(col(CommissioningRun.id).desc())
    ).first()
    return {
        "pairing_id": row.id,
        "device_id": row.device_id,
        "serial": row.serial,
        "kind": row.kind.value,
        "state": record.state.value if record else None,
        "credentials_delivered": row.status is EnrollmentStatus.DELIVERED,
        "connectivity": device.connectivity.value if device else None,
        "reported_state": device.reported_state.value if device else None,
        "commissioning": None
        if run is None
        else {
            "run_id": run.id,
            "status": run.status.value,
            "steps": run.step_list(),
            "error": run.error,
        },
    }


def device_view(session: Session, device_id: str, actor: Actor) -> dict[str, Any]:
    from .inventory import inventory_rows

    device = session.get(Device, device_id)
    if not actor.allows(device):
        raise LifecycleRefused("unknown_device", f"no device {device_id}", status=404)
    rows = inventory_rows(session, device_ids=[device_id])
    certs = session.exec(
        select(DeviceCertificate)
        .where(DeviceCertificate.device_id == device_id)
        .order_by(col(DeviceCertificate.issued_at))
    ).all()
    record = session.get(DeviceRecord, device_id)
    serial = record.serial if record else None
    history_stmt = select(DeviceHistory).order_by(col(DeviceHistory.ts), col(DeviceHistory.id))
    if serial is not None:
        # The hardware's whole life: every installation of this serial.
        history_stmt = history_stmt.where(
            (DeviceHistory.serial == serial) | (DeviceHistory.device_id == device_id)
        )
    else:
        history_stmt = history_stmt.where(DeviceHistory.device_id == device_id)
    history = session.exec(history_stmt).all()
    return {
        **rows[0],
        "certificates": [c.model_dump(mode="json", exclude={"pem"}) for c in certs],
        "history": [h.model_dump(mode="json") for h in history],
    }


# --- the subsystem ---------------------------------------------------------------------------


class Pairing:
    """Pairing, certificates and the equipment lifecycle inside one fleet service."""

    def __init__(self, service: FleetService) -> None:
        from .commissioning import Commissioner
        from .lifecycle import Lifecycles
        from .renewal import RenewalLink

        self.service = service
        self.settings = service.settings.pairing
        assert self.settings.pki_dir is not None
        self.ca = DeviceCA(service.settings, command_key_pem=service.key.public_pem().decode())
        s = self.settings
        self.guesses = enrollment.GuessLimiter(
            per_staff=s.guess_limit_per_staff, total=s.guess_limit_global, window_s=s.guess_window_s
        )
        # Unauthenticated requests: bounded per address and in total (each is audited).
        self.enroll_limiter = enrollment.GuessLimiter(per_staff=10, total=120, window_s=60.0)
        self.commissioner = Commissioner(self)
        self.lifecycle = Lifecycles(self)
        self.renewals = RenewalLink(self)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._enroll_server: Any = None
        self.enroll_port: int | None = self.settings.enroll_port or None  # bound port (0: any)
        self.enroll_listening = False

    # --- plumbing ------------------------------------------------------------------------

    async def db(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        def call(session: Session) -> T:
            return fn(session, *args, **kw)

        return await self.service.db(self.service.ops.run, call)

    def clock(self) -> float:
        return self.service.clock()

    def count(self, metric: str, **labels: str) -> None:
        """Increment a counter of :class:`fleet.metrics.FleetMetrics` if it exists."""
        counter = getattr(self.service.metrics, metric, None)
        if counter is not None:
            counter.labels(**labels).inc()

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def refused(
        self, exc: PairingRefused, *, actor: str, subject: str | None = None, **kw: Any
    ) -> None:
        """Audit a refusal in its own transaction, count it."""
        await self.db(audit_refusal, exc, actor=actor, subject=subject, now=self.clock(), **kw)
        outcome = "expired" if exc.reason == "code_expired" else "refused"
        self.count("pairings", outcome=outcome)
        log.info("pairing refused for %s: %s", actor, exc.reason)

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._housekeeping(), name="pairing:housekeeping")
                tg.create_task(self.renewals.run(), name="pairing:csr-link")
                if self.settings.enroll_port is not None:
                    from .api_enroll import serve_enrollment

                    tg.create_task(serve_enrollment(self), name="pairing:enroll-https")
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait(list(self._tasks), timeout=5)

    async def _housekeeping(self) -> None:
        """Fail commissioning tests whose fleet process died (at start, then each minute)."""
        while True:
            try:
                await self.db(self.commissioner.abandon_stale, now=self.clock())
                await self.db(enrollment.prune, now=self.clock())
                await self._kick_revoked()
            except Exception:  # never let housekeeping end the subsystem
                log.exception("pairing housekeeping failed")
            await asyncio.sleep(HOUSEKEEPING_S)

    async def _kick_revoked(self) -> None:
        """Backstop: a device whose service ended but that is online again (the broker
        had not reloaded its CRL in time) is reloaded and kicked again."""

        def online_but_ended(session: Session) -> list[str]:
            stmt = (
                select(Device.id)
                .join(DeviceRecord, col(DeviceRecord.device_id) == col(Device.id))
                .where(
                    col(DeviceRecord.state).in_(ENDED),
                    Device.connectivity == Connectivity.ONLINE,
                )
            )
            return list(session.exec(stmt).all())

        for device_id in await self.db(online_but_ended):
            log.error("device=%s is online although its service ended: kicking it", device_id)
            await self.ca.revoke_and_disconnect([], disconnect=device_id)

    # --- device side (enrollment endpoint) -----------------------------------------------

    async def authorize(
        self, request: DeviceAuthorizationRequest, peer: str | None
    ) -> DeviceAuthorization:
        key = peer or "?"
        if self.enroll_limiter.blocked(key) is not None:
            raise PairingRefused("slow_down", "too many enrollment requests", status=429)
        self.enroll_limiter.wrong(key)  # every request counts here, not only bad ones
        try:
            return await self.db(
                enrollment.authorize, request, ca=self.ca, now=self.clock(), peer=peer
            )
        except PairingRefused as exc:
            refusal = exc
        await self.db(
            audit_refusal,
            refusal,
            actor="enroll",
            subject=request.serial,
            now=self.clock(),
            action="enroll.refused",
            peer=peer,
        )
        log.info("enrollment of serial %s refused: %s", request.serial, refusal.reason)
        raise refusal

    async def token(self, device_code: str) -> DeviceCredentials | TokenError:
        return await self.db(enrollment.poll, device_code, ca=self.ca, now=self.clock())

    # --- technician side -----------------------------------------------------------------

    async def _guarded(
        self, actor: Actor, code: str, fn: Callable[..., T], *args: Any, **kw: Any
    ) -> T:
        wait = self.guesses.blocked(actor.staff_id)
        if wait is not None:
            exc = CodeRefused(
                "rate_limited",
                f"too many wrong codes: wait {int(wait) + 1} s before trying again",
                status=429,
            )
            await self.refused(exc, actor=actor.staff_id)
            raise exc
        try:
            return await self.db(fn, *args, **kw)
        except PairingRefused as exc:
            if exc.reason == "wrong_code":
                self.guesses.wrong(actor.staff_id)
            await self.refused(exc, actor=actor.staff_id, code_tail=code[-2:] if code else None)
            raise

    async def lookup(self, actor: Actor, code: str) -> dict[str, Any]:
        return await self._guarded(actor, code, lookup, code, now=self.clock())

    async def deny(self, actor: Actor, code: str) -> dict[str, Any]:
        row = await self._guarded(actor, code, deny, code, actor, now=self.clock())
        return {"device_id": row.device_id, "serial": row.serial, "status": row.status.value}

    async def pair(self, actor: Actor, req: PairRequest) -> dict[str, Any]:
        now = self.clock()
        row, record, issued, run_id = await self._guarded(
            actor, req.code, approve, req, actor, ca=self.ca, now=now
        )
        self.count("pairings", outcome="started")
        self.service.ingest.known.add(record.device_id)
        self.service.liveness.baseline(record.device_id, now, online=False)
        self.commissioner.start(run_id)
        log.info(
            "paired device=%s (serial %s) by %s", record.device_id, record.serial, actor.staff_id
        )
        assert row.id is not None
        return {
            "pairing_id": row.id,
            "device_id": record.device_id,
            "serial": record.serial,
            "kind": record.kind.value,
            "resident_id": record.resident_id,
            "plan_id": record.plan_id,
            "site": record.site,
            "state": record.state.value,
            "cert_serial": issued.serial,
            "cert_not_after": issued.not_after,
            "replaces": record.replaces,
        }

    async def status(self, actor: Actor, pairing_id: int) -> dict[str, Any]:
        return await self.db(pairing_view, pairing_id, actor)

    async def retest(self, actor: Actor, device_id: str) -> dict[str, Any]:
        run_id, pairing_id = await self.db(
            self.commissioner.new_run, device_id, actor, now=self.clock()
        )
        self.commissioner.start(run_id)
        return {"device_id": device_id, "run_id": run_id, "pairing_id": pairing_id}

    async def device(self, actor: Actor, device_id: str) -> dict[str, Any]:
        return await self.db(device_view, device_id, actor)
