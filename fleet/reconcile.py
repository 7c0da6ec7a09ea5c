"""Level-triggered reconciliation: desired lock state from windows, care-plan checks and
the clock, compared with what the device reported, and the one action that closes the gap.

Desired state: armed while any *span* is open. A span is the union of overlapping windows:
legacy ``Window`` rows and the checks of care plans that still want the device armed
(``upcoming``/``open``/``looked``; a check with an outcome no longer does, so the device
re-locks as soon as staff record it).

The scheduler only decides *when* this runs (window edges, start-up, device back online,
a periodic sweep). Running it late, twice or after a missed job gives the same result as
running it on time, which is what makes the scheduler safe to restart at any moment.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from sqlmodel import Session

from tillsyn_protocol import CameraHealth, CommandKind, LockState
from tillsyn_protocol.windows import Occurrence, occurrences_between

from . import checks, visits
from .commands import Ledger
from .metrics import FleetMetrics
from .models import Command, Connectivity, Device, VisitCause
from .outbound import Publish
from .plan_models import Check
from .snapshot import AnyWindow, DeviceData

log = logging.getLogger(__name__)

# The device re-locks itself at its window end; give its report this long to arrive
# before the fleet sends a disarm of its own and counts the device as armed past its end.
LOCK_GRACE_S = 5.0
# How far ahead the next edge is looked for (a device with nothing in it is looked at by
# the sweep, and by every change that concerns it).
EDGE_HORIZON_S = 8 * 86400.0
DAY_S = 86400


@dataclass(frozen=True, slots=True)
class Policy:
    arm_confirm_s: float
    visit_horizon_s: float
    preflight_s: float = 1800.0  # readiness of a device is checked this long before a check


@dataclass(frozen=True, slots=True)
class Span:
    """A stretch of real time in which the device should be armed, and the checks in it."""

    start: float
    end: float
    checks: tuple[Check, ...] = ()

    def contains(self, now: float) -> bool:
        return self.start <= now < self.end


def parse_hms(text: str) -> time:
    return time.fromisoformat(text)


def occurrences(windows: Iterable[AnyWindow], start: float, end: float) -> list[Occurrence]:
    """Every window occurrence of these windows overlapping [start, end), in time order."""
    lo, hi = datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC)
    first, last = int(start // DAY_S), int(end // DAY_S) + 1
    out: list[Occurrence] = []
    for w in windows:
        if not w.active:
            continue
        found = _window_days(w.start_local, w.duration_s, w.tz, w.weekdays, first, last)
        out.extend(o for o in found if o.end > lo and o.start < hi)
    return sorted(out)


@functools.lru_cache(maxsize=4096)
def _window_days(
    start_local: str, duration_s: int, tz: str, weekdays: str, first: int, last: int
) -> tuple[Occurrence, ...]:
    """A window's occurrences overlapping whole UTC days [first, last) (days since the
    epoch). Memoised: thousands of devices share a few agreed times, and a reconcile
    recomputed each device's next eight days with zoneinfo, 15 % of the fleet's CPU in a
    window start storm (py-spy). Pure: the same window and days give the same result."""
    return tuple(
        occurrences_between(
            [parse_hms(start_local)],
            timedelta(seconds=duration_s),
            datetime.fromtimestamp(first * DAY_S, UTC),
            datetime.fromtimestamp(last * DAY_S, UTC),
            tz=ZoneInfo(tz),
            weekdays=frozenset(int(d) for d in weekdays),
        )
    )


@functools.lru_cache(maxsize=4096)
def _window_day_times(
    start_local: str, duration_s: int, tz: str, weekdays: str, first: int, last: int
) -> tuple[tuple[float, float], ...]:
    """:func:`_window_days` as epoch seconds (start, end): what spans are made of, and
    ``datetime.timestamp()`` per occurrence per device was a third of ``spans_of``."""
    found = _window_days(start_local, duration_s, tz, weekdays, first, last)
    return tuple((o.start.timestamp(), o.end.timestamp()) for o in found)


def open_window(windows: Iterable[AnyWindow], now: float) -> Occurrence | None:
    at = datetime.fromtimestamp(now, UTC)
    found = [o for o in occurrences(windows, now, now + 1) if o.contains(at)]
    # Overlapping windows merge: the device stays armed until the latest end.
    return max(found, key=lambda o: o.end) if found else None


WindowKey = tuple[tuple[str, int, str, str], ...]


def spans_of(
    windows: Iterable[AnyWindow], arming: Iterable[Check], lo: float, hi: float
) -> list[Span]:
    """Windows and arming checks overlapping [lo, hi), overlapping ones merged, in order."""
    key: WindowKey = tuple(
        (w.start_local, w.duration_s, w.tz, w.weekdays) for w in windows if w.active
    )
    found = checks.overlapping(arming, lo, hi)
    if not found:
        return list(_window_spans(key, lo, hi))
    return _merged(_window_raw(key, lo, hi) + [Span(c.start_at, c.end_at, (c,)) for c in found])


@functools.lru_cache(maxsize=1024)
def _window_spans(key: WindowKey, lo: float, hi: float) -> tuple[Span, ...]:
    """:func:`spans_of` of windows alone. Memoised: a reconcile pass decides every device
    at one ``now``, and thousands of devices share a few agreed times (an edge's spans
    and next edges, computed per device, were 6 % of a window start storm). Spans are
    frozen, so the result is shared."""
    return tuple(_merged(_window_raw(key, lo, hi)))


def _window_raw(key: WindowKey, lo: float, hi: float) -> list[Span]:
    day0, day1 = int(lo // DAY_S), int(hi // DAY_S) + 1
    return [
        Span(start, end)
        for start_local, duration_s, tz, weekdays in key
        for start, end in _window_day_times(start_local, duration_s, tz, weekdays, day0, day1)
        if end > lo and start < hi
    ]


def _merged(raw: list[Span]) -> list[Span]:
    merged: list[Span] = []
    for span in sorted(raw, key=lambda s: (s.start, s.end)):
        if merged and span.start < merged[-1].end:
            last = merged[-1]
            merged[-1] = Span(last.start, max(last.end, span.end), last.checks + span.checks)
        else:
            merged.append(span)
    return merged


def device_spans(
    session: Session, device_id: str, windows: Iterable[AnyWindow], lo: float, hi: float
) -> list[Span]:
    """``spans_of`` for one device, its checks read from the database."""
    return spans_of(windows, checks.device_checks(session, device_id, lo, hi), lo, hi)


def open_span(spans: Iterable[Span], now: float) -> Span | None:
    return next((s for s in spans if s.contains(now)), None)


def next_edge(
    data: DeviceData, now: float, policy: Policy, deadlines: Iterable[float]
) -> float | None:
    """The next instant at which this device's desired state or checks may change."""
    edges = list(deadlines)
    for span in spans_of(data.windows, data.arming(), now, now + EDGE_HORIZON_S):
        edges += [span.start, span.end]
        for c in span.checks:
            edges += [c.start_at - policy.preflight_s, c.start_at, c.end_at]
            edges.append(c.start_at + policy.arm_confirm_s)
    if data.later_check is not None:  # its pre-flight: the earliest of its edges
        edges.append(data.later_check - policy.preflight_s)
    device = data.device
    if device.armed_until is not None and device.reported_state is not LockState.LOCKED:
        edges.append(device.armed_until + LOCK_GRACE_S)
    future = [e for e in edges if e > now]
    return min(future) if future else None


