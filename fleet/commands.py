"""The command ledger: sign, record, send, re-send until acknowledged or moot."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import insert, or_
from sqlmodel import Session, col, select

from tillsyn_protocol import (
    Ack,
    AckResult,
    Channel,
    CommandKind,
    LockState,
    SigningKey,
    device_topic,
    sign,
)
from tillsyn_protocol import tokens as tk

from . import audit_batch, writeback
from .db import deferred, keep, new_row
from .metrics import FleetMetrics
from .models import Command, CommandStatus, Connectivity, Device
from .outbound import Publish

log = logging.getLogger(__name__)

# Kinds whose newer command makes an older pending one moot (a look is its own thing).
_LOCK_KINDS = (CommandKind.ARM, CommandKind.DISARM)
# Resends back off: after the ack timeout, then twice and from then on four times that. A
# QoS 1 command waits in the device's broker session; it is lost only when that session
# or the broker's queue is, so one resend covers a loss, and more of them at a fixed pace
# only pile duplicates onto devices already behind (a 10,000-device window storm whose
# acks took over 10 s collapsed into 3-5 sends per command and a 4x slower storm).
RESEND_BACKOFF_MAX_DOUBLINGS = 2
# The ack timeout never grows past this many resend_after_s, however slow acks have been.
ACK_TIMEOUT_MAX_FACTOR = 6.0
# An arm signed ahead for an instant is used up to this long after it (the last parts of a
# big edge are issued seconds late), never before it, and dropped after it.
PRESIGN_MAX_AGE_S = 120.0


@dataclass(frozen=True, slots=True)
class Presigned:
    """An arm token signed ahead for an instant: claims (iat = nbf = the instant) and
    signature exactly as :meth:`Ledger.issue` would make them then."""

    at: float
    jti: str
    token: str


_NEW = "tillsyn.new_commands"  # session.info: commands issued in a batch, not yet inserted


@contextmanager
def batched(session: Session) -> Iterator[None]:
    """Commands issued in this block are inserted together at its end, by Core.

    The ORM's unit of work inserting 10,000 arms at a window start (history, identity map,
    a persistent object each) cost more than making them; nothing of the pass needs
    their ids or to find them by query, only the pending lists the ledger appends them
    to. Not written on error: the transaction is rolled back then anyway. Outside a
    batch the ledger adds each command to the session as usual."""
    with deferred(session, _NEW, list, _insert):
        yield


def _insert(session: Session, new: list[Command]) -> None:
    if new:
        columns = [c.name for c in Command.__table__.columns if c.name != "id"]  # type: ignore[attr-defined]
        rows = [{name: c.__dict__[name] for name in columns} for c in new]
        session.execute(insert(Command.__table__), rows)  # type: ignore[attr-defined]


def _batched_in(session: Session, command: Command) -> bool:
    """Whether this command waits in the session's open batch (not in the session)."""
    return command.id is None and any(c is command for c in session.info.get(_NEW, ()))


def unconfirmed(
    devices: Mapping[str, Device], acked: Mapping[str, Command], moved: Iterable[str]
) -> list[str]:
    """The devices of ``moved`` (reported state changed) that reconciliation must look at.

    Left out: a device whose state is now exactly what the fleet's latest command to it
    asked for (no newer one issued), that command acknowledged as applied in the same
    batch (``acked``, by jti). The fleet decided that state when it issued the command and
    any later change of plan issues a newer one, so the reconcile would change nothing. At a
    window start this is every armed device: a second reconcile of the whole edge, about
    a third of its database time, spent while other devices still wait for their arms.
    Anything else (a reboot, a re-lock of the device's own, an ack in another batch) is
    reconciled as before."""
    latest: dict[str, Command] = {}
    for command in acked.values():
        if command.status is CommandStatus.APPLIED and command.kind in _LOCK_KINDS:
            seen = latest.get(command.device_id)
            if seen is None or command.seq > seen.seq:
                latest[command.device_id] = command
    out = []
    for device_id in dict.fromkeys(moved):
        device, last = devices.get(device_id), latest.get(device_id)
        if device is None or last is None or not _effect_of(device, last):
            out.append(device_id)
    return out


