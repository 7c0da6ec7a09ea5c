"""Gauges recomputed every sweep interval by every replica: from the database in a few
whole-table queries (never one per device), and from the PKI files, throttled and cached
by modification time.

The desired lock state comes from what reconciliation arms a device for (windows and
care-plan checks, :func:`schedules`), computed once per device for the next 12 hours; all
the "tonight" gauges (open, upcoming, at risk, mismatch) come from that one pass.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from sqlalchemy import case, func
from sqlalchemy import select as core_select
from sqlmodel import Session, col, select

from tillsyn_protocol import CameraHealth, LockState

from .metrics import CERT_KINDS, VISIT_CAUSES, FleetMetrics, set_labelled
from .models import Command, CommandStatus, Connectivity, Device, Visit, VisitStatus
from .plan_models import ARMING_STATES, Check
from .reconcile import LOCK_GRACE_S, spans_of
from .snapshot import WindowSpec, active_windows

log = logging.getLogger(__name__)

TONIGHT_S = 12 * 3600.0  # "a window due tonight": open now or starting within 12 h
SOON_S = 3600.0
FIRMWARE_TOP = 20  # bounded cardinality: the most common versions, the rest as "other"
CERT_SOON_S = 30 * 86400.0
CERT_REFRESH_S = 300.0  # certificates change on a scale of days


@dataclass(slots=True)
class Schedule:
    """One device's spans (windows and care-plan checks) over the next 12 h."""

    open_now: int = 0
    starting_soon: int = 0  # within SOON_S
    starting_tonight: int = 0  # within TONIGHT_S

    @property
    def due(self) -> bool:
        return bool(self.open_now or self.starting_tonight)


def schedules(session: Session, now: float) -> dict[str, Schedule]:
    """Per device: spans open now and starting soon, in two queries (no per-device ones).

    A span is what reconciliation arms a device for (``fleet/reconcile.py``,
    ``device_spans``): the foundation's windows and the care-plan checks that still want
    the device armed, overlapping ones merged.
    """
    hi = now + TONIGHT_S
    raw: dict[str, list[tuple[float, float]]] = {}
    # Windows as tuples, their spans memoised per agreed time (thousands of devices share
    # a few): ORM objects and zoneinfo arithmetic per device were most of a refresh.
    windows: dict[str, list[WindowSpec]] = {}
    for device_id, spec in active_windows(session, None):
        windows.setdefault(device_id, []).append(spec)
    for device_id, specs in windows.items():
        raw[device_id] = [(s.start, s.end) for s in spans_of(specs, (), now, hi)]
    arming = select(Check.device_id, Check.start_at, Check.end_at).where(
        col(Check.state).in_(ARMING_STATES),
        col(Check.device_id).is_not(None),
        Check.end_at > now,
        Check.start_at < hi,
    )
    for check_device, start, end in session.exec(arming):
        if check_device is not None:
            raw.setdefault(check_device, []).append((start, end))
    out: dict[str, Schedule] = {}
    for device_id, spans in raw.items():
        sched = out[device_id] = Schedule()
        for start, end in _merged(spans):
            if start <= now < end:
                sched.open_now += 1
            elif start > now:
                sched.starting_tonight += 1
                sched.starting_soon += start - now <= SOON_S
    return out


def _merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if out and start < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def refresh(
    session: Session, metrics: FleetMetrics, now: float, known: dict[str, set[str]]
) -> None:
    """Recompute every database gauge. ``known`` carries label values between runs."""
    started = time.perf_counter()
    scheds = schedules(session, now)
    _devices(session, metrics, scheds, now, known.setdefault("firmware", set()))
    m = metrics
    m.windows_open.set(sum(s.open_now for s in scheds.values()))
    m.windows_upcoming.labels(within="1h").set(sum(s.starting_soon for s in scheds.values()))
    m.windows_upcoming.labels(within="12h").set(sum(s.starting_tonight for s in scheds.values()))
    open_visits = dict.fromkeys(VISIT_CAUSES, 0) | {
        str(cause): n
        for cause, n in session.exec(
            select(Visit.cause, func.count())
            .where(Visit.status != VisitStatus.CLOSED)
            .group_by(Visit.cause)
        )
    }
    set_labelled(m.visits_open, "cause", open_visits, known.setdefault("visit_cause", set()))
    m.commands_pending.set(
        session.exec(
            select(func.count()).select_from(Command).where(Command.status == CommandStatus.PENDING)
        ).one()
    )
    _outbox(session, m, now)
    m.gauges_refreshed.set(now)
    m.gauges_duration.set(time.perf_counter() - started)


