"""The commissioning test: after pairing, prove the whole signed loop before going live.

Run automatically when a technician pairs a device, shown step by step on the pairing
page (``GET /api/pairing/{id}``)::

    connected      the device connected with its new certificate (status online)
    locked         it reports LOCKED
    armed          a signed test ``arm`` (a short window) is applied: ARMED
    camera_on      a signed test ``look`` (named after the technician, a few seconds):
                   the camera driver reports it on (video phone: the call rings)
    camera_off     ... and off again at the look's cap
    locked_again   a signed ``disarm``: LOCKED again

Only then is the device ``live`` (and, for a swap, the old device retired). While the test
runs, ``Device.hold_until`` keeps the reconciler from fighting it (a device with no plan
yet would otherwise be disarmed the moment it reports ARMED). The hold and the test arm
both expire on their own: a fleet that dies mid-test leaves a device that re-locks itself
and a reconciler that takes over again. Every command goes through the ledger, so the
test is signed, recorded and audited like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlmodel import Session, col, select

from tillsyn_protocol import CommandKind, DeviceKind, LockState

from . import audit
from .inventory import CommissioningRun, DeviceRecord, Lifecycle, RunStatus, add_history
from .models import Connectivity, Device, Look
from .outbound import Publish
from .pairing_errors import LifecycleRefused

if TYPE_CHECKING:
    from .pairing import Actor, Pairing

__all__ = ["STEPS", "Commissioner"]

log = logging.getLogger(__name__)

STEPS = ("connected", "locked", "armed", "camera_on", "camera_off", "locked_again")
_POLL_S = 0.25


class StepFailed(Exception):
    def __init__(self, step: str, why: str) -> None:
        super().__init__(f"{step}: {why}")
        self.step = step
        self.why = why


def _link_plan(session: Session, record: DeviceRecord) -> str | None:
    """Point the care plan (issue 3) at this device, if plans exist and the id matches."""
    if record.plan_id is None:
        return None
    try:
        from .plan_models import CarePlan
    except ImportError:  # pragma: no cover - plans not installed
        return None
    try:
        plan = session.get(CarePlan, int(record.plan_id))
    except ValueError:
        return "plan id is not a number"
    if plan is None:
        return f"plan {record.plan_id} not found"
    if plan.resident_id != record.resident_id:
        return f"plan {record.plan_id} is for another resident"
    plan.device_id = record.device_id
    session.add(plan)
    return None


class Commissioner:
    def __init__(self, pairing: Pairing) -> None:
        self.p = pairing
        self._running: dict[int, asyncio.Task[None]] = {}

    # --- database side -------------------------------------------------------------------

    def max_run_s(self) -> float:
        """No test can take longer than this (connect, then six bounded steps)."""
        s = self.p.settings
        return s.commissioning_connect_s + 8 * s.commissioning_step_s + s.commissioning_look_s

    def abandon_stale(self, session: Session, *, now: float) -> None:
        """Fail tests that cannot still be running: their fleet process stopped. (Only
        old ones: with replicas, a younger one may be running in another process.)"""
        stmt = select(CommissioningRun).where(
            col(CommissioningRun.status).in_([RunStatus.WAITING, RunStatus.RUNNING]),
            CommissioningRun.started_at < now - self.max_run_s(),
        )
        for run in session.exec(stmt):
            run.status, run.error, run.finished_at = RunStatus.FAILED, "fleet stopped", now
            session.add(run)
            device = session.get(Device, run.device_id)
            if device is not None:
                device.hold_until = None
                session.add(device)
            record = session.get(DeviceRecord, run.device_id)
            if record is not None and record.state is Lifecycle.COMMISSIONING:
                record.state = Lifecycle.FAILED
                session.add(record)

    @staticmethod
    def new_run(
        session: Session, device_id: str, actor: Actor, *, now: float
    ) -> tuple[int, int | None]:
        device = session.get(Device, device_id)
        record = session.get(DeviceRecord, device_id)
        if record is None or not actor.allows(device):
            raise LifecycleRefused("unknown_device", f"no device {device_id}", status=404)
        if record.state not in (Lifecycle.FAILED, Lifecycle.COMMISSIONING, Lifecycle.LIVE):
            raise LifecycleRefused("not_in_service", f"{device_id} is {record.state.value}")
        busy = session.exec(
            select(CommissioningRun.id).where(
                CommissioningRun.device_id == device_id,
                col(CommissioningRun.status).in_([RunStatus.WAITING, RunStatus.RUNNING]),
            )
        ).first()
        if busy is not None:
            raise LifecycleRefused("test_running", f"a test of {device_id} is already running")
        run = CommissioningRun(
            device_id=device_id,
            enrollment_id=record.enrollment_id,
            technician=actor.staff_id,
            started_at=now,
        )
        session.add(run)
        if record.state is Lifecycle.FAILED:
            record.state = Lifecycle.COMMISSIONING
            session.add(record)
        session.flush()
        assert run.id is not None
        return run.id, record.enrollment_id

    # --- running -------------------------------------------------------------------------

    def start(self, run_id: int) -> None:
        self._running[run_id] = self.p.spawn(self._run(run_id), name=f"commissioning:{run_id}")

    def task(self, run_id: int) -> asyncio.Task[None] | None:
        return self._running.get(run_id)

    async def _device(self, device_id: str) -> Device:
        found: Device | None = await self.p.db(lambda s: s.get(Device, device_id))
        assert found is not None
        return found

    async def _until(self, step: str, check: Callable[[], Any], within_s: float, why: str) -> Any:
        deadline = time.monotonic() + within_s
        while True:
            value = await check()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise StepFailed(step, why)
            await asyncio.sleep(_POLL_S)

    async def _issue(self, device_id: str, kind: CommandKind, actor: str, **kw: Any) -> None:
        ledger = self.p.service.ops.ledger

        def issue(session: Session) -> Publish:
            device = session.get(Device, device_id)
            assert device is not None
            return ledger.issue(session, device, kind, now=self.p.clock(), actor=actor, **kw)

        await self.p.service.publish([await self.p.db(issue)])

    async def _save(self, run_id: int, steps: list[dict[str, Any]], **fields: Any) -> None:
        def save(session: Session) -> None:
            run = session.get(CommissioningRun, run_id)
            assert run is not None
            run.steps = json.dumps(steps)
            for name, value in fields.items():
                setattr(run, name, value)
            session.add(run)

        await self.p.db(save)

    async def _run(self, run_id: int) -> None:
        run = await self.p.db(lambda s: s.get(CommissioningRun, run_id))
        assert run is not None
        device_id, technician = run.device_id, run.technician
        s = self.p.settings
        steps: list[dict[str, Any]] = []
        started = self.p.clock()

        async def ok(step: str, **detail: Any) -> None:
            steps.append({"step": step, "ok": True, "at": self.p.clock(), **detail})
            await self._save(run_id, steps, status=RunStatus.RUNNING)
            log.info("commissioning device=%s: %s", device_id, step)

        try:

            async def online() -> bool:
                d = await self._device(device_id)
                return d.connectivity is Connectivity.ONLINE and d.reported_at is not None

            await self._until(
                "connected", online, s.commissioning_connect_s, "the device did not connect"
            )
            await ok("connected")

            async def locked() -> bool:
                return (await self._device(device_id)).reported_state is LockState.LOCKED

            await self._until("locked", locked, s.commissioning_step_s, "it does not report LOCKED")
            await ok("locked")

            step_s = s.commissioning_step_s
            look_s = s.commissioning_look_s
            arm_s = int(2 * step_s + look_s + 5)
            await self._hold(device_id, self.p.clock() + arm_s + step_s)
            until = int(self.p.clock() + arm_s)
            await self._issue(device_id, CommandKind.ARM, technician, until=until)

            async def armed() -> bool:
                d = await self._device(device_id)
                return d.reported_state is not LockState.LOCKED and d.armed_until == until

            await self._until("armed", armed, step_s, "the test arm was not applied")
            await ok("armed", until=until)

            device = await self._device(device_id)
            look_id = await self._new_look(device_id, technician, look_s)
            await self._issue(
                device_id,
                CommandKind.LOOK,
                technician,
                staff=technician,
                max_s=look_s,
                look_id=look_id,
            )
            phone = device.kind is DeviceKind.VIDEO_PHONE

            async def look_row() -> Look | None:
                return await self.p.db(lambda s_: s_.get(Look, look_id))

            async def camera_on() -> bool:
                row = await look_row()
                if row is not None and row.end_reason and row.end_reason.startswith("refused"):
                    raise StepFailed(  # noqa: TRY301
                        "camera_on", f"the device refused the look ({row.end_reason})"
                    )
                return row is not None and row.started_at is not None

            await self._until("camera_on", camera_on, step_s, "the camera did not switch on")
            await ok("camera_on", look_id=look_id, call=phone)

            async def ended() -> Look | None:
                row = await look_row()
                return row if row is not None and row.ended_at is not None else None

            row = await self._until(
                "camera_off", ended, step_s + look_s, "the camera did not switch off"
            )
            detail: dict[str, Any] = {"duration_s": row.duration_s, "reason": row.end_reason}
            if phone:  # the call's outcome may arrive just after the look ended

                async def call_outcome() -> Look | None:
                    call = await look_row()
                    return call if call is not None and call.answered is not None else None

                with contextlib.suppress(StepFailed):
                    row = await self._until("camera_off", call_outcome, step_s, "no call outcome")
                detail["answered"] = row.answered
            await ok("camera_off", **detail)

            await self._issue(device_id, CommandKind.DISARM, technician)

            async def locked_again() -> bool:
                d = await self._device(device_id)
                return d.reported_state is LockState.LOCKED and d.armed_until is None

            await self._until("locked_again", locked_again, step_s, "the disarm was not applied")
            await ok("locked_again")
        except StepFailed as exc:
            await self._failed(run_id, device_id, steps, exc, technician)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must fail the test, never leave it hanging
            log.exception("commissioning of device=%s crashed", device_id)
            await self._failed(
                run_id, device_id, steps, StepFailed("internal", type(exc).__name__), technician
            )
            return
        await self._passed(run_id, device_id, steps, technician, started)

    async def _hold(self, device_id: str, until: float | None) -> None:
        def hold(session: Session) -> None:
            device = session.get(Device, device_id)
            assert device is not None
            device.hold_until = until
            session.add(device)

        await self.p.db(hold)

    async def _new_look(self, device_id: str, technician: str, max_s: int) -> str:
        look_id = secrets.token_hex(8)

        def add(session: Session) -> None:
            now = self.p.clock()
            session.add(
                Look(id=look_id, device_id=device_id, staff_id=technician, requested_at=now)
            )
            audit.append(
                session,
                ts=now,
                actor=technician,
                action="look.requested",
                subject=device_id,
                look_id=look_id,
                max_s=max_s,
                commissioning=True,
            )

        await self.p.db(add)
        return look_id

    async def _failed(
        self, run_id: int, device_id: str, steps: list[dict[str, Any]], exc: StepFailed, tech: str
    ) -> None:
        log.warning("commissioning of device=%s failed at %s: %s", device_id, exc.step, exc.why)
        steps.append({"step": exc.step, "ok": False, "at": self.p.clock(), "why": exc.why})
        now = self.p.clock()

        def fail(session: Session) -> None:
            run = session.get(CommissioningRun, run_id)
            record = session.get(DeviceRecord, device_id)
            device = session.get(Device, device_id)
            assert run is not None and record is not None and device is not None
            run.status, run.error, run.finished_at = RunStatus.FAILED, exc.why[:200], now
            run.steps = json.dumps(steps)
            session.add(run)
            if record.state is Lifecycle.COMMISSIONING:
                record.state = Lifecycle.FAILED
                session.add(record)
            device.hold_until = None
            session.add(device)
            add_history(
                session,
                device_id=device_id,
                serial=record.serial,
                ts=now,
                action="commissioning_failed",
                actor=tech,
                step=exc.step,
                why=exc.why,
            )
            audit.append(
                session,
                ts=now,
                actor=tech,
                action="device.commissioning",
                subject=device_id,
                result="failed",
                step=exc.step,
                why=exc.why,
            )

        await self.p.db(fail)
        # Whatever the test left behind, the reconciler now locks it (no plan: LOCKED).
        await self.p.service.reconcile([device_id])

    async def _passed(
        self, run_id: int, device_id: str, steps: list[dict[str, Any]], tech: str, started: float
    ) -> None:
        now = self.p.clock()

        def passed(session: Session) -> DeviceRecord:
            run = session.get(CommissioningRun, run_id)
            record = session.get(DeviceRecord, device_id)
            device = session.get(Device, device_id)
            assert run is not None and record is not None and device is not None
            run.status, run.finished_at = RunStatus.PASSED, now
            run.steps = json.dumps(steps)
            session.add(run)
            first = record.live_at is None
            record.state, record.live_at = Lifecycle.LIVE, record.live_at or now
            plan_note = _link_plan(session, record)
            session.add(record)
            device.hold_until = None
            session.add(device)
            add_history(
                session,
                device_id=device_id,
                serial=record.serial,
                ts=now,
                action="live" if first else "retested",
                actor=tech,
                plan=record.plan_id,
                plan_note=plan_note,
                seconds=round(now - started, 1),
            )
            audit.append(
                session,
                ts=now,
                actor=tech,
                action="device.commissioning",
                subject=device_id,
                result="passed",
                plan=record.plan_id,
                plan_note=plan_note,
            )
            return record

        record = await self.p.db(passed)
        if record.live_at == now:  # the first pass, not a re-test
            self.p.count("pairings", outcome="completed")
        log.info("device=%s is live", device_id)
        if record.replaces is not None:
            await self.p.lifecycle.complete_swap(record.replaces, device_id, tech)
        await self.p.service.reconcile([device_id])
