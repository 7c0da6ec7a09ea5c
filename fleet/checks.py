"""Checks: the plan's occurrences as records, moved on by time and by staff.

Everything here runs inside the caller's transaction on the service's database thread,
takes ``now`` and returns what to publish; the audit entry of every staff action and
escalation step is appended in the same transaction as the change it records.

Life of a check (``CheckState``)::

    upcoming -> open -> looked -> seen                         (outcome: seen and fine)
                 |        |    -> recheck_due -> [recheck]     (outcome: not seen)
                 |        |    -> visit                        (outcome: something wrong)
                 +--------+--> missed / escalated              (window ended, no outcome)
                 +-----------> visit                           (ended; a visit replaced it)
    upcoming/open -> opted_out | paused | cancelled            (plan says no check now)

A recheck is a check of kind ``recheck``: not seen again -> the plan's escalation chain
(``call`` tasks, then a ``visit``). Time-driven moves (open, missed, escalation timeouts,
pre-flight) are level-triggered: running them late or twice gives the same result.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import or_
from sqlmodel import Session, col, select

from tillsyn_protocol import CameraHealth, CommandKind, LockState

from . import audit, visits
from .errors import Conflict, NotFound
from .metrics import FleetMetrics
from .models import Connectivity, Device, Visit, VisitCause
from .outbound import Publish
from .plan_models import (
    ARMING_STATES,
    CarePlan,
    Check,
    CheckKind,
    CheckState,
    EscalationStep,
    Outcome,
    PlanOptOut,
    PlanPause,
    PlanStatus,
    StepResult,
    StepStatus,
    VisitLink,
)
from .plan_rules import (
    DAY,
    Pause,
    Planned,
    PlanSpec,
    format_time,
    load_tz,
    night_at,
    parse_nights,
    parse_times,
    planned_night,
    recheck_window,
)
from .snapshot import DeviceData

log = logging.getLogger(__name__)

CLOCK_SKEW_LIMIT_S = 30.0  # a device clock further off than this cannot verify tokens
LOCK_GRACE_S = 5.0  # same as reconcile.LOCK_GRACE_S (kept here to avoid an import cycle)
MISMATCH_GRACE_S = 60.0  # a disarm not applied within this is a lock-state mismatch


@dataclass(frozen=True, slots=True)
class Ctx:
    """What check operations need from the service besides the session."""

    metrics: FleetMetrics
    preflight_s: float = 1800.0


# --- plans -> checks (materialisation) --------------------------------------------------


def spec_of(session: Session, plan: CarePlan) -> PlanSpec:
    assert plan.id is not None
    pauses = session.exec(select(PlanPause).where(PlanPause.plan_id == plan.id)).all()
    opt_outs = session.exec(select(PlanOptOut).where(PlanOptOut.plan_id == plan.id)).all()
    return PlanSpec(
        times=parse_times(t for t in plan.check_times.split(",") if t),
        window=timedelta(seconds=plan.window_s),
        tz=load_tz(plan.tz),
        nights=parse_nights(plan.nights),
        valid_from=plan.valid_from,
        valid_until=plan.valid_until,
        opt_outs=frozenset(o.night for o in opt_outs),
        pauses=tuple(Pause(p.start_at, p.end_at) for p in pauses),
    )


def check_key(plan_id: int, night: date, agreed: str, kind: CheckKind = CheckKind.SCHEDULED) -> str:
    suffix = ":r" if kind is CheckKind.RECHECK else ""
    return f"{plan_id}:{night.isoformat()}:{agreed}{suffix}"


def nights_to_sync(plan: CarePlan, now: float) -> list[date]:
    return _nights_to_sync(plan.tz, now)


def _nights_to_sync(tz: str, now: float) -> list[date]:
    tonight = night_at(datetime.fromtimestamp(now, UTC), load_tz(tz))
    return [tonight - DAY, tonight, tonight + DAY]


_PLANNED_STATE = {
    Planned.SCHEDULED: CheckState.UPCOMING,
    Planned.OPTED_OUT: CheckState.OPTED_OUT,
    Planned.PAUSED: CheckState.PAUSED,
}
_REPLANNABLE = frozenset(
    {CheckState.UPCOMING, CheckState.OPTED_OUT, CheckState.PAUSED, CheckState.CANCELLED}
)


def sync_plan(session: Session, ctx: Ctx, plan: CarePlan, now: float) -> list[Publish]:
    """Make the plan's checks of yesterday's, tonight's and tomorrow's night match the plan.

    Checks that have not started follow the plan (created, moved, cancelled, opted out,
    paused); a running check with no outcome is closed early when the plan no longer
    wants it (opt-out, pause, plan ended); anything with an outcome is history.
    """
    assert plan.id is not None
    out: list[Publish] = []
    nights = nights_to_sync(plan, now)
    active = plan.status is PlanStatus.ACTIVE
    spec = spec_of(session, plan)
    wanted = {}
    for night in nights:
        for pc in planned_night(spec, night) if active else []:
            wanted[check_key(plan.id, night, format_time(pc.slot.agreed))] = pc
    existing = {
        c.key: c
        for c in session.exec(
            select(Check).where(
                Check.plan_id == plan.id,
                Check.kind == CheckKind.SCHEDULED,
                col(Check.night).in_(nights),
            )
        )
    }
    for key, check in existing.items():
        maybe = wanted.get(key)
        if check.state in _REPLANNABLE and check.start_at > now:
            if maybe is None:
                _set_state(session, check, CheckState.CANCELLED, now)
            else:
                check.start_at = maybe.slot.start.timestamp()
                check.end_at = maybe.slot.end.timestamp()
                check.shift = maybe.slot.shift.value
                check.device_id, check.team = plan.device_id, plan.team
                _set_state(session, check, _PLANNED_STATE[maybe.status], now)
        elif check.state in (CheckState.OPEN, CheckState.LOOKED) and check.end_at > now:
            if not active:
                _close_early(session, ctx, check, CheckState.CANCELLED, now)
            elif maybe is not None and maybe.status is not Planned.SCHEDULED:
                _close_early(session, ctx, check, _PLANNED_STATE[maybe.status], now)
        elif check.state is CheckState.UPCOMING and check.end_at > now and not active:
            _close_early(session, ctx, check, CheckState.CANCELLED, now)
    for key, pc in wanted.items():
        if key in existing or pc.slot.end.timestamp() <= now:
            continue
        check = Check(
            key=key,
            plan_id=plan.id,
            device_id=plan.device_id,
            resident_id=plan.resident_id,
            team=plan.team,
            night=pc.slot.night,
            agreed=format_time(pc.slot.agreed),
            start_at=pc.slot.start.timestamp(),
            end_at=pc.slot.end.timestamp(),
            shift=pc.slot.shift.value,
            state=_PLANNED_STATE[pc.status],
        )
        session.add(check)
        existing[key] = check
    session.flush()
    if plan.visit_on_opt_out:
        out += _opt_out_visits(session, ctx, plan, existing.values(), now)
    plan.synced_through = nights[-1]
    session.add(plan)
    return out


def ensure_synced(session: Session, ctx: Ctx, now: float) -> list[Publish]:
    """Roll materialisation forward for every active plan that is behind.

    Only those are loaded: the last night to sync depends on the plan's time zone alone,
    so it is one query per zone in use. (Every active plan was loaded at every sweep, 10,000
    rows every 30 s for nothing most of the time.)"""
    out: list[Publish] = []
    active = CarePlan.status == PlanStatus.ACTIVE
    for tz in session.exec(select(CarePlan.tz).where(active).distinct()).all():
        last = _nights_to_sync(tz, now)[-1]
        behind = or_(col(CarePlan.synced_through).is_(None), col(CarePlan.synced_through) < last)
        stmt = select(CarePlan).where(active, CarePlan.tz == tz, behind).order_by(col(CarePlan.id))
        for plan in session.exec(stmt).all():
            out += sync_plan(session, ctx, plan, now)
    return out


def _set_state(session: Session, check: Check, state: CheckState, now: float) -> None:
    if check.state is not state:
        check.state = state
        if state not in ARMING_STATES:
            check.closed_at = check.closed_at or now
        session.add(check)


def _close_early(session: Session, ctx: Ctx, check: Check, state: CheckState, now: float) -> None:
    _set_state(session, check, state, now)
    audit.append(
        session,
        ts=now,
        actor="fleet",
        action="check.closed_early",
        subject=check.resident_id,
        check_id=check.id,
        state=state.value,
    )


def _opt_out_visits(
    session: Session, ctx: Ctx, plan: CarePlan, checks: Iterable[Check], now: float
) -> list[Publish]:
    out: list[Publish] = []
    first: dict[date, Check] = {}
    for c in checks:
        if c.state is CheckState.OPTED_OUT and (
            c.night not in first or c.start_at < first[c.night].start_at
        ):
            first[c.night] = c
    for night, check in first.items():
        out += raise_for_check(
            session,
            ctx,
            key=f"optout:{plan.id}:{night.isoformat()}",
            cause=VisitCause.OPTED_OUT,
            check=check,
            device=None,
            due_at=check.start_at,
            now=now,
            evidence={"night": night.isoformat(), "first_check": check.agreed},
        )
    return out


# --- visits linked to checks ------------------------------------------------------------


def raise_for_check(
    session: Session,
    ctx: Ctx,
    *,
    key: str,
    cause: VisitCause,
    check: Check,
    device: Device | None,
    due_at: float,
    now: float,
    evidence: dict[str, Any],
) -> list[Publish]:
    """Raise a visit once per key and link it to the check (night, team, plan)."""
    if device is None and check.device_id is not None:
        device = session.get(Device, check.device_id)
    pub = visits.raise_visit(
        session,
        ctx.metrics,
        key=key,
        cause=cause,
        device=device,
        due_at=due_at,
        now=now,
        evidence={"check_id": check.id, "agreed": check.agreed, **evidence},
    )
    visit = session.exec(select(Visit).where(Visit.key == key)).first()
    if visit is not None:
        if visit.resident_id is None:
            visit.resident_id = check.resident_id
            session.add(visit)
        link_visit(session, visit, [check])
    return [pub] if pub else []


def link_visit(session: Session, visit: Visit, checks: Sequence[Check]) -> None:
    """Record which check a visit stands for (the first one wins; idempotent)."""
    if not checks or visit.id is None or session.get(VisitLink, visit.id) is not None:
        return
    check = checks[0]
    session.add(
        VisitLink(
            visit_id=visit.id,
            check_id=check.id,
            plan_id=check.plan_id,
            night=check.night,
            team=check.team,
        )
    )
    session.flush()


def link_visit_key(session: Session, key: str, checks: Sequence[Check]) -> None:
    visit = session.exec(select(Visit).where(Visit.key == key)).first()
    if visit is not None:
        link_visit(session, visit, checks)


# --- what the device should do ----------------------------------------------------------


def device_checks(session: Session, device_id: str, lo: float, hi: float) -> list[Check]:
    """Checks of a device that want it armed and whose window overlaps [lo, hi)."""
    stmt = select(Check).where(
        Check.device_id == device_id,
        col(Check.state).in_(ARMING_STATES),
        Check.end_at > lo,
        Check.start_at < hi,
    )
    return sorted(session.exec(stmt).all(), key=lambda c: c.start_at)


def overlapping(arming: Iterable[Check], lo: float, hi: float) -> list[Check]:
    """Of these checks, those whose window overlaps [lo, hi), by start."""
    return sorted(
        (c for c in arming if c.end_at > lo and c.start_at < hi), key=lambda c: c.start_at
    )


def open_check(session: Session, device_id: str, now: float) -> Check | None:
    found = [c for c in device_checks(session, device_id, now, now + 1) if c.start_at <= now]
    return found[0] if found else None


# --- time moves checks on ---------------------------------------------------------------


def advance_device(session: Session, ctx: Ctx, data: DeviceData, now: float) -> list[Publish]:
    """Open checks whose window started; settle those whose window ended; time out calls."""
    out: list[Publish] = []
    for check in data.arming():
        if check.start_at > now:
            continue
        if now >= check.end_at:
            out += _window_ended(session, ctx, check, now, visited=check.id in data.visited)
        elif check.state is CheckState.UPCOMING:
            _set_state(session, check, CheckState.OPEN, now)
    out += time_out_steps(session, ctx, data.steps, now)
    return out


def _window_ended(
    session: Session, ctx: Ctx, check: Check, now: float, *, visited: bool
) -> list[Publish]:
    if visited:
        _set_state(session, check, CheckState.VISIT, now)
        ctx.metrics.checks.labels(outcome="device_failed").inc()
        return []
    plan = session.get(CarePlan, check.plan_id)
    check.unrecorded = True
    escalate = plan is not None and plan.escalate_unrecorded
    _set_state(session, check, CheckState.ESCALATED if escalate else CheckState.MISSED, now)
    audit.append(
        session,
        ts=now,
        actor="fleet",
        action="check.unrecorded",
        subject=check.resident_id,
        check_id=check.id,
        night=check.night.isoformat(),
        agreed=check.agreed,
        looks=check.looks,
    )
    ctx.metrics.checks.labels(outcome="unrecorded").inc()
    log.warning("check %s ended with no outcome recorded", check.id)
    if escalate and plan is not None:
        return start_escalation(session, ctx, plan, check, "no_outcome", now)
    return []


# --- pre-flight readiness ---------------------------------------------------------------


def preflight(
    session: Session,
    ctx: Ctx,
    data: DeviceData,
    now: float,
    *,
    window_open: bool,
) -> list[Publish]:
    """``preflight_s`` before a check: raise its visit now if the device cannot do it."""
    out: list[Publish] = []
    device = data.device
    soon = [c for c in overlapping(data.arming(), now, now + ctx.preflight_s) if c.start_at > now]
    if not soon:
        return out
    check = soon[0]
    if check.preflight_at is None:
        check.preflight_at = now
        session.add(check)
    problems: list[tuple[str, VisitCause]] = []
    if device.connectivity is Connectivity.OFFLINE:
        problems.append(("offline", VisitCause.DEVICE_OFFLINE))
    if device.camera is not None and device.camera is not CameraHealth.OK:
        problems.append(("camera", VisitCause.CAMERA_FAULT))
    skew = device.clock_skew_s
    if device.clock_synced is False or (skew is not None and abs(skew) > CLOCK_SKEW_LIMIT_S):
        problems.append(("clock", VisitCause.CLOCK_UNSYNCED))
    if not window_open and _stuck_unlocked(data, now):
        problems.append(("mismatch", VisitCause.LOCK_MISMATCH))
    start = int(check.start_at)
    for tag, cause in problems:
        out += raise_for_check(
            session,
            ctx,
            key=f"{tag}:{device.id}:{start}",
            cause=cause,
            check=check,
            device=device,
            due_at=check.start_at,
            now=now,
            evidence={
                "preflight": True,
                "connectivity": device.connectivity.value,
                "last_seen": device.last_seen,
                "camera": device.camera.value if device.camera else None,
                "clock_synced": device.clock_synced,
                "clock_skew_s": skew,
                "reported_state": device.reported_state.value,
                "window_start": datetime.fromtimestamp(check.start_at, UTC).isoformat(),
            },
        )
    return out


def _stuck_unlocked(data: DeviceData, now: float) -> bool:
    """Reported armed with no window open, and not just about to fix itself: not its own
    re-lock at the window end, nor a disarm the fleet sent less than a minute ago."""
    device = data.device
    if device.reported_state is LockState.LOCKED:
        return False
    ends = device.armed_until
    if ends is not None and ends <= now < ends + LOCK_GRACE_S:
        return False
    return not any(
        c.kind is CommandKind.DISARM and c.created_at > now - MISMATCH_GRACE_S
        for c in data.pending_now()
    )


# --- staff: looks and outcomes ----------------------------------------------------------


def get_check(session: Session, check_id: int) -> Check:
    check = session.get(Check, check_id)
    if check is None:
        raise NotFound("check", check_id)
    return check


def note_look(session: Session, check: Check, look_id: str, now: float) -> None:
    check.looks += 1
    check.last_look_id = look_id
    if check.state is CheckState.OPEN or check.state is CheckState.UPCOMING:
        check.state = CheckState.LOOKED
    session.add(check)


def record_outcome(
    session: Session,
    ctx: Ctx,
    check_id: int,
    outcome: Outcome,
    *,
    staff: str,
    now: float,
) -> tuple[Check, list[Publish]]:
    check = get_check(session, check_id)
    if check.outcome is not None:
        raise Conflict(f"check {check_id} already has the outcome {check.outcome.value}")
    if check.state in (
        CheckState.UPCOMING,
        CheckState.OPTED_OUT,
        CheckState.PAUSED,
        CheckState.CANCELLED,
    ):
        raise Conflict(f"check {check_id} is {check.state.value}: there is nothing to record")
    if check.looks == 0:
        raise Conflict(f"check {check_id}: no look was started, so nothing was seen")
    plan = session.get(CarePlan, check.plan_id)
    if plan is None:
        raise NotFound("plan", check.plan_id)
    check.outcome, check.outcome_by, check.outcome_at = outcome, staff, now
    audit.append(
        session,
        ts=now,
        actor=staff,
        action="check.outcome",
        subject=check.resident_id,
        check_id=check.id,
        kind=check.kind.value,
        outcome=outcome.value,
        late=check.unrecorded,
    )
    ctx.metrics.checks.labels(outcome=outcome.value).inc()
    out: list[Publish] = []
    match outcome:
        case Outcome.SEEN:
            _set_state(session, check, CheckState.SEEN, now)
            cancel_escalation(session, check, staff, now)
        case Outcome.NOT_SEEN if check.kind is CheckKind.SCHEDULED:
            _set_state(session, check, CheckState.RECHECK_DUE, now)
            schedule_recheck(session, ctx, plan, check, now)
        case Outcome.NOT_SEEN:
            _set_state(session, check, CheckState.ESCALATED, now)
            out += start_escalation(session, ctx, plan, check, "not_seen_twice", now)
        case Outcome.SOMETHING_WRONG:
            _set_state(session, check, CheckState.VISIT, now)
            out += raise_for_check(
                session,
                ctx,
                key=f"wrong:{check.id}",
                cause=VisitCause.SOMETHING_WRONG,
                check=check,
                device=None,
                due_at=now,
                now=now,
                evidence={"recorded_by": staff},
            )
    session.add(check)
    return check, out


def schedule_recheck(session: Session, ctx: Ctx, plan: CarePlan, check: Check, now: float) -> Check:
    assert check.id is not None
    start, end = recheck_window(now, plan.recheck_delay_s, plan.window_s)
    key = check_key(check.plan_id, check.night, check.agreed, CheckKind.RECHECK)
    existing = session.exec(select(Check).where(Check.key == key)).first()
    if existing is not None:
        return existing
    recheck = Check(
        key=key,
        plan_id=check.plan_id,
        device_id=check.device_id,
        resident_id=check.resident_id,
        team=check.team,
        night=check.night,
        agreed=check.agreed,
        kind=CheckKind.RECHECK,
        parent_id=check.id,
        start_at=start,
        end_at=end,
        state=CheckState.UPCOMING,
    )
    session.add(recheck)
    session.flush()
    audit.append(
        session,
        ts=now,
        actor="fleet",
        action="check.recheck",
        subject=check.resident_id,
        check_id=check.id,
        recheck_id=recheck.id,
        start=start,
        end=end,
    )
    ctx.metrics.rechecks.inc()
    return recheck


# --- escalation -------------------------------------------------------------------------


def start_escalation(
    session: Session, ctx: Ctx, plan: CarePlan, check: Check, why: str, now: float
) -> list[Publish]:
    assert check.id is not None
    if session.exec(select(EscalationStep.id).where(EscalationStep.check_id == check.id)).first():
        return []
    return _run_step(session, ctx, plan, check, 0, why, now)


def _run_step(
    session: Session, ctx: Ctx, plan: CarePlan, check: Check, index: int, why: str, now: float
) -> list[Publish]:
    assert check.id is not None and plan.id is not None
    chain = [s for s in plan.escalation.split(",") if s]
    if index >= len(chain):
        return []
    action = chain[index]
    step = EscalationStep(
        check_id=check.id,
        plan_id=plan.id,
        resident_id=check.resident_id,
        step=index,
        action=action,
        why=why,
        created_at=now,
        due_at=now + (plan.call_timeout_s if action == "call" else 0),
    )
    session.add(step)
    session.flush()
    out: list[Publish] = []
    if action == "visit":
        cause = VisitCause.NOT_SEEN_TWICE if why == "not_seen_twice" else VisitCause.NO_OUTCOME
        key = f"esc:{check.id}"
        out += raise_for_check(
            session,
            ctx,
            key=key,
            cause=cause,
            check=check,
            device=None,
            due_at=now,
            now=now,
            evidence={"why": why, "step": index},
        )
        visit = session.exec(select(Visit).where(Visit.key == key)).first()
        step.status, step.result, step.done_at, step.done_by = (
            StepStatus.DONE,
            StepResult.VISIT_RAISED,
            now,
            "fleet",
        )
        step.visit_id = visit.id if visit else None
        session.add(step)
    audit.append(
        session,
        ts=now,
        actor="fleet",
        action=f"escalation.{action}",
        subject=check.resident_id,
        check_id=check.id,
        step=index,
        why=why,
        step_id=step.id,
    )
    return out


def complete_step(
    session: Session,
    ctx: Ctx,
    step_id: int,
    result: StepResult,
    *,
    staff: str,
    now: float,
) -> tuple[EscalationStep, list[Publish]]:
    step = session.get(EscalationStep, step_id)
    if step is None:
        raise NotFound("escalation step", step_id)
    if step.status is not StepStatus.OPEN:
        raise Conflict(f"escalation step {step_id} is {step.status.value}")
    if result not in (StepResult.RESOLVED, StepResult.NOT_RESOLVED):
        raise Conflict("a step is completed as resolved or not_resolved")
    step.status, step.result, step.done_at, step.done_by = StepStatus.DONE, result, now, staff
    session.add(step)
    audit.append(
        session,
        ts=now,
        actor=staff,
        action="escalation.step_done",
        subject=step.resident_id,
        check_id=step.check_id,
        step=step.step,
        result=result.value,
    )
    out: list[Publish] = []
    if result is StepResult.NOT_RESOLVED:
        out = _next_step(session, ctx, step, now)
    return step, out


def _next_step(session: Session, ctx: Ctx, step: EscalationStep, now: float) -> list[Publish]:
    plan = session.get(CarePlan, step.plan_id)
    check = session.get(Check, step.check_id)
    if plan is None or check is None:
        return []
    return _run_step(session, ctx, plan, check, step.step + 1, step.why, now)


def time_out_steps(
    session: Session, ctx: Ctx, steps: Iterable[EscalationStep], now: float
) -> list[Publish]:
    """Open call tasks nobody completed in time move the chain on (actor: scheduler)."""
    out: list[Publish] = []
    for step in steps:
        if step.status is not StepStatus.OPEN or step.due_at > now:
            continue
        step.status, step.done_at, step.done_by = StepStatus.TIMED_OUT, now, "scheduler"
        session.add(step)
        audit.append(
            session,
            ts=now,
            actor="scheduler",
            action="escalation.timed_out",
            subject=step.resident_id,
            check_id=step.check_id,
            step=step.step,
        )
        out += _next_step(session, ctx, step, now)
    return out


def cancel_escalation(session: Session, check: Check, staff: str, now: float) -> None:
    """A late "seen" ends a running chain (visits already raised stay for staff to close)."""
    stmt = select(EscalationStep).where(
        EscalationStep.check_id == check.id, EscalationStep.status == StepStatus.OPEN
    )
    for step in session.exec(stmt).all():
        step.status, step.done_at, step.done_by = StepStatus.CANCELLED, now, staff
        session.add(step)


def check_json(check: Check) -> dict[str, Any]:
    data = check.model_dump(mode="json")
    data["window_start"] = datetime.fromtimestamp(check.start_at, UTC).isoformat()
    data["window_end"] = datetime.fromtimestamp(check.end_at, UTC).isoformat()
    return data


def step_json(step: EscalationStep) -> dict[str, Any]:
    return step.model_dump(mode="json")


def evidence_of(visit: Visit) -> dict[str, Any]:
    try:
        data = json.loads(visit.evidence)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
