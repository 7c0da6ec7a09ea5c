"""Level-triggered reconciliation: desired lock state from windows and the clock, compared
with what the device reported, and the one action that closes the gap.

The scheduler only decides *when* this runs (window edges, start-up, device back online,
a periodic sweep). Running it late, twice or after a missed job gives the same result as
running it on time, which is what makes the scheduler safe to restart at any moment.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from sqlmodel import Session, select

from tillsyn_protocol import CameraHealth, CommandKind, LockState
from tillsyn_protocol.windows import Occurrence, occurrences_between

from . import visits
from .commands import Ledger
from .metrics import FleetMetrics
from .models import Command, Connectivity, Device, VisitCause, Window
from .outbound import Publish

log = logging.getLogger(__name__)

# The device re-locks itself at its window end; give its report this long to arrive
# before the fleet sends a disarm of its own and counts the device as armed past its end.
LOCK_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class Policy:
    arm_confirm_s: float
    visit_horizon_s: float


def parse_hms(text: str) -> time:
    return time.fromisoformat(text)


def occurrences(windows: Iterable[Window], start: float, end: float) -> list[Occurrence]:
    """Every window occurrence of these windows overlapping [start, end), in time order."""
    lo, hi = datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC)
    out: list[Occurrence] = []
    for w in windows:
        if not w.active:
            continue
        out.extend(
            occurrences_between(
                [parse_hms(w.start_local)],
                timedelta(seconds=w.duration_s),
                lo,
                hi,
                tz=ZoneInfo(w.tz),
                weekdays=frozenset(int(d) for d in w.weekdays),
            )
        )
    return sorted(out)


def open_window(windows: Iterable[Window], now: float) -> Occurrence | None:
    at = datetime.fromtimestamp(now, UTC)
    found = [o for o in occurrences(windows, now, now + 1) if o.contains(at)]
    # Overlapping windows merge: the device stays armed until the latest end.
    return max(found, key=lambda o: o.end) if found else None


def next_edge(windows: Iterable[Window], now: float, device: Device) -> float | None:
    """The next instant at which this device's desired state may change."""
    edges = []
    for occ in occurrences(windows, now, now + 8 * 86400):
        edges += [occ.start.timestamp(), occ.end.timestamp()]
    if device.armed_until is not None and device.reported_state is not LockState.LOCKED:
        edges.append(device.armed_until + LOCK_GRACE_S)
    future = [e for e in edges if e > now]
    return min(future) if future else None


def reconcile_device(
    session: Session,
    ledger: Ledger,
    metrics: FleetMetrics,
    policy: Policy,
    device: Device,
    now: float,
) -> list[Publish]:
    windows = session.exec(select(Window).where(Window.device_id == device.id)).all()
    occ = open_window(windows, now)
    pending = ledger.pending(session, device.id)
    out: list[Publish] = []
    reported = device.reported_state
    if occ is not None:
        until = int(occ.end.timestamp())
        armed = reported is not LockState.LOCKED and device.armed_until == until
        arm_pending = any(c.kind is CommandKind.ARM and c.until == until for c in pending)
        if not armed and not arm_pending:
            out.append(ledger.issue(session, device, CommandKind.ARM, now=now, until=until))
            metrics.windows.labels(edge="arm_sent").inc()
        if not armed and now - occ.start.timestamp() >= policy.arm_confirm_s:
            pub = visits.raise_visit(
                session,
                metrics,
                key=f"arm:{device.id}:{int(occ.start.timestamp())}",
                cause=VisitCause.ARM_UNCONFIRMED,
                device=device,
                due_at=occ.start.timestamp(),
                now=now,
                evidence={"window_start": occ.start.isoformat(), "reported_state": reported.value},
            )
            out += [pub] if pub else []
    elif reported is not LockState.LOCKED:
        out += _lock(session, ledger, metrics, device, pending, now)
    out += _fallback_visits(session, metrics, policy, device, windows, occ, now)
    return out


def _lock(
    session: Session,
    ledger: Ledger,
    metrics: FleetMetrics,
    device: Device,
    pending: Iterable[Command],
    now: float,
) -> list[Publish]:
    ends = device.armed_until
    if ends is not None and now < ends + LOCK_GRACE_S and ends <= now:
        return []  # the device's own timer is locking it right now; let it report
    if any(c.kind is CommandKind.DISARM for c in pending):
        return []
    if ends is not None and ends <= now:
        log.error("device=%s still reported armed past its window end", device.id)
    return [ledger.issue(session, device, CommandKind.DISARM, now=now)]


def _fallback_visits(
    session: Session,
    metrics: FleetMetrics,
    policy: Policy,
    device: Device,
    windows: Iterable[Window],
    occ: Occurrence | None,
    now: float,
) -> list[Publish]:
    """One visit per cause per check that this device cannot carry out."""
    causes = []
    if device.connectivity is Connectivity.OFFLINE:
        causes.append((VisitCause.DEVICE_OFFLINE, "offline"))
    if device.camera is not None and device.camera is not CameraHealth.OK:
        causes.append((VisitCause.CAMERA_FAULT, "camera"))
    if not causes:
        return []
    due = occ
    if due is None:
        upcoming = occurrences(windows, now, now + policy.visit_horizon_s)
        due = next((o for o in upcoming if o.start.timestamp() > now), None)
    if due is None:
        return []
    start = due.start.timestamp()
    evidence = {
        "connectivity": device.connectivity.value,
        "offline_since": device.offline_since,
        "last_seen": device.last_seen,
        "camera": device.camera.value if device.camera else None,
        "window_start": due.start.isoformat(),
        "window_end": due.end.isoformat(),
    }
    out = []
    for cause, tag in causes:
        pub = visits.raise_visit(
            session,
            metrics,
            key=f"{tag}:{device.id}:{int(start)}",
            cause=cause,
            device=device,
            due_at=start,
            now=now,
            evidence=evidence,
        )
        out += [pub] if pub else []
    return out