def _outbox(session: Session, m: FleetMetrics, now: float) -> None:
    """Outbox backlog, by every replica (only the leader sends; all of them report)."""
    from .plan_models import OutboxEvent

    created = col(OutboxEvent.created_at)
    pending, oldest = session.exec(
        select(func.count(), func.min(created)).where(
            OutboxEvent.delivered_at == None  # noqa: E711
        )
    ).one()
    m.outbox_pending.set(pending)
    m.outbox_oldest_age.set(max(0.0, now - oldest) if oldest is not None else 0.0)


def _devices(
    session: Session,
    m: FleetMetrics,
    scheds: dict[str, Schedule],
    now: float,
    known_firmware: set[str],
) -> None:
    conns = dict.fromkeys(Connectivity, 0)
    states = dict.fromkeys(LockState, 0)
    unhealthy_reasons: Counter[str] = Counter()
    at_risk: Counter[str] = Counter()
    firmware: Counter[str] = Counter()
    unhealthy = want_armed_n = want_locked_n = past_end = 0
    max_skew = 0.0
    # Core select of the columns needed: no ORM objects for a whole fleet on every sweep.
    t = Device.__table__.c  # type: ignore[attr-defined]
    rows = session.execute(
        core_select(
            t.id,
            t.connectivity,
            t.reported_state,
            t.armed_until,
            t.camera,
            t.clock_synced,
            t.clock_skew_s,
            t.firmware,
        )
    )
    idle = Schedule()
    for device_id, conn, state, armed_until, camera, synced, skew, fw in rows:
        conns[conn] += 1
        states[state] += 1
        firmware[fw or "unknown"] += 1
        reasons = []
        if camera is not None and camera is not CameraHealth.OK:
            reasons.append(f"camera_{camera.value}")
        if synced is False:
            reasons.append("clock_unsynced")
        unhealthy += bool(reasons)
        unhealthy_reasons.update(reasons)

        sched = scheds.get(device_id, idle)
        is_armed = state is not LockState.LOCKED
        want_armed_n += bool(sched.open_now) and not is_armed
        want_locked_n += not sched.open_now and is_armed
        past_end += bool(is_armed and armed_until and now > armed_until + LOCK_GRACE_S)
        if sched.due:
            at_risk["offline"] += conn is not Connectivity.ONLINE
            at_risk["camera"] += camera is not None and camera is not CameraHealth.OK
            at_risk["clock"] += synced is False
        if conn is Connectivity.ONLINE and skew is not None:
            max_skew = max(max_skew, abs(skew))

    for c, n in conns.items():
        m.devices.labels(connectivity=c.value).set(n)
    for s, n in states.items():
        m.devices_state.labels(state=s.value).set(n)
    m.devices_unhealthy.set(unhealthy)
    for reason in ("camera_fault", "camera_unplugged", "clock_unsynced"):
        m.devices_unhealthy_reason.labels(reason=reason).set(unhealthy_reasons[reason])
    for reason in ("offline", "camera", "clock"):
        m.devices_at_risk.labels(reason=reason).set(at_risk[reason])
    m.lock_mismatch.labels(desired="armed").set(want_armed_n)
    m.lock_mismatch.labels(desired="locked").set(want_locked_n)
    m.armed_past_end.set(past_end)
    m.device_clock_skew_max.set(max_skew)
    set_labelled(m.devices_firmware, "version", _top(firmware, FIRMWARE_TOP), known_firmware)


def _top(counts: Counter[str], keep: int) -> dict[str, int]:
    common = dict(counts.most_common(keep))
    rest = sum(counts.values()) - sum(common.values())
    if rest:
        common["other"] = rest
    return common


# --- certificates ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertSummary:
    """Valid certificates of one kind: how many, the soonest notAfter, how many expire soon."""

    valid: int
    soonest: float
    expiring: int


def inventory_certificates(session: Session, now: float) -> CertSummary | None:
    """Device certificates from the inventory (issued by pairing and renewal), or None while
    it records none: then the PKI directory's files are the source. One aggregate query."""
    from .inventory import CertStatus, DeviceCertificate

    not_after = col(DeviceCertificate.not_after)
    n, soonest, expiring = session.exec(
        select(
            func.count(),
            func.min(not_after),
            func.sum(case((not_after - now < CERT_SOON_S, 1), else_=0)),
        ).where(
            col(DeviceCertificate.status).in_([CertStatus.ACTIVE, CertStatus.PENDING]),
            not_after > now,
        )
    ).one()
    if not n:
        return None
    return CertSummary(int(n), float(soonest), int(expiring or 0))


@dataclass(frozen=True, slots=True)
class _Cert:
    mtime_ns: int
    not_after: float
    serial: int


