"""The service's database-side operations: synchronous, given ``now``, returning what to publish.

Everything here runs on the service's single database thread, so the event loop never
blocks on the database and no two operations race on the same rows.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from tillsyn_protocol import (
    Ack,
    AckResult,
    CameraHealth,
    CommandKind,
    Event,
    EventKind,
    Heartbeat,
    LockState,
    SigningKey,
    StateReport,
    Status,
)

from . import (
    audit,
    audit_batch,
    batch,
    checks,
    gauges,
    snapshot,
    video_phone,
    visits,
    writeback,
)
from .batch import Applied, Inbound
from .commands import Ledger, batched, unconfirmed
from .db import keep
from .errors import Conflict, NotFound
from .liveness import Seen
from .metrics import UNLABELLED_REFUSAL, FleetMetrics
from .models import Command, CommandStatus, Connectivity, Device, Look, Visit, Window
from .outbound import Publish
from .plan_models import Check, Outcome
from .reconcile import (
    Policy,
    arm_ahead,
    device_spans,
    next_edge,
    open_span,
    reconcile_device,
)

log = logging.getLogger(__name__)
_LOADED = "tillsyn.devices"  # apply_inbound's devices by id, for :meth:`FleetOps._device`
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Reconciled:
    publish: list[Publish]
    next_edges: dict[str, float | None]


class FleetOps:
    def __init__(
        self, engine: Engine, key: SigningKey, metrics: FleetMetrics, policy: Policy
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.policy = policy
        self.ledger = Ledger(key, metrics)
        self._gauge_labels: dict[str, set[str]] = {}  # label values exported, between sweeps
        # Whether this replica sends commands (the scheduler leader); the service sets it.
        self.leading: Callable[[], bool] = lambda: True

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session
            session.commit()

    def run(self, fn: Callable[[Session], T]) -> T:
        with self.session() as session:
            return fn(session)

    def _device(self, session: Session, device_id: str) -> Device:
        # A batch of device messages loads its devices at once (apply_inbound): looked up
        # there, as ``session.get`` costs ~25 us, twice per device at a window start.
        loaded: dict[str, Device] | None = session.info.get(_LOADED)
        device = loaded.get(device_id) if loaded is not None else None
        if device is None:
            device = session.get(Device, device_id)
        if device is None:
            raise NotFound("device", device_id)
        return device

    # --- reconciliation --------------------------------------------------------------

    def reconcile(self, device_ids: list[str] | None, now: float) -> Reconciled:
        """Reconcile these devices (``None``: all) in one transaction: what they need is
        read in a few batched queries (``fleet.snapshot``), then each device is decided on
        its own, as if alone."""
        out: list[Publish] = []
        with self.session() as session:
            if device_ids is None:  # a full pass also rolls care-plan checks forward
                out += checks.ensure_synced(session, self.check_ctx, now)
            horizon = max(self.policy.visit_horizon_s, self.policy.preflight_s)
            loaded = snapshot.load(session, device_ids, now, horizon + 1)
            with audit_batch.buffered(session), batched(session), writeback.batch(session):
                for data in loaded.values():
                    out += reconcile_device(
                        session, self.ledger, self.metrics, self.policy, data, now
                    )
            ids = None if device_ids is None else list(loaded)
            due = snapshot.deadlines(session, ids, now) if loaded else {}
            edges = {
                d: next_edge(data, now, self.policy, due.get(d, ())) for d, data in loaded.items()
            }
        return Reconciled(out, edges)

    def presign(self, device_ids: list[str], at: float) -> int:
        """Sign ahead the arms these devices' edge at ``at`` is expected to issue (read
        only: nothing is recorded or sent before the edge); returns how many."""
        with self.session() as session:
            loaded = snapshot.load(session, device_ids, at, 1.0)
            arms = [a for data in loaded.values() if (a := arm_ahead(data, at)) is not None]
        return self.ledger.presign(arms, at)

    def begin_full_pass(self, now: float) -> tuple[list[Publish], list[str]]:
        """A full pass in parts (the service's sweep): care-plan checks rolled forward, and
        every device id, to be reconciled a part at a time (:meth:`reconcile`)."""
        self.ledger.forget_presigned(now)
        with self.session() as session:
            out = checks.ensure_synced(session, self.check_ctx, now)
            ids = list(session.exec(select(Device.id).order_by(col(Device.id))))
        return out, ids

    @property
    def check_ctx(self) -> checks.Ctx:
        return checks.Ctx(self.metrics, self.policy.preflight_s)

    def resend(self, now: float, resend_after_s: float) -> list[Publish]:
        with self.session() as session:
            return self.ledger.due(session, now, resend_after_s)

    # --- ingest (non-heartbeat) ------------------------------------------------------

    def known_devices(self) -> list[tuple[str, float | None, bool, CameraHealth | None]]:
        with self.session() as session:
            stmt = select(Device.id, Device.last_seen, Device.connectivity, Device.camera)
            rows = session.exec(stmt).all()
            return [
                (d, seen, c == Connectivity.ONLINE, CameraHealth(cam) if cam else None)
                for d, seen, c, cam in rows
            ]

    def on_status(self, device_id: str, status: Status, now: float) -> list[str]:
        """Returns the devices to reconcile now."""
        with self.session() as session:
            return self._status(session, self._device(session, device_id), status, now)

    def _status(self, session: Session, device: Device, status: Status, now: float) -> list[str]:
        if status.status == "online":
            device.boot_id = status.boot_id
            device.firmware = status.fw or device.firmware
            return self._back_online(session, device, now)
        return self._gone_offline(session, device, now, "last_will", now)

    def mark_silent(self, silent: list[tuple[str, float]], now: float) -> list[str]:
        with self.session() as session:
            out: list[str] = []
            for device_id, last in silent:
                device = session.get(Device, device_id)
                if device is not None:
                    out += self._gone_offline(session, device, last, "heartbeat_silence", now)
            return out

    def _back_online(self, session: Session, device: Device, now: float) -> list[str]:
        if device.connectivity is Connectivity.ONLINE:
            return []
        was = device.connectivity
        device.connectivity, device.offline_since, device.last_seen = Connectivity.ONLINE, None, now
        keep(session, device)
        visits.mark_device_back(session, device.id, now)
        audit_batch.append(
            session,
            ts=now,
            actor=device.id,
            action="device.online",
            subject=device.id,
            was=was.value,
        )
        return [device.id]

    def _gone_offline(
        self, session: Session, device: Device, since: float, why: str, now: float
    ) -> list[str]:
        if device.connectivity is Connectivity.OFFLINE:
            return []
        device.connectivity, device.offline_since = Connectivity.OFFLINE, since
        keep(session, device)
        self.metrics.device_disconnects.labels(why=why).inc()
        audit_batch.append(
            session,
            ts=now,
            actor="fleet",
            action="device.offline",
            subject=device.id,
            why=why,
            since=since,
        )
        log.warning("device=%s offline (%s)", device.id, why)
        return [device.id]

    def apply_inbound(self, items: list[Inbound]) -> Applied:
        """State reports, acks and events in one transaction, in order, a message that
        fails rejected alone (fleet/batch.py).

        All messages go in one savepoint first: one per message would flush per message,
        which costs more than the messages themselves. If one of them fails, that
        savepoint is rolled back and they are applied again one savepoint each (their
        metrics may then count twice: only after an unexpected error, itself counted)."""
        result = Applied()
        if not items:
            return result
        with self.session() as session:
            batch.begin(session)
            ids = sorted({i.device_id for i in items})
            # Loaded once, not one query per message; held in dicts because the identity
            # map keeps only weak references.
            devices: dict[str, Device] = {
                d.id: d for d in snapshot.rows(session, snapshot.devices(), Device.id, ids)
            }
            session.info[_LOADED] = devices
            acks = [i.message for i in items if isinstance(i.message, Ack)]
            jtis = sorted({a.jti for a in acks if a.jti})
            commands: dict[str, Command] = {
                c.jti: c for c in snapshot.rows(session, select(Command), Command.jti, jtis)
            }
            # Devices (re)connecting get their pending commands resent: loaded at once too.
            online = {
                i.device_id
                for i in items
                if isinstance(i.message, Status) and i.message.status == "online"
            }
            back = sorted(online & devices.keys())
            pending: dict[str, list[Command]] = {d: [] for d in back}
            stmt_p = select(Command).where(Command.status == CommandStatus.PENDING)
            for c in snapshot.rows(session, stmt_p, Command.device_id, back):
                pending[c.device_id].append(c)
            known = [i for i in items if i.device_id in devices]
            result.rejected += [
                (i, "unknown_device", "device not in database")
                for i in items
                if i.device_id not in devices
            ]
            with audit_batch.buffered(session):
                mark = audit_batch.mark(session)
                try:
                    with writeback.savepoint(session):
                        done = [self._apply_one(session, i, commands, pending) for i in known]
                except Exception as exc:
                    audit_batch.drop_after(session, mark)
                    log.warning("device message batch: %s; one by one", type(exc).__name__)
                    self._apply_each(session, known, commands, pending, result)
                else:
                    for touched, pubs, moved in done:
                        result.touched += touched
                        result.publish += pubs
                        result.moved += moved
            result.touched += unconfirmed(devices, commands, result.moved)
        return result

    def _apply_each(
        self,
        session: Session,
        items: list[Inbound],
        commands: dict[str, Command],
        pending: dict[str, list[Command]],
        out: Applied,
    ) -> None:
        for item in items:
            mark = audit_batch.mark(session)
            try:
                with writeback.savepoint(session):
                    touched, pubs, moved = self._apply_one(session, item, commands, pending)
            except Exception as exc:  # isolated: this message is rejected alone
                audit_batch.drop_after(session, mark)
                if isinstance(exc, NotFound):
                    out.rejected.append((item, "unknown_device", "device not in database"))
                else:
                    out.rejected.append((item, "failed", type(exc).__name__))
                continue
            out.touched += touched
            out.publish += pubs
            out.moved += moved

    def _apply_one(
        self,
        session: Session,
        item: Inbound,
        commands: dict[str, Command],
        pending: dict[str, list[Command]],
    ) -> tuple[list[str], list[Publish], list[str]]:
        """What to reconcile, what to publish, and the devices whose reported state moved
        (reconciled unless the move is the applied effect of the fleet's latest command)."""
        device_id, msg, now = item.device_id, item.message, item.now
        touched: list[str] = []
        moved: list[str] = []
        if item.contact:
            touched += self._back_online(session, self._device(session, device_id), now)
        pubs: list[Publish] = []
        if isinstance(msg, Heartbeat):
            pass  # contact only (above); its facts reach the database with the liveness flush
        elif isinstance(msg, Status):
            touched += self._status(session, self._device(session, device_id), msg, now)
            if msg.status == "online" and self.leading():  # only the leader sends
                pubs += self.ledger.resend_device(session, pending.get(device_id, []), now)
        elif isinstance(msg, StateReport):
            moved += self._state(session, device_id, msg, now)
        elif isinstance(msg, Ack):
            touched += self._ack(session, device_id, msg, now, commands)
        else:
            touched += self._event(session, device_id, msg, now)
            if msg.kind is EventKind.CALL_NOT_ANSWERED and msg.look_id:
                pubs += self._call_not_answered(session, device_id, msg.look_id, now)
                touched.append(device_id)
        return touched, pubs, moved

    def on_state(self, device_id: str, report: StateReport, now: float) -> list[str]:
        with self.session() as session:
            return self._state(session, device_id, report, now)

    def _state(
        self, session: Session, device_id: str, report: StateReport, now: float
    ) -> list[str]:
        device = self._device(session, device_id)
        changed = self._record_state(
            session, device, report.state, report.armed_until, report.last_seq, now
        )
        return [device_id] if changed else []

    def _record_state(
        self,
        session: Session,
        device: Device,
        state: LockState,
        armed_until: float | None,
        last_seq: int,
        now: float,
    ) -> bool:
        """What the device reported (a state report, or an ack: ``_state_of_ack``);
        whether its state changed."""
        if device.reported_state is not LockState.LOCKED and state is LockState.LOCKED:
            self.metrics.windows.labels(event="closed").inc()
        changed = (device.reported_state, device.armed_until) != (state, armed_until)
        last_seq = max(device.device_last_seq, last_seq)
        writeback.assign(
            session,
            device,
            reported_state=state,
            armed_until=armed_until,
            reported_at=now,
            device_last_seq=last_seq,
            next_seq=max(device.next_seq, last_seq + 1),
        )
        keep(session, device)
        if changed:
            audit_batch.append(
                session,
                ts=now,
                actor=device.id,
                action="device.state",
                subject=device.id,
                state=state.value,
                armed_until=armed_until,
            )
        return changed

    def on_ack(self, device_id: str, ack: Ack, now: float) -> list[str]:
        with self.session() as session:
            return self._ack(session, device_id, ack, now, None)

    def _ack(
        self,
        session: Session,
        device_id: str,
        ack: Ack,
        now: float,
        commands: dict[str, Command] | None,
    ) -> list[str]:
        device = self._device(session, device_id)
        if ack.result is AckResult.REFUSED:
            reason = ack.reason.value if ack.reason else UNLABELLED_REFUSAL
            self.metrics.refusals.labels(reason=reason).inc()
        told = device.device_last_seq  # the latest seq a report or an ack has shown
        command = self.ledger.on_ack(session, device, ack, now, commands)
        if command is not None and command.seq > told:
            self._state_of_ack(session, device, command, ack, now)
        if command is not None and command.kind is CommandKind.LOOK:
            look = session.get(Look, command.look_id)
            if look is not None and ack.result is AckResult.REFUSED:
                look.end_reason = f"refused:{ack.reason.value if ack.reason else '?'}"[:32]
                session.add(look)
        # A refusal means the desired state was not reached: reconcile decides again. Not
        # when the command is applied all the same: the device refused a resent copy of
        # it (replayed). In a slow storm thousands of those came back, and a reconcile
        # each made the storm slower still.
        if ack.result is not AckResult.REFUSED:
            return []
        applied = command is not None and command.status is CommandStatus.APPLIED
        return [] if applied else [device_id]

    def _state_of_ack(
        self, session: Session, device: Device, command: Command, ack: Ack, now: float
    ) -> None:
        """An applied arm or disarm is also a report of the state it left the device in.

        Recorded as one: the device publishes its state before the ack, but with two
        replicas on a shared subscription the ack may be applied first, and a reconcile
        between the two saw the arm applied and the device still locked, and armed it
        again. Only when no report has shown this command yet (the caller checks: seqs,
        not arrival times, which two replicas stamp on their own), and for the device's
        latest command (an older one's effect may be undone)."""
        if ack.result is not AckResult.APPLIED or command.status is not CommandStatus.APPLIED:
            return
        if command.seq != device.next_seq - 1:
            return
        if command.kind is CommandKind.ARM and ack.state is not LockState.LOCKED:
            until = command.until
        elif command.kind is CommandKind.DISARM and ack.state is LockState.LOCKED:
            until = None
        else:
            return
        self._record_state(session, device, ack.state, until, command.seq, now)

    def on_event(self, device_id: str, event: Event, now: float) -> list[str]:
        with self.session() as session:
            return self._event(session, device_id, event, now)

    def _event(self, session: Session, device_id: str, event: Event, now: float) -> list[str]:
        device = self._device(session, device_id)
        match event.kind:
            case EventKind.LOOK_STARTED | EventKind.LOOK_ENDED:
                self._look_event(session, device, event, now)
            case EventKind.CAMERA_FAULT | EventKind.CAMERA_RESTORED:
                return self._camera(session, device, event, now)
            case EventKind.TOKEN_REFUSED:
                audit.append(
                    session,
                    ts=now,
                    actor=device_id,
                    action="device.refused",
                    subject=device_id,
                    reason=event.reason,
                )
            case EventKind.CALL_ANSWERED | EventKind.CALL_NOT_ANSWERED:
                video_phone.on_call(session, device, event, now, self.metrics)
            case EventKind.BOOT | EventKind.STATE_CHANGED:
                pass
        return []

    def call_not_answered(self, device_id: str, look_id: str, now: float) -> list[Publish]:
        """A video phone's call was not answered: for its check that is *not seen*, with the
        same recheck and escalation as when staff saw nobody on a camera."""
        with self.session() as session:
            return self._call_not_answered(session, device_id, look_id, now)

    def _call_not_answered(
        self, session: Session, device_id: str, look_id: str, now: float
    ) -> list[Publish]:
        look = session.get(Look, look_id)
        if look is None or look.device_id != device_id:
            return []
        check = session.exec(
            select(Check).where(Check.last_look_id == look_id, col(Check.outcome).is_(None))
        ).first()
        if check is None or check.id is None:
            return []
        _, out = checks.record_outcome(
            session, self.check_ctx, check.id, Outcome.NOT_SEEN, staff=look.staff_id, now=now
        )
        return out

    def _look_event(self, session: Session, device: Device, event: Event, now: float) -> None:
        look = session.get(Look, event.look_id) if event.look_id else None
        if look is None or look.device_id != device.id:
            self.metrics.ingest_errors.labels(channel="event", why="unknown_look").inc()
            return
        if event.kind is EventKind.LOOK_STARTED:
            look.started_at = event.ts
            action = "look.started"
        else:
            look.ended_at, look.duration_s, look.end_reason = (
                event.ts,
                event.duration_s,
                event.reason,
            )
            action = "look.ended"
        session.add(look)
        audit_batch.append(
            session,
            ts=now,
            actor=look.staff_id,
            action=action,
            subject=device.id,
            look_id=look.id,
            resident=device.resident_id,
            duration_s=event.duration_s,
            reason=event.reason,
        )

    def _camera(self, session: Session, device: Device, event: Event, now: float) -> list[str]:
        health = CameraHealth.OK if event.kind is EventKind.CAMERA_RESTORED else CameraHealth.FAULT
        return self.set_camera(session, device, health, now)

    def set_camera(
        self, session: Session, device: Device, health: CameraHealth, now: float
    ) -> list[str]:
        if device.camera is health:
            return []
        device.camera = health
        session.add(device)
        audit_batch.append(
            session,
            ts=now,
            actor=device.id,
            action="device.camera",
            subject=device.id,
            camera=health.value,
        )
        return [device.id]

    def flush_liveness(
        self, seen: dict[str, Seen], camera: dict[str, CameraHealth], now: float
    ) -> list[str]:
        """One batched write of last-seen times; reconcile devices whose camera changed."""
        plain = [{"id": d, "last_seen": e.at} for d, e in seen.items() if e.facts is None]
        full = [
            {
                "id": d,
                "last_seen": e.at,
                "firmware": e.facts.fw,
                "clock_synced": e.facts.clock_synced,
                "clock_skew_s": e.skew_s,
            }
            for d, e in seen.items()
            if e.facts is not None
        ]
        changed: list[str] = []
        with self.session() as session:
            # ORM bulk UPDATE by primary key: one executemany per shape, no per-row query.
            for rows in (plain, full):
                if rows:
                    session.execute(update(Device), rows)
            for device_id, health in camera.items():
                device = session.get(Device, device_id)
                if device is not None:
                    changed += self.set_camera(session, device, health, now)
        return changed

    # --- API -------------------------------------------------------------------------

    def register_device(self, device: Device, now: float, actor: str) -> Device:
        with self.session() as session:
            if session.get(Device, device.id) is not None:
                raise Conflict(f"device {device.id} already exists")
            session.add(device)
            audit.append(
                session,
                ts=now,
                actor=actor,
                action="device.registered",
                subject=device.id,
                kind=device.kind.value,
            )
            return device

    def add_window(self, window: Window, now: float, actor: str) -> Window:
        with self.session() as session:
            self._device(session, window.device_id)
            session.add(window)
            session.flush()
            audit.append(
                session,
                ts=now,
                actor=actor,
                action="window.added",
                subject=window.device_id,
                window_id=window.id,
                start=window.start_local,
                duration_s=window.duration_s,
            )
            return window

    def remove_window(self, window_id: int, now: float, actor: str) -> Window:
        with self.session() as session:
            window = session.get(Window, window_id)
            if window is None:
                raise NotFound("window", window_id)
            window.active = False
            session.add(window)
            audit.append(
                session,
                ts=now,
                actor=actor,
                action="window.removed",
                subject=window.device_id,
                window_id=window_id,
            )
            return window

    def start_look(
        self, device_id: str, staff_id: str, max_s: int, now: float
    ) -> tuple[Look, Publish]:
        """Sign a look for a device inside an open window."""
        with self.session() as session:
            device = self._device(session, device_id)
            return self.start_look_in(session, device, staff_id, max_s, now)

    def start_look_in(
        self, session: Session, device: Device, staff_id: str, max_s: int, now: float
    ) -> tuple[Look, Publish]:
        """The look itself, in the caller's transaction (also used by care-plan checks)."""
        device_id = device.id
        windows = session.exec(select(Window).where(Window.device_id == device_id)).all()
        span = open_span(device_spans(session, device_id, windows, now - 1, now + 1), now)
        if span is None:
            raise Conflict(f"device {device_id} has no open window")
        if device.reported_state is not LockState.ARMED:
            raise Conflict(f"device {device_id} is {device.reported_state.value}, not ARMED")
        look = Look(
            id=secrets.token_hex(8), device_id=device_id, staff_id=staff_id, requested_at=now
        )
        session.add(look)
        pub = self.ledger.issue(
            session,
            device,
            CommandKind.LOOK,
            now=now,
            actor=staff_id,
            staff=staff_id,
            max_s=max_s,
            look_id=look.id,
        )
        audit_batch.append(
            session,
            ts=now,
            actor=staff_id,
            action="look.requested",
            subject=device_id,
            look_id=look.id,
            resident=device.resident_id,
            max_s=max_s,
            check_id=span.checks[0].id if span.checks else None,
        )
        if span.checks:  # the look belongs to the check whose window is open
            checks.note_look(session, span.checks[0], look.id, now)
        return look, pub

    def close_visit(self, visit_id: int, by: str, outcome: str, now: float) -> Visit:
        with self.session() as session:
            return visits.close_visit(session, visit_id, by=by, outcome=outcome, now=now)

    def acknowledge_visit(self, visit_id: int, by: str, now: float) -> Visit:
        with self.session() as session:
            return visits.acknowledge_visit(session, visit_id, by=by, now=now)

    # --- gauges ----------------------------------------------------------------------

    def refresh_gauges(self, now: float) -> None:
        with self.session() as session:
            gauges.refresh(session, self.metrics, now, self._gauge_labels)

    def pending_commands(self, device_id: str) -> list[Command]:
        with self.session() as session:
            return list(self.ledger.pending(session, device_id))
