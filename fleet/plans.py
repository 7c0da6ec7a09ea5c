"""Care plans: create, change, activate, pause, opt out, end. Every change is audited
(who and why) in the transaction that makes it, and re-plans the plan's checks at once.

Rules a plan must keep:

- it is valid as data (times spaced at least a window apart, known time zone, an
  escalation chain ending with a visit, look and recheck lengths in bounds);
- it cannot be ``active`` without a consent reference and date (and the cohabitant's,
  when there is one), nor without a device, and a device serves one active plan;
- an ended plan is history: it cannot be changed or reactivated (make a new one).
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from sqlmodel import Session, col, select

from . import audit, checks
from .errors import Conflict, FleetError, NotFound
from .models import Device
from .outbound import Publish
from .plan_models import CarePlan, PlanOptOut, PlanPause, PlanStatus
from .plan_rules import (
    PlanRuleError,
    format_time,
    load_tz,
    parse_escalation,
    parse_nights,
    parse_times,
    validate_times,
)

EDITABLE = (
    "device_id",
    "team",
    "tz",
    "check_times",
    "nights",
    "window_s",
    "look_s",
    "recheck_delay_s",
    "escalation",
    "call_timeout_s",
    "escalate_unrecorded",
    "visit_on_opt_out",
    "valid_from",
    "valid_until",
    "consent_ref",
    "consent_date",
    "has_cohabitant",
    "cohabitant_consent_ref",
    "cohabitant_consent_date",
)
# Never copied into audit details verbatim (the audit says *that* they changed).
_QUIET = frozenset({"consent_ref", "cohabitant_consent_ref"})
MAX_LOOK_S = 600


class PlanInvalid(FleetError):
    def __init__(self, field_name: str, why: str) -> None:
        super().__init__(f"{field_name}: {why}")
        self.field = field_name
        self.why = why


def _normalise(values: dict[str, Any]) -> dict[str, Any]:
    """API/CLI shapes -> column values (lists to comma strings)."""
    out = dict(values)
    if isinstance(out.get("check_times"), list | tuple):
        out["check_times"] = ",".join(format_time(t) for t in parse_times(out["check_times"]))
    if isinstance(out.get("escalation"), list | tuple):
        out["escalation"] = ",".join(out["escalation"])
    return out


def validate(plan: CarePlan) -> None:
    try:
        times = parse_times(t for t in plan.check_times.split(",") if t)
        validate_times(times, timedelta(seconds=plan.window_s))
        parse_nights(plan.nights)
        parse_escalation([s for s in plan.escalation.split(",") if s])
        load_tz(plan.tz)
    except PlanRuleError as exc:
        raise PlanInvalid(exc.field, exc.why) from None
    if not 1 <= plan.look_s <= MAX_LOOK_S:
        raise PlanInvalid("look_s", f"must be 1..{MAX_LOOK_S} (the device caps it too)")
    if not 60 <= plan.recheck_delay_s <= 6 * 3600:
        raise PlanInvalid("recheck_delay_s", "must be 60 s .. 6 h")
    if not 60 <= plan.call_timeout_s <= 6 * 3600:
        raise PlanInvalid("call_timeout_s", "must be 60 s .. 6 h")
    if plan.valid_until is not None and plan.valid_until < plan.valid_from:
        raise PlanInvalid("valid_until", "before valid_from")


def missing_consent(plan: CarePlan) -> str | None:
    if not plan.consent_ref or plan.consent_date is None:
        return "consent_ref and consent_date are required for an active plan"
    if plan.has_cohabitant and (
        not plan.cohabitant_consent_ref or plan.cohabitant_consent_date is None
    ):
        return "the cohabitant's consent_ref and consent_date are required"
    return None


def _check_active(session: Session, plan: CarePlan) -> None:
    if (why := missing_consent(plan)) is not None:
        raise Conflict(f"plan cannot be active: {why}")
    if plan.device_id is None:
        raise Conflict("plan cannot be active without a device")
    device = session.get(Device, plan.device_id)
    if device is None:
        raise NotFound("device", plan.device_id)
    if device.resident_id is not None and device.resident_id != plan.resident_id:
        raise Conflict(f"device {device.id} is registered to another resident")
    other = session.exec(
        select(CarePlan.id).where(
            CarePlan.device_id == plan.device_id,
            CarePlan.status == PlanStatus.ACTIVE,
            CarePlan.id != plan.id,
        )
    ).first()
    if other is not None:
        raise Conflict(f"device {plan.device_id} already serves active plan {other}")


def get(session: Session, plan_id: int) -> CarePlan:
    plan = session.get(CarePlan, plan_id)
    if plan is None:
        raise NotFound("plan", plan_id)
    return plan


def _audit(
    session: Session,
    plan: CarePlan,
    action: str,
    actor: str,
    reason: str,
    now: float,
    **detail: Any,
) -> None:
    audit.append(
        session,
        ts=now,
        actor=actor,
        action=action,
        subject=plan.resident_id,
        plan_id=plan.id,
        version=plan.version,
        reason=reason,
        **detail,
    )


def _shown(changes: dict[str, Any]) -> dict[str, Any]:
    return {k: ("(set)" if k in _QUIET and v else v) for k, v in changes.items()}


def create(
    session: Session,
    ctx: checks.Ctx,
    values: dict[str, Any],
    *,
    actor: str,
    reason: str,
    now: float,
    activate: bool = False,
) -> tuple[CarePlan, list[Publish]]:
    values = _normalise(values)
    device_id = values.get("device_id")
    device = session.get(Device, device_id) if device_id else None
    if device_id and device is None:
        raise NotFound("device", device_id)
    if values.get("team") is None and device is not None:
        values["team"] = getattr(device, "team", None)
    plan = CarePlan(**values, created_at=now, updated_at=now)
    validate(plan)
    if activate:
        plan.status, plan.activated_at = PlanStatus.ACTIVE, now
        _check_active(session, plan)
    session.add(plan)
    session.flush()
    _audit(session, plan, "plan.created", actor, reason, now, status=plan.status.value)
    return plan, checks.sync_plan(session, ctx, plan, now)


def update(
    session: Session,
    ctx: checks.Ctx,
    plan_id: int,
    changes: dict[str, Any],
    *,
    actor: str,
    reason: str,
    now: float,
) -> tuple[CarePlan, list[Publish]]:
    plan = get(session, plan_id)
    if plan.status is PlanStatus.ENDED:
        raise Conflict(f"plan {plan_id} has ended; create a new plan")
    changes = {k: v for k, v in _normalise(changes).items() if k in EDITABLE}
    changed = {k: v for k, v in changes.items() if getattr(plan, k) != v}
    if not changed:
        return plan, []
    new_device = changed.get("device_id")
    if new_device is not None and session.get(Device, new_device) is None:
        raise NotFound("device", new_device)
    for key, value in changed.items():
        setattr(plan, key, value)
    validate(plan)
    if plan.status is PlanStatus.ACTIVE:
        _check_active(session, plan)
    plan.version += 1
    plan.updated_at = now
    session.add(plan)
    _audit(session, plan, "plan.updated", actor, reason, now, changes=_shown(changed))
    return plan, checks.sync_plan(session, ctx, plan, now)


def activate(
    session: Session, ctx: checks.Ctx, plan_id: int, *, actor: str, reason: str, now: float
) -> tuple[CarePlan, list[Publish]]:
    plan = get(session, plan_id)
    if plan.status is not PlanStatus.DRAFT:
        raise Conflict(f"plan {plan_id} is {plan.status.value}, not a draft")
    plan.status, plan.activated_at = PlanStatus.ACTIVE, now
    _check_active(session, plan)
    plan.version += 1
    plan.updated_at = now
    session.add(plan)
    _audit(session, plan, "plan.activated", actor, reason, now)
    return plan, checks.sync_plan(session, ctx, plan, now)


def end(
    session: Session, ctx: checks.Ctx, plan_id: int, *, actor: str, reason: str, now: float
) -> tuple[CarePlan, list[Publish]]:
    """End the service now: upcoming checks are cancelled, a running one closes at once."""
    plan = get(session, plan_id)
    if plan.status is PlanStatus.ENDED:
        raise Conflict(f"plan {plan_id} has already ended")
    plan.status, plan.ended_at, plan.updated_at = PlanStatus.ENDED, now, now
    plan.version += 1
    session.add(plan)
    _audit(session, plan, "plan.ended", actor, reason, now)
    return plan, checks.sync_plan(session, ctx, plan, now)


def add_pause(
    session: Session,
    ctx: checks.Ctx,
    plan_id: int,
    *,
    start_at: float,
    end_at: float | None,
    kind: str,
    actor: str,
    reason: str,
    now: float,
) -> tuple[PlanPause, list[Publish]]:
    plan = get(session, plan_id)
    if plan.status is PlanStatus.ENDED:
        raise Conflict(f"plan {plan_id} has ended")
    if end_at is not None and end_at <= start_at:
        raise PlanInvalid("end", "must be after start")
    pause = PlanPause(
        plan_id=plan_id,
        kind=kind,
        start_at=start_at,
        end_at=end_at,
        created_by=actor,
        created_at=now,
    )
    session.add(pause)
    session.flush()
    _audit(
        session,
        plan,
        "plan.paused",
        actor,
        reason,
        now,
        pause_id=pause.id,
        kind=kind,
        start=start_at,
        end=end_at,
    )
    return pause, checks.sync_plan(session, ctx, plan, now)


def end_pause(
    session: Session,
    ctx: checks.Ctx,
    plan_id: int,
    pause_id: int,
    *,
    at: float | None,
    actor: str,
    reason: str,
    now: float,
) -> tuple[PlanPause, list[Publish]]:
    """Resume: the pause ends ``at`` (default now)."""
    plan = get(session, plan_id)
    pause = session.get(PlanPause, pause_id)
    if pause is None or pause.plan_id != plan_id:
        raise NotFound("pause", pause_id)
    end_at = now if at is None else at
    end_at = max(end_at, pause.start_at)  # a pause that never began: it covers nothing
    pause.end_at = end_at
    session.add(pause)
    _audit(session, plan, "plan.resumed", actor, reason, now, pause_id=pause_id, end=end_at)
    return pause, checks.sync_plan(session, ctx, plan, now)


def add_opt_out(
    session: Session,
    ctx: checks.Ctx,
    plan_id: int,
    night: date,
    *,
    actor: str,
    reason: str,
    now: float,
) -> tuple[PlanOptOut, list[Publish]]:
    plan = get(session, plan_id)
    if plan.status is PlanStatus.ENDED:
        raise Conflict(f"plan {plan_id} has ended")
    existing = session.exec(
        select(PlanOptOut).where(PlanOptOut.plan_id == plan_id, PlanOptOut.night == night)
    ).first()
    if existing is not None:
        return existing, []
    row = PlanOptOut(plan_id=plan_id, night=night, recorded_by=actor, recorded_at=now)
    session.add(row)
    session.flush()
    _audit(session, plan, "plan.opt_out", actor, reason, now, night=night.isoformat())
    return row, checks.sync_plan(session, ctx, plan, now)


def remove_opt_out(
    session: Session,
    ctx: checks.Ctx,
    plan_id: int,
    night: date,
    *,
    actor: str,
    reason: str,
    now: float,
) -> list[Publish]:
    plan = get(session, plan_id)
    row = session.exec(
        select(PlanOptOut).where(PlanOptOut.plan_id == plan_id, PlanOptOut.night == night)
    ).first()
    if row is None:
        raise NotFound("opt-out", f"{plan_id}/{night.isoformat()}")
    session.delete(row)
    session.flush()
    _audit(session, plan, "plan.opt_out_withdrawn", actor, reason, now, night=night.isoformat())
    return checks.sync_plan(session, ctx, plan, now)


def plan_json(session: Session, plan: CarePlan) -> dict[str, Any]:
    data = plan.model_dump(mode="json")
    data["check_times"] = [t for t in plan.check_times.split(",") if t]
    data["escalation"] = [s for s in plan.escalation.split(",") if s]
    data["pauses"] = [
        p.model_dump(mode="json")
        for p in session.exec(
            select(PlanPause).where(PlanPause.plan_id == plan.id).order_by(col(PlanPause.start_at))
        )
    ]
    data["opt_outs"] = [
        o.night.isoformat()
        for o in session.exec(
            select(PlanOptOut).where(PlanOptOut.plan_id == plan.id).order_by(col(PlanOptOut.night))
        )
    ]
    return data
