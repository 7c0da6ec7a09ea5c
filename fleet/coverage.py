"""The nightly coverage report: did every resident with a plan get their checks?

Two questions, every problem listed (an empty list is the only good answer):

1. every active plan has a paired, healthy device: one that exists, is registered to the
   plan's resident (or to nobody), is online, has a working camera and a synchronised clock;
2. every check the plan called for last night ended with an outcome or a visit: the plan
   is expanded again from its rules (not from the check rows), so a check that was never
   even created (the service was down, the plan pointed at the wrong device...) shows up.

A resident once went without supervision for three months because a device had been
deactivated under the wrong inventory number. This report is what catches that.
"""

from __future__ import annotations

import json
import logging
from datetime import date
from typing import Any

from sqlmodel import Session, col, select

from tillsyn_protocol import CameraHealth

from . import outbox
from .checks import spec_of
from .models import Connectivity, Device
from .plan_models import (
    CarePlan,
    Check,
    CheckKind,
    CheckState,
    CoverageReport,
    EscalationStep,
    PlanStatus,
    StepResult,
    VisitLink,
)
from .plan_rules import Planned, format_time, night_bounds, planned_night

log = logging.getLogger(__name__)

NOT_PLANNED = frozenset({CheckState.OPTED_OUT, CheckState.PAUSED, CheckState.CANCELLED})


def _device_problems(plan: CarePlan, device: Device | None) -> list[str]:
    if plan.device_id is None:
        return ["no device paired with the plan"]
    if device is None:
        return [f"device {plan.device_id} is not in the inventory"]
    out = []
    if device.resident_id is not None and device.resident_id != plan.resident_id:
        out.append(f"device {device.id} is registered to another resident")
    if device.connectivity is not Connectivity.ONLINE:
        out.append(f"device {device.id} is {device.connectivity.value}")
    if device.camera is not None and device.camera is not CameraHealth.OK:
        out.append(f"device {device.id} camera {device.camera.value}")
    if device.clock_synced is False:
        out.append(f"device {device.id} clock not synchronised")
    return out


def _covered(session: Session, check: Check) -> str | None:
    """None if the check ended with an outcome or a visit, else why not."""
    if check.outcome is not None:
        return None
    if session.exec(select(VisitLink.visit_id).where(VisitLink.check_id == check.id)).first():
        return None
    resolved = session.exec(
        select(EscalationStep.id).where(
            EscalationStep.check_id == check.id, EscalationStep.result == StepResult.RESOLVED
        )
    ).first()
    if resolved is not None:
        return None
    if check.state in (CheckState.UPCOMING, CheckState.OPEN, CheckState.LOOKED):
        return f"check still {check.state.value}"
    if check.state is CheckState.ESCALATED:
        return "no outcome; escalation not finished"
    return "ended with no outcome and no visit"


def report(session: Session, night: date) -> dict[str, Any]:
    """The coverage of one night (computed, not stored)."""
    problems: list[dict[str, Any]] = []
    plans = session.exec(select(CarePlan).where(CarePlan.status != PlanStatus.DRAFT)).all()
    counted_plans = counted_checks = 0
    for plan in plans:
        tz_start, _ = night_bounds(night, spec_of(session, plan).tz)
        if plan.status is PlanStatus.ENDED and (plan.ended_at or 0) <= tz_start.timestamp():
            continue
        if plan.valid_from > night or (plan.valid_until and plan.valid_until < night):
            continue
        counted_plans += 1
        device = session.get(Device, plan.device_id) if plan.device_id else None
        base = {"plan_id": plan.id, "resident_id": plan.resident_id, "team": plan.team}
        if plan.status is PlanStatus.ACTIVE:
            for trouble in _device_problems(plan, device):
                problems.append({**base, "kind": "device", "why": trouble})
        rows = {
            (c.agreed, c.kind): c
            for c in session.exec(
                select(Check).where(Check.plan_id == plan.id, Check.night == night)
            )
        }
        ended_at = plan.ended_at if plan.status is PlanStatus.ENDED else None
        for pc in planned_night(spec_of(session, plan), night):
            if pc.status is not Planned.SCHEDULED:
                continue
            if ended_at is not None and pc.slot.start.timestamp() >= ended_at:
                continue
            if plan.activated_at is None or pc.slot.end.timestamp() <= plan.activated_at:
                continue  # the plan was not in force yet
            agreed = format_time(pc.slot.agreed)
            check = rows.get((agreed, CheckKind.SCHEDULED))
            counted_checks += 1
            if check is None:
                problems.append({**base, "kind": "check", "agreed": agreed, "why": "never created"})
                continue
            if check.state in NOT_PLANNED:
                continue
            why = _covered(session, check)
            if why is not None:
                problems.append(
                    {**base, "kind": "check", "check_id": check.id, "agreed": agreed, "why": why}
                )
            if check.state is CheckState.RECHECK_DUE:
                recheck = rows.get((agreed, CheckKind.RECHECK))
                rwhy: str | None = (
                    "recheck never created" if recheck is None else _covered(session, recheck)
                )
                if rwhy is not None:
                    problems.append(
                        {**base, "kind": "recheck", "agreed": agreed, "why": rwhy}
                        | ({"check_id": recheck.id} if recheck else {})
                    )
    return {
        "night": night.isoformat(),
        "ok": not problems,
        "plans": counted_plans,
        "checks": counted_checks,
        "problems": problems,
    }


def store(session: Session, night: date, now: float) -> CoverageReport | None:
    """Compute and keep the report of a night once; also published through the outbox."""
    if session.exec(select(CoverageReport.id).where(CoverageReport.night == night)).first():
        return None
    data = report(session, night)
    row = CoverageReport(
        night=night,
        generated_at=now,
        ok=data["ok"],
        plans=data["plans"],
        checks=data["checks"],
        problems=json.dumps(data["problems"], default=str),
    )
    session.add(row)
    outbox.enqueue(session, kind="coverage.report", payload=data, now=now)
    if data["problems"]:
        log.warning("coverage of night %s: %d problem(s)", night.isoformat(), len(data["problems"]))
    return row


def reports(session: Session, limit: int = 30) -> list[dict[str, Any]]:
    rows = session.exec(
        select(CoverageReport).order_by(col(CoverageReport.night).desc()).limit(limit)
    ).all()
    out = []
    for r in rows:
        data = r.model_dump(mode="json")
        data["problems"] = json.loads(r.problems)
        out.append(data)
    return out