def arm_ahead(data: DeviceData, at: float) -> tuple[str, int, int] | None:
    """The arm :func:`reconcile_device` will issue at ``at`` if nothing about the device
    changes until then, as (device, seq, until), for the ledger to sign ahead; None if it
    will issue none. Only a prediction: the edge decides again, and uses the signature
    only for exactly this arm."""
    device = data.device
    if _held(device, at):
        return None
    occ = open_span(spans_of(data.windows, data.arming(), at - 1, at + 1), at)
    if occ is None:
        return None
    until = int(occ.end)
    if _armed_until(device, until) or _arm_pending(data.pending_now(), until):
        return None
    return device.id, max(device.next_seq, device.device_last_seq + 1), until


def _held(device: Device, now: float) -> bool:
    """A commissioning test is driving this device (fleet/commissioning.py)."""
    return device.hold_until is not None and now < device.hold_until


def _armed_until(device: Device, until: int) -> bool:
    return device.reported_state is not LockState.LOCKED and device.armed_until == until


def _arm_pending(pending: Iterable[Command], until: int) -> bool:
    return any(c.kind is CommandKind.ARM and c.until == until for c in pending)


def reconcile_device(
    session: Session,
    ledger: Ledger,
    metrics: FleetMetrics,
    policy: Policy,
    data: DeviceData,
    now: float,
) -> list[Publish]:
    """One device, from what ``fleet.snapshot.load`` read (for many devices at once);
    writes go to the caller's session, in the caller's transaction."""
    device = data.device
    if _held(device, now):
        return []
    ctx = checks.Ctx(metrics, policy.preflight_s)
    out: list[Publish] = checks.advance_device(session, ctx, data, now)
    ahead = max(policy.visit_horizon_s, policy.preflight_s)
    spans = spans_of(data.windows, data.arming(), now - 1, now + ahead + 1)
    occ = open_span(spans, now)
    pending = data.pending_now()
    reported = device.reported_state
    if occ is not None:
        until = int(occ.end)
        armed = _armed_until(device, until)
        if not armed and not _arm_pending(pending, until):
            out.append(
                ledger.issue(
                    session, device, CommandKind.ARM, now=now, until=until, pending=data.pending
                )
            )
        if not armed and now - occ.start >= policy.arm_confirm_s:
            key = f"arm:{device.id}:{int(occ.start)}"
            pub = visits.raise_visit(
                session,
                metrics,
                key=key,
                cause=VisitCause.ARM_UNCONFIRMED,
                device=device,
                due_at=occ.start,
                now=now,
                evidence={"window_start": _iso(occ.start), "reported_state": reported.value},
            )
            out += [pub] if pub else []
            checks.link_visit_key(session, key, occ.checks)
    elif reported is not LockState.LOCKED:
        out += _lock(session, ledger, metrics, data, pending, now)
    out += _fallback_visits(session, metrics, policy, device, spans, occ, now)
    out += checks.preflight(session, ctx, data, now, window_open=occ is not None)
    return out


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def _lock(
    session: Session,
    ledger: Ledger,
    metrics: FleetMetrics,
    data: DeviceData,
    pending: Iterable[Command],
    now: float,
) -> list[Publish]:
    device = data.device
    ends = device.armed_until
    if ends is not None and now < ends + LOCK_GRACE_S and ends <= now:
        return []  # the device's own timer is locking it right now; let it report
    if any(c.kind is CommandKind.DISARM for c in pending):
        return []
    if ends is not None and ends <= now:
        log.error("device=%s still reported armed past its window end", device.id)
    return [ledger.issue(session, device, CommandKind.DISARM, now=now, pending=data.pending)]


def _fallback_visits(
    session: Session,
    metrics: FleetMetrics,
    policy: Policy,
    device: Device,
    spans: Iterable[Span],
    occ: Span | None,
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
        horizon = now + policy.visit_horizon_s
        due = next((s for s in spans if now < s.start < horizon), None)
    if due is None:
        return []
    start = due.start
    evidence = {
        "connectivity": device.connectivity.value,
        "offline_since": device.offline_since,
        "last_seen": device.last_seen,
        "camera": device.camera.value if device.camera else None,
        "window_start": _iso(due.start),
        "window_end": _iso(due.end),
    }
    out = []
    for cause, tag in causes:
        key = f"{tag}:{device.id}:{int(start)}"
        pub = visits.raise_visit(
            session,
            metrics,
            key=key,
            cause=cause,
            device=device,
            due_at=start,
            now=now,
            evidence=evidence,
        )
        out += [pub] if pub else []
        checks.link_visit_key(session, key, due.checks)
    return out