def _effect_of(device: Device, command: Command) -> bool:
    if command.seq != device.next_seq - 1:
        return False  # a newer command is on its way
    if command.kind is CommandKind.ARM:
        armed = device.reported_state is LockState.ARMED
        return armed and device.armed_until == command.until
    return command.kind is CommandKind.DISARM and device.reported_state is LockState.LOCKED


def resend_delay(attempts: int, resend_after_s: float) -> float:
    """How long after its last send a command that was sent ``attempts`` times is resent."""
    doublings = min(max(attempts - 1, 0), RESEND_BACKOFF_MAX_DOUBLINGS)
    return resend_after_s * float(2**doublings)


class AckTimer:
    """How long an ack may take before a resend makes sense, learnt from the acks.

    TCP's retransmission timeout (RFC 6298): smoothed round trip + 4 x its variation,
    sampled only from commands sent once (Karn: an ack after a resend is ambiguous).
    ``resend_after_s`` stays the floor; in a storm, when devices ack 15 s after the send,
    the timeout follows instead of resending thousands of commands still queued for
    them. Per process and in memory: it restarts from the floor.
    """

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0

    def sample(self, rtt: float) -> None:
        rtt = max(0.0, rtt)
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt

    def timeout(self, resend_after_s: float) -> float:
        if self.srtt is None:
            return resend_after_s
        learnt = self.srtt + 4 * self.rttvar
        return min(ACK_TIMEOUT_MAX_FACTOR * resend_after_s, max(resend_after_s, learnt))


