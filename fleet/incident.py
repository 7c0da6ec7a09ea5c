"""Platform incidents: one incident for IT support when many devices drop at once.

A broker crash, a network segment or an expired CRL takes many devices offline together.
Each resident's visit is still raised by the ordinary offline logic (safety first); what
this adds is *one* incident for the platform, so IT support gets one page instead of
reading a hundred device alarms as device faults.

:class:`Detector` is pure: the liveness job feeds it the online count and whether the
fleet's own broker link is up, with a monotonic ``now``, and gets back what to record.
It opens an incident when

- at least ``min_devices`` devices, or ``min_share`` of the online fleet (never fewer
  than :data:`SHARE_FLOOR`), went offline within ``window_s`` (``mass_disconnect``), or
- the fleet's own broker link has been down longer than ``link_down_s`` (``broker_link``:
  the devices may be fine, but the fleet hears none of them);

and closes it once the link is up and ``close_share`` of the devices lost are back, held
for ``settle_s`` (so the tail of one outage does not read as a second one).

:class:`PlatformIncidents` is the thin shell: metrics, an audit entry and an outbox event
(``incident.opened`` / ``incident.closed``) per transition. It stores no table: an open
incident is found again after a restart from the audit log. No device or resident ids
are recorded, only counts.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlmodel import Session, col, select

from . import audit, outbox
from .metrics import FleetMetrics
from .models import AuditEvent

__all__ = [
    "INCIDENT_REASONS",
    "SHARE_FLOOR",
    "Closed",
    "Detector",
    "Opened",
    "PlatformIncidents",
]

log = logging.getLogger(__name__)

Reason = Literal["mass_disconnect", "broker_link"]
INCIDENT_REASONS: tuple[Reason, ...] = ("mass_disconnect", "broker_link")
# A share never counts fewer devices than this: two neighbours losing power at once is
# not a platform incident, however small the fleet.
SHARE_FLOOR = 3
ACTOR = "fleet"


@dataclass(frozen=True, slots=True)
class Opened:
    incident_id: str
    reason: Reason
    online_before: int  # devices online just before the drop
    offline: int  # devices lost so far (0 for a link incident caught before any silence)


@dataclass(frozen=True, slots=True)
class Closed:
    incident_id: str
    reason: Reason
    duration_s: float
    back: int  # devices back online when it closed
    lost: int  # the most devices lost during the incident


@dataclass(slots=True)
class _Open:
    incident_id: str
    reason: Reason
    since: float
    reference: int  # online before the drop
    trough: int  # fewest online since
    settled_since: float | None = None


@dataclass(slots=True)
class Detector:
    """Sans-I/O: ``observe`` once per liveness tick; times are monotonic seconds."""

    min_devices: int = 20
    min_share: float = 0.2
    window_s: float = 300.0
    link_down_s: float = 90.0
    close_share: float = 0.8
    settle_s: float = 60.0
    new_id: Callable[[], str] = field(default=lambda: f"inc-{uuid.uuid4().hex[:12]}")
    _history: deque[tuple[float, int]] = field(default_factory=deque)
    _link_down_since: float | None = None
    _open: _Open | None = None

    @property
    def active(self) -> bool:
        return self._open is not None

    @property
    def incident_id(self) -> str | None:
        return self._open.incident_id if self._open else None

    def resume(self, incident_id: str, reason: Reason, reference: int, now: float) -> None:
        """An incident left open by a previous process (from the audit log)."""
        self._open = _Open(incident_id, reason, now, reference, 0)

    def observe(self, now: float, *, online: int, link_up: bool) -> Opened | Closed | None:
        if link_up:
            self._link_down_since = None
        elif self._link_down_since is None:
            self._link_down_since = now
        # The peak of the recent past is "online before the drop".
        while self._history and self._history[0][0] < now - self.window_s:
            self._history.popleft()
        self._history.append((now, online))
        if self._open is None:
            return self._maybe_open(now, online)
        return self._maybe_close(now, online, link_up)

    def _maybe_open(self, now: float, online: int) -> Opened | None:
        peak = max(n for _, n in self._history)
        dropped = peak - online
        needed = min(self.min_devices, max(SHARE_FLOOR, self.min_share * peak))
        reason: Reason | None = None
        if dropped > 0 and dropped >= needed:
            reason = "mass_disconnect"
        elif self._link_down_since is not None and now - self._link_down_since > self.link_down_s:
            reason = "broker_link"
        if reason is None:
            return None
        self._open = _Open(self.new_id(), reason, now, peak, online)
        return Opened(self._open.incident_id, reason, peak, dropped)

    def _maybe_close(self, now: float, online: int, link_up: bool) -> Closed | None:
        inc = self._open
        assert inc is not None
        inc.trough = min(inc.trough, online)
        lost = inc.reference - inc.trough
        back = online - inc.trough
        if not (link_up and back >= self.close_share * lost):
            inc.settled_since = None
            return None
        if inc.settled_since is None:
            inc.settled_since = now
        if now - inc.settled_since < self.settle_s:
            return None
        self._open = None
        # A new incident must see a new drop, not the one just closed.
        self._history.clear()
        self._history.append((now, online))
        return Closed(inc.incident_id, inc.reason, round(now - inc.since, 3), back, lost)


def last_open(session: Session) -> tuple[str, Reason, int] | None:
    """The incident a previous process opened and never closed, from the audit log."""
    entry = session.exec(
        select(AuditEvent)
        .where(col(AuditEvent.action).in_(("incident.opened", "incident.closed")))
        .order_by(col(AuditEvent.id).desc())
        .limit(1)
    ).first()
    if entry is None or entry.action != "incident.opened" or entry.subject is None:
        return None
    detail: dict[str, Any] = json.loads(entry.detail)
    reason: Reason = "broker_link" if detail.get("reason") == "broker_link" else "mass_disconnect"
    return entry.subject, reason, int(detail.get("online_before", 0))


def record(session: Session, change: Opened | Closed, *, now: float, fleet: int) -> None:
    """Audit entry and outbox event in one transaction (counts only, no ids of people)."""
    if isinstance(change, Opened):
        action = "incident.opened"
        detail: dict[str, Any] = {
            "reason": change.reason,
            "online_before": change.online_before,
            "offline": change.offline,
            "fleet": fleet,
        }
    else:
        action = "incident.closed"
        detail = {
            "reason": change.reason,
            "duration_s": change.duration_s,
            "back": change.back,
            "lost": change.lost,
            "fleet": fleet,
        }
    audit.append(session, ts=now, actor=ACTOR, action=action, subject=change.incident_id, **detail)
    payload = {"incident": {"id": change.incident_id, **detail}, "at": now}
    outbox.enqueue(session, kind=action, payload=payload, now=now)


class PlatformIncidents:
    """The shell around :class:`Detector`, driven by ``FleetService._liveness``."""

    def __init__(
        self,
        detector: Detector,
        metrics: FleetMetrics,
        *,
        db: Callable[..., Awaitable[Any]],
        run: Callable[..., Any],
    ) -> None:
        self.detector = detector
        self._metrics = metrics
        self._db = db  # async: a function on the database thread
        self._run = run  # FleetOps.run: fn(session) in one transaction
        self._resumed = False

    async def tick(
        self, *, mono: float, now: float, online: int, fleet: int, link_up: bool
    ) -> Opened | Closed | None:
        if not self._resumed:
            self._resumed = True
            found = await self._db(self._run, last_open)
            if found is not None:
                incident_id, reason, reference = found
                self.detector.resume(incident_id, reason, reference, now=mono)
                log.warning("platform incident %s still open from before a restart", found[0])
        change = self.detector.observe(mono, online=online, link_up=link_up)
        if change is not None:
            await self._db(self._run, lambda s: record(s, change, now=now, fleet=fleet))
            if isinstance(change, Opened):
                self._metrics.platform_incidents.labels(reason=change.reason).inc()
                log.error(
                    "platform incident %s opened (%s): %d of %d online devices lost",
                    change.incident_id,
                    change.reason,
                    change.offline,
                    change.online_before,
                )
            else:
                log.warning(
                    "platform incident %s closed after %.0f s: %d of %d back",
                    change.incident_id,
                    change.duration_s,
                    change.back,
                    change.lost,
                )
        self._metrics.platform_incident_active.set(1 if self.detector.active else 0)
        return change
