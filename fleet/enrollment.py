"""RFC 8628 device authorization on the fleet side: codes, polling, guessing limits.

Synchronous functions given a session and ``now`` (they run on the service's database
thread). Only SHA-256 hashes of the device code and the user code are stored.

Polling answers (section 3.5 of RFC 8628): ``authorization_pending`` until a technician
decides; ``slow_down`` (and 5 s more interval, for good) when the device polls faster
than its interval; ``expired_token`` after ``expires_in``; ``access_denied`` when a
technician refused the device; ``invalid_grant`` for an unknown device code. Once
approved, the credentials are delivered (again, if the device lost the first answer)
until the approval is ``code_ttl_s`` old: they contain nothing secret, the private key
never left the device.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from sqlalchemy import delete, func
from sqlmodel import Session, col, select

from tillsyn_protocol.enrollment import (
    DeviceAuthorization,
    DeviceAuthorizationRequest,
    DeviceCredentials,
    TokenError,
    new_device_code,
    new_user_code,
    normalize_user_code,
)

from . import audit
from .certs import DeviceCA
from .inventory import (
    IN_SERVICE,
    DeviceCertificate,
    DeviceRecord,
    Enrollment,
    EnrollmentStatus,
    code_hash,
)
from .models import Device
from .pairing_errors import CodeRefused, CsrRefused, PairingRefused

__all__ = ["GuessLimiter", "authorize", "find_for_technician", "live_elsewhere", "poll", "prune"]

log = logging.getLogger(__name__)

SLOW_DOWN_STEP_S = 5  # RFC 8628 section 3.5
_POLL_TOLERANCE_S = 0.5  # timer jitter on the device is not "polling too fast"


# --- device side ---------------------------------------------------------------------------


def authorize(
    session: Session,
    request: DeviceAuthorizationRequest,
    *,
    ca: DeviceCA,
    now: float,
    peer: str | None,
) -> DeviceAuthorization:
    """Check the CSR (and factory proof), store the enrollment, hand out the codes."""
    s = ca.settings
    # Refusals raise; the caller audits them in their own transaction (this one rolls back).
    csr, device_id = ca.check_enrollment_csr(request.csr)
    ca.check_factory_proof(request.serial, csr, request.factory_cert, request.factory_sig, now)
    if session.get(Device, device_id) is not None:
        raise CsrRefused(
            "key_already_paired", "this key is already paired: the device must make a new one"
        )
    pending = session.exec(
        select(func.count())
        .select_from(Enrollment)
        .where(Enrollment.status == EnrollmentStatus.PENDING, Enrollment.expires_at > now)
    ).one()
    if pending >= s.max_pending_enrollments:
        raise PairingRefused("too_many_pending", "too many devices waiting; try later", status=429)
    device_code = new_device_code()
    while True:
        user_code = new_user_code()
        taken = session.exec(
            select(Enrollment.id).where(
                Enrollment.user_code_hash == code_hash(normalize_user_code(user_code) or "")
            )
        ).first()
        if taken is None:
            break
    row = Enrollment(
        device_code_hash=code_hash(device_code),
        user_code_hash=code_hash(normalize_user_code(user_code) or ""),
        serial=request.serial,
        kind=request.kind,
        firmware=request.fw,
        device_id=device_id,
        csr=request.csr,
        created_at=now,
        expires_at=now + s.code_ttl_s,
        interval_s=s.poll_interval_s,
    )
    session.add(row)
    session.flush()
    audit.append(
        session,
        ts=now,
        actor="enroll",
        action="enroll.requested",
        subject=device_id,
        serial=request.serial,
        kind=request.kind.value,
        fw=request.fw,
        enrollment=row.id,
        peer=peer,
    )
    uri = s.verification_uri
    return DeviceAuthorization(
        device_code=device_code,
        user_code=user_code,
        verification_uri=uri,
        verification_uri_complete=f"{uri}?code={user_code}",
        expires_in=s.code_ttl_s,
        interval=s.poll_interval_s,
        device_id=device_id,
    )


def poll(
    session: Session, device_code: str, *, ca: DeviceCA, now: float
) -> DeviceCredentials | TokenError:
    """One token request from a device."""
    row = session.exec(
        select(Enrollment).where(Enrollment.device_code_hash == code_hash(device_code))
    ).first()
    if row is None:
        return TokenError(error="invalid_grant", error_description="unknown device code")
    last, row.last_poll_at = row.last_poll_at, now
    session.add(row)
    match row.status:
        case EnrollmentStatus.DENIED:
            return TokenError(error="access_denied", error_description="refused by a technician")
        case EnrollmentStatus.APPROVED | EnrollmentStatus.DELIVERED:
            decided = row.decided_at or row.created_at
            if now > decided + ca.settings.code_ttl_s:
                return TokenError(error="expired_token", error_description="pairing too old")
            return _deliver(session, row, ca=ca, now=now)
        case EnrollmentStatus.PENDING:
            if now >= row.expires_at:
                return TokenError(error="expired_token", error_description="the code expired")
            if last is not None and now - last < row.interval_s - _POLL_TOLERANCE_S:
                row.interval_s = min(600, row.interval_s + SLOW_DOWN_STEP_S)
                return TokenError(error="slow_down", interval=row.interval_s)
            return TokenError(error="authorization_pending")


def _deliver(
    session: Session, row: Enrollment, *, ca: DeviceCA, now: float
) -> DeviceCredentials | TokenError:
    cert = session.get(DeviceCertificate, row.cert_serial) if row.cert_serial else None
    if cert is None:
        return TokenError(error="access_denied", error_description="no certificate was issued")
    if row.status is EnrollmentStatus.APPROVED:
        row.status, row.delivered_at = EnrollmentStatus.DELIVERED, now
        session.add(row)
        audit.append(
            session,
            ts=now,
            actor=row.device_id,
            action="enroll.delivered",
            subject=row.device_id,
            serial=row.serial,
            cert=cert.serial,
        )
    return DeviceCredentials(
        device_id=row.device_id,
        certificate=cert.pem,
        ca_chain=ca.ca_pem,
        broker_host=ca.broker_host,
        broker_port=ca.broker_port,
        command_keys=[ca.command_key_pem],
        renew_after=cert.renew_after,
        not_after=cert.not_after,
    )


# --- technician side -----------------------------------------------------------------------


class GuessLimiter:
    """Wrong user codes per technician and in total, in a sliding window (in memory).

    One replica's view: with several replicas each enforces its own limit, which still
    bounds guessing to ``replicas * limit`` per window against a 34-bit code space.
    """

    def __init__(
        self,
        *,
        per_staff: int,
        total: int,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_staff, self.total, self.window_s = per_staff, total, window_s
        self._clock = clock
        self._staff: dict[str, deque[float]] = {}
        self._all: deque[float] = deque()

    def _trim(self, q: deque[float], now: float) -> None:
        while q and q[0] <= now - self.window_s:
            q.popleft()

    def blocked(self, staff_id: str) -> float | None:
        """Seconds to wait if this technician may not guess now, else None."""
        now = self._clock()
        mine = self._staff.get(staff_id, deque())
        self._trim(mine, now)
        self._trim(self._all, now)
        if len(mine) >= self.per_staff:
            return mine[0] + self.window_s - now
        if len(self._all) >= self.total:
            return self._all[0] + self.window_s - now
        return None

    def wrong(self, staff_id: str) -> None:
        now = self._clock()
        self._staff.setdefault(staff_id, deque()).append(now)
        self._all.append(now)


def find_for_technician(session: Session, code: str, *, now: float) -> Enrollment:
    """The pending enrollment for a user code, or a :class:`CodeRefused` saying why not.

    The caller counts ``reason == "wrong_code"`` as a guess.
    """
    normalized = normalize_user_code(code)
    if normalized is None:
        raise CodeRefused("wrong_code", "that is not a pairing code (8 letters, like BCDF-GHJK)")
    rows = session.exec(
        select(Enrollment)
        .where(Enrollment.user_code_hash == code_hash(normalized))
        .order_by(col(Enrollment.id).desc())
    ).all()
    if not rows:
        raise CodeRefused("wrong_code", "no device is waiting with this code")
    row = rows[0]
    match row.status:
        case EnrollmentStatus.APPROVED | EnrollmentStatus.DELIVERED:
            raise CodeRefused(
                "code_used",
                f"this code was already used (device {row.device_id})",
                status=409,
            )
        case EnrollmentStatus.DENIED:
            raise CodeRefused("code_denied", "this code was refused", status=409)
        case EnrollmentStatus.PENDING:
            pass
    if now >= row.expires_at:
        raise CodeRefused(
            "code_expired",
            "this code has expired: restart pairing on the device for a new code",
            status=410,
        )
    return row


def live_elsewhere(session: Session, serial: str) -> DeviceRecord | None:
    """The in-service record of this hardware serial, if it has one."""
    return session.exec(
        select(DeviceRecord).where(
            DeviceRecord.serial == serial, col(DeviceRecord.state).in_(IN_SERVICE)
        )
    ).first()


def prune(session: Session, *, now: float, keep_s: float = 86400.0) -> int:
    """Forget codes nobody used (a day after they expired); decided ones stay."""
    stmt = delete(Enrollment).where(
        col(Enrollment.status) == EnrollmentStatus.PENDING,
        col(Enrollment.expires_at) < now - keep_s,
    )
    return int(session.execute(stmt).rowcount)  # type: ignore[attr-defined]
