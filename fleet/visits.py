"""Physical visits: raised once per cause, never silently deleted."""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from tillsyn_protocol.topics import VISITS_TOPIC

from . import audit, outbox
from .errors import Conflict, NotFound
from .metrics import FleetMetrics
from .models import Device, Visit, VisitCause, VisitStatus
from .outbound import Publish

log = logging.getLogger(__name__)


def visit_json(visit: Visit) -> dict[str, Any]:
    data = visit.model_dump()
    data["evidence"] = json.loads(visit.evidence)
    return data


def raise_visit(
    session: Session,
    metrics: FleetMetrics,
    *,
    key: str,
    cause: VisitCause,
    device: Device | None,
    due_at: float,
    now: float,
    evidence: dict[str, Any],
) -> Publish | None:
    """Raise a visit unless one with this key exists. Returns the notification to publish."""
    if session.exec(select(Visit.id).where(Visit.key == key)).first() is not None:
        return None
    visit = Visit(
        key=key,
        cause=cause,
        due_at=due_at,
        raised_at=now,
        device_id=device.id if device else None,
        resident_id=device.resident_id if device else None,
        evidence=json.dumps(evidence, sort_keys=True, default=str)[:4000],
    )
    try:
        with session.begin_nested():
            session.add(visit)
            session.flush()
    except IntegrityError:  # raced with another writer: it exists, which is all we want
        return None
    audit.append(
        session,
        ts=now,
        actor="fleet",
        action="visit.raised",
        subject=visit.device_id,
        visit_id=visit.id,
        cause=cause.value,
        key=key,
    )
    metrics.visits_raised.labels(cause=cause.value).inc()
    if cause is VisitCause.ARM_UNCONFIRMED:  # the window started and the device never armed
        metrics.windows.labels(event="missed").inc()
    log.warning("visit raised id=%s cause=%s device=%s", visit.id, cause.value, visit.device_id)
    # Other systems: durable, at least once (fleet/outbox.py), in this same transaction.
    outbox.enqueue(session, kind="visit.raised", payload={"visit": visit_json(visit)}, now=now)
    payload = json.dumps({"event": "visit.raised", "visit": visit_json(visit)}).encode()
    return Publish(VISITS_TOPIC, payload, qos=1)


def mark_device_back(session: Session, device_id: str, now: float) -> int:
    """A device came back: flag its open offline visits (kept for staff to close)."""
    stmt = select(Visit).where(
        Visit.device_id == device_id,
        Visit.cause == VisitCause.DEVICE_OFFLINE,
        Visit.status != VisitStatus.CLOSED,
        Visit.device_back_at == None,  # noqa: E711
    )
    count = 0
    for visit in session.exec(stmt):
        visit.device_back_at = now
        session.add(visit)
        audit.append(
            session,
            ts=now,
            actor="fleet",
            action="visit.device_back",
            subject=device_id,
            visit_id=visit.id,
        )
        outbox.enqueue(
            session, kind="visit.device_back", payload={"visit": visit_json(visit)}, now=now
        )
        count += 1
    return count


def close_visit(session: Session, visit_id: int, *, by: str, outcome: str, now: float) -> Visit:
    visit = session.get(Visit, visit_id)
    if visit is None:
        raise NotFound("visit", visit_id)
    if visit.status is VisitStatus.CLOSED:
        raise Conflict(f"visit {visit_id} is already closed")
    visit.status = VisitStatus.CLOSED
    visit.closed_at, visit.closed_by, visit.outcome = now, by, outcome
    session.add(visit)
    audit.append(
        session,
        ts=now,
        actor=by,
        action="visit.closed",
        subject=visit.device_id,
        visit_id=visit_id,
        outcome=outcome,
    )
    outbox.enqueue(session, kind="visit.closed", payload={"visit": visit_json(visit)}, now=now)
    return visit


def acknowledge_visit(session: Session, visit_id: int, *, by: str, now: float) -> Visit:
    visit = session.get(Visit, visit_id)
    if visit is None:
        raise NotFound("visit", visit_id)
    if visit.status is not VisitStatus.OPEN:
        raise Conflict(f"visit {visit_id} is {visit.status.value}")
    visit.status = VisitStatus.ACKNOWLEDGED
    session.add(visit)
    audit.append(
        session,
        ts=now,
        actor=by,
        action="visit.acknowledged",
        subject=visit.device_id,
        visit_id=visit_id,
    )
    outbox.enqueue(
        session, kind="visit.acknowledged", payload={"visit": visit_json(visit)}, now=now
    )
    return visit
