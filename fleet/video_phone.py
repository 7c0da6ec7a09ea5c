"""Video phones: a look is a call the resident must answer.

The device rings only as part of a signed ``look`` (there is no command that places a
call, and the agent has no other path to the driver's ring). It reports
``call_answered`` or ``call_not_answered``; the fleet records it on the :class:`Look`
row (``answered``). Not answered counts as *not seen*: the check's recheck and
escalation rules apply exactly as when staff saw nobody on a camera.
"""

from __future__ import annotations

import logging

from sqlmodel import Session

from tillsyn_protocol import Event, EventKind

from . import audit
from .metrics import FleetMetrics
from .models import Device, Look

__all__ = ["on_call"]

log = logging.getLogger(__name__)


def on_call(
    session: Session, device: Device, event: Event, now: float, metrics: FleetMetrics
) -> None:
    look = session.get(Look, event.look_id) if event.look_id else None
    if look is None or look.device_id != device.id:
        metrics.ingest_errors.labels(channel="event", why="unknown_look").inc()
        return
    answered = event.kind is EventKind.CALL_ANSWERED
    look.answered = answered
    session.add(look)
    audit.append(
        session,
        ts=now,
        actor=look.staff_id,
        action="look.call_answered" if answered else "look.call_not_answered",
        subject=device.id,
        look_id=look.id,
        resident=device.resident_id,
        seen=None if answered else False,
    )
    if not answered:
        log.info("device=%s look=%s: the call was not answered (not seen)", device.id, look.id)