class CertificateWatch:
    """Certificate and CRL expiry from the files the fleet can read.

    - ``ca_file`` and ``cert_file`` (the fleet's own client certificate) always;
    - device certificates: from the device inventory when it records any (paired
      devices, see :func:`inventory_certificates`), else ``{pki_dir}/devices/*.crt``
      (certificates issued with ``tillsyn pki device``) less those on the CRL, parsed once
      and cached by modification time;
    - the CRL: ``{pki_dir}/crl.pem`` (nextUpdate and the revoked count).

    ``pki_dir`` defaults to the directory of ``ca_file``. A kind with no certificate
    exports no series ("no data"), never a misleading 0.
    """

    def __init__(
        self,
        metrics: FleetMetrics,
        *,
        ca_file: Path,
        cert_file: Path,
        pki_dir: Path | None = None,
        every_s: float = CERT_REFRESH_S,
    ) -> None:
        self._m = metrics
        self._ca_file = ca_file
        self._cert_file = cert_file
        self._pki = pki_dir if pki_dir is not None else ca_file.parent
        self._every_s = every_s
        self._last: float | None = None
        self._cache: dict[Path, _Cert] = {}
        self._exported: set[str] = set()

    def refresh(
        self, now: float, *, inventory: CertSummary | None = None, force: bool = False
    ) -> None:
        """``inventory``: device certificates from the database (applied at once, it is
        cheap); the files are re-read every ``every_s`` (or when ``force``)."""
        if inventory is not None:
            self._set("device", inventory)
        if not force and self._last is not None and now - self._last < self._every_s:
            return
        self._last = now
        revoked = self._crl()
        files = {
            "ca": self._certs([self._ca_file]),
            "fleet": self._certs([self._cert_file]),
            "device": [c for c in self._certs(self._device_files()) if c.serial not in revoked],
        }
        for kind in CERT_KINDS:
            if kind == "device" and inventory is not None:
                continue
            certs = files[kind]
            valid = [c for c in certs if c.not_after > now]
            # An expired certificate still counts for "soonest": in the past, it is alerted.
            summary = (
                CertSummary(
                    len(valid),
                    min(c.not_after for c in certs),
                    sum(c.not_after - now < CERT_SOON_S for c in valid),
                )
                if certs
                else None
            )
            self._set(kind, summary)

    def _set(self, kind: str, summary: CertSummary | None) -> None:
        self._m.certs_valid.labels(kind=kind).set(summary.valid if summary else 0)
        if summary is None:
            # Nothing to watch: no series rather than a 0 that reads as "expired in 1970".
            if kind in self._exported:
                self._m.cert_soonest_expiry.remove(kind)
                self._m.certs_expiring.remove(kind)
                self._exported.discard(kind)
            return
        self._exported.add(kind)
        self._m.cert_soonest_expiry.labels(kind=kind).set(summary.soonest)
        self._m.certs_expiring.labels(kind=kind).set(summary.expiring)

    def _device_files(self) -> list[Path]:
        devices = self._pki / "devices"
        try:
            with os.scandir(devices) as entries:
                return [Path(e.path) for e in entries if e.name.endswith(".crt")]
        except OSError:
            return []

    def _certs(self, paths: Iterable[Path]) -> list[_Cert]:
        out: list[_Cert] = []
        seen: set[Path] = set()
        for path in paths:
            seen.add(path)
            try:
                mtime = path.stat().st_mtime_ns
            except OSError:
                continue
            cached = self._cache.get(path)
            if cached is None or cached.mtime_ns != mtime:
                cached = self._parse(path, mtime)
                if cached is None:
                    continue
                self._cache[path] = cached
            out.append(cached)
        return out

    @staticmethod
    def _parse(path: Path, mtime: int) -> _Cert | None:
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError) as exc:
            log.warning("cannot read certificate %s: %s", path.name, type(exc).__name__)
            return None
        return _Cert(mtime, cert.not_valid_after_utc.timestamp(), cert.serial_number)

    def _crl(self) -> set[int]:
        path = self._pki / "crl.pem"
        try:
            crl = x509.load_pem_x509_crl(path.read_bytes())
        except FileNotFoundError:
            return set()  # the CRL lives with the broker; 0 = unknown (see the alert rule)
        except (OSError, ValueError) as exc:
            log.warning("cannot read CRL %s: %s", path.name, type(exc).__name__)
            return set()
        if crl.next_update_utc is not None:
            self._m.crl_next_update.set(crl.next_update_utc.timestamp())
        serials = {r.serial_number for r in crl}
        self._m.certs_revoked.set(len(serials))
        return serials