class Ledger:
    def __init__(self, key: SigningKey, metrics: FleetMetrics) -> None:
        self._key = key
        self._metrics = metrics
        self.ack_timer = AckTimer()
        # (device, seq, until) -> an arm signed ahead (:meth:`presign`). Used and written
        # on the database thread only, like the rest of the ledger.
        self._presigned: dict[tuple[str, int, int], Presigned] = {}

    def presign(self, arms: Iterable[tuple[str, int, int]], at: float) -> int:
        """Sign these arms (device, seq, until) now for the instant ``at``, to be used by
        :meth:`issue` if it issues exactly that arm then; returns how many were signed.

        A window start where thousands of windows open at once spends a fifth of its edge
        on Ed25519 and JWS encoding; signed a little ahead, in a quiet moment, that work is
        off the storm. Nothing changes for the device or the ledger: the token carries the
        same claims (``iat`` = ``nbf`` = the instant, so it is not valid before it either)
        and is recorded and sent only when the edge issues it. A prediction that no longer
        holds (another command took the seq, the plan changed) is simply not used."""
        self.forget_presigned(at)
        n = 0
        for device_id, seq, until in arms:
            try:
                claims = tk.arm(device_id, seq=seq, now=at, until=until)
            except ValueError:  # (pydantic's ValidationError)
                continue  # not a valid arm at that instant: issue() decides then
            self._presigned[(device_id, seq, until)] = Presigned(
                at, claims.jti, sign(claims, self._key)
            )
            n += 1
        return n

    def forget_presigned(self, now: float) -> None:
        """Drop arms signed ahead that can no longer be used (the sweep calls this)."""
        if not self._presigned:
            return
        stale = [k for k, p in self._presigned.items() if p.at + PRESIGN_MAX_AGE_S < now]
        for k in stale:
            del self._presigned[k]
        if stale:
            log.info("%d arms signed ahead were not used", len(stale))

    def _signed(
        self, device_id: str, kind: CommandKind, seq: int, until: int | None, now: float
    ) -> Presigned | None:
        if kind is not CommandKind.ARM or until is None or not self._presigned:
            return None
        found = self._presigned.pop((device_id, seq, until), None)
        if found is None or not found.at <= now < found.at + PRESIGN_MAX_AGE_S:
            return None
        return found

    def issue(
        self,
        session: Session,
        device: Device,
        kind: CommandKind,
        *,
        now: float,
        actor: str = "scheduler",
        until: int | None = None,
        staff: str | None = None,
        max_s: int | None = None,
        look_id: str | None = None,
        pending: list[Command] | None = None,
    ) -> Publish:
        """Sign the next command for a device, record it, and return what to publish.

        ``pending``: the device's pending commands as already loaded (a batched reconcile):
        superseded from that list instead of a query, and the new command appended to it.
        """
        seq = max(device.next_seq, device.device_last_seq + 1)
        writeback.assign(session, device, next_seq=seq + 1)
        ahead = self._signed(device.id, kind, seq, until, now)
        if ahead is not None:
            assert until is not None
            jti, token, exp = ahead.jti, ahead.token, until
        else:
            match kind:
                case CommandKind.ARM:
                    assert until is not None
                    claims = tk.arm(device.id, seq=seq, now=now, until=until)
                case CommandKind.DISARM:
                    claims = tk.disarm(device.id, seq=seq, now=now)
                case CommandKind.LOOK:
                    assert staff is not None and max_s is not None and look_id is not None
                    claims = tk.look(
                        device.id, seq=seq, now=now, staff=staff, max_s=max_s, look_id=look_id
                    )
            jti, token, exp = claims.jti, sign(claims, self._key), claims.exp
        if kind in _LOCK_KINDS:
            if pending is None:
                pending = list(self.pending(session, device.id))
            self._supersede(session, pending, now)
        command = new_row(
            Command,
            jti=jti,
            device_id=device.id,
            seq=seq,
            kind=kind,
            until=until,
            look_id=look_id,
            staff_id=staff,
            token=token,
            created_at=now,
            expires_at=float(exp),
            attempts=1,
            last_sent_at=now,
        )
        keep(session, device)
        batch: list[Command] | None = session.info.get(_NEW)
        if batch is None:
            session.add(command)
        else:
            batch.append(command)
        if pending is not None:
            pending.append(command)
        audit_batch.append(
            session,
            ts=now,
            actor=actor,
            action="command.issued",
            subject=device.id,
            kind=kind.value,
            seq=seq,
            jti=jti,
            until=until,
            look_id=look_id,
        )
        self._metrics.commands.labels(kind=kind.value, outcome="issued").inc()
        return self.publish(command, now)

    @staticmethod
    def publish(command: Command, now: float) -> Publish:
        expiry = max(1, int(command.expires_at - now))
        return Publish(
            device_topic(command.device_id, Channel.CMD),
            command.token.encode(),
            qos=1,
            expiry_s=expiry,
        )

    def _supersede(self, session: Session, pending: list[Command], now: float) -> None:
        for old in pending:
            if old.status is not CommandStatus.PENDING or old.kind not in _LOCK_KINDS:
                continue
            writeback.assign(session, old, status=CommandStatus.SUPERSEDED, acked_at=now)
            if not _batched_in(session, old):  # (a batched one is inserted as it is then)
                keep(session, old)
            self._metrics.commands.labels(kind=old.kind.value, outcome="superseded").inc()

    def pending(self, session: Session, device_id: str) -> list[Command]:
        """The device's pending commands, those of an open batch (not inserted yet) too."""
        found = session.exec(
            select(Command).where(
                Command.device_id == device_id, Command.status == CommandStatus.PENDING
            )
        ).all()
        batch: list[Command] = session.info.get(_NEW, [])
        return [
            *found,
            *(c for c in batch if c.device_id == device_id and c.status is CommandStatus.PENDING),
        ]

    def on_ack(
        self,
        session: Session,
        device: Device,
        ack: Ack,
        now: float,
        known: dict[str, Command] | None = None,
    ) -> Command | None:
        """Settle the command an ack refers to. Unknown or foreign jtis change nothing.

        ``known``: commands by jti already loaded for a batch of acks (no query then)."""
        if ack.jti is None:
            return None
        if known is not None:
            command = known.get(ack.jti)
        else:
            command = session.exec(select(Command).where(Command.jti == ack.jti)).first()
        if command is None or command.device_id != device.id:
            log.warning("ack for unknown command from device=%s", device.id)
            self._metrics.ingest_errors.labels(channel="ack", why="unknown_command").inc()
            return None
        if ack.result is AckResult.REFUSED:
            outcome = CommandStatus.REFUSED
        else:
            outcome = CommandStatus.APPLIED
            last_seq = max(device.device_last_seq, command.seq)
            writeback.assign(session, device, device_last_seq=last_seq)
            keep(session, device)
        if command.status in (
            CommandStatus.PENDING,
            CommandStatus.SUPERSEDED,
            CommandStatus.EXPIRED,
        ):
            latency = now - command.created_at
            if (
                command.status is CommandStatus.PENDING
                and command.attempts == 1
                and command.last_sent_at is not None
            ):
                self.ack_timer.sample(now - command.last_sent_at)
            reason = ack.reason.value if ack.reason else None
            writeback.assign(session, command, status=outcome, reason=reason, acked_at=now)
            keep(session, command)
            self._metrics.commands.labels(kind=command.kind.value, outcome=outcome.value).inc()
            if outcome is CommandStatus.APPLIED:
                self._metrics.command_latency.labels(kind=command.kind.value).observe(latency)
                if command.kind is CommandKind.ARM:
                    self._metrics.windows.labels(event="opened").inc()
            audit_batch.append(
                session,
                ts=now,
                actor=device.id,
                action="command.acked",
                subject=device.id,
                jti=command.jti,
                seq=command.seq,
                kind=command.kind.value,
                result=ack.result.value,
                reason=command.reason,
                state=ack.state.value,
            )
        return command

    def due(self, session: Session, now: float, resend_after_s: float) -> list[Publish]:
        """Re-send pending commands not acknowledged in time; expire those past deadline.

        An arm for a device that is online waits ``ACK_TIMEOUT_MAX_FACTOR`` times
        ``resend_after_s`` (the longest ack timeout ever learnt): the broker acknowledged it
        into the device's session, which delivers it (QoS 1), and a device that reconnects
        has its pending commands resent at once (:meth:`resend_device`). At a window start
        whose acks took 30-70 s, resends at 10 s doubled the devices' work (each copy
        verified and refused) and with it the storm. Disarms and looks keep the short
        timeout: rare, and a late one is a privacy or a staff matter."""
        out: list[Publish] = []
        after = self.ack_timer.timeout(resend_after_s)
        held = ACK_TIMEOUT_MAX_FACTOR * resend_after_s
        if resend_after_s > 0:  # (0: "resend everything now", after a reconnect)
            self._metrics.command_ack_timeout.set(after)
        # Only commands that may be due are loaded: at a window start 10,000 arms are
        # pending at once, and loading all of them every resend interval cost the
        # database thread seconds in the middle of the storm (the back-off is checked below).
        stmt = (
            select(Command, Device.connectivity)
            .join(Device, col(Device.id) == col(Command.device_id))
            .where(
                Command.status == CommandStatus.PENDING,
                or_(
                    col(Command.expires_at) <= now,
                    col(Command.last_sent_at).is_(None),
                    col(Command.last_sent_at) <= now - after,
                ),
            )
        )
        for command, connectivity in session.exec(stmt):
            delay = resend_delay(command.attempts, after)
            if command.kind is CommandKind.ARM and connectivity is Connectivity.ONLINE:
                delay = max(delay, held)
            if command.expires_at <= now:
                command.status = CommandStatus.EXPIRED
                self._metrics.commands.labels(kind=command.kind.value, outcome="expired").inc()
            elif command.last_sent_at is None or now - command.last_sent_at >= delay:
                out.append(self._resend(command, now))
            else:
                continue
            session.add(command)
        return out

    def resend_device(
        self, session: Session, pending: Iterable[Command], now: float
    ) -> list[Publish]:
        """A device (re)connected: its pending commands (as loaded), sent before, may have
        gone with its old broker session, so they are resent now (a copy it already has
        is refused as replayed, which changes nothing)."""
        out = []
        for command in pending:
            if command.status is not CommandStatus.PENDING:
                continue  # settled meanwhile (an ack earlier in the same batch)
            if command.expires_at > now and (command.last_sent_at or 0.0) < now:
                out.append(self._resend(command, now))
                session.add(command)
        return out

    def _resend(self, command: Command, now: float) -> Publish:
        command.attempts += 1
        command.last_sent_at = now
        self._metrics.commands.labels(kind=command.kind.value, outcome="resent").inc()
        return self.publish(command, now)
