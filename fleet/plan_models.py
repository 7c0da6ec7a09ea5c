"""Tables of care plans, their checks, escalations, the visit outbox and coverage reports.

A :class:`CarePlan` is the *genomförandeplan*: who, which device, when, and what to do when
the resident is not seen. A :class:`Check` is one occurrence of one agreed time in one
night (or a recheck), a first-class record with a state, so night staff can list tonight's
checks and the coverage report can say which ended without an outcome.
"""

from __future__ import annotations

from datetime import date, datetime
from enum import StrEnum

from sqlalchemy import Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from .models import _enum, utcnow


class PlanStatus(StrEnum):
    DRAFT = "draft"  # not yet in force (no consent, not activated)
    ACTIVE = "active"
    ENDED = "ended"  # the resident ended the service, or the plan was replaced


class CheckKind(StrEnum):
    SCHEDULED = "scheduled"  # an agreed time of the plan
    RECHECK = "recheck"  # after "not seen"


class CheckState(StrEnum):
    UPCOMING = "upcoming"  # before its window
    OPEN = "open"  # window open, nobody has looked yet
    LOOKED = "looked"  # a look was started, no outcome yet
    SEEN = "seen"  # outcome: seen and fine
    RECHECK_DUE = "recheck_due"  # outcome: not seen; a recheck window follows
    ESCALATED = "escalated"  # not seen on the recheck (or no outcome): chain running
    VISIT = "visit"  # something wrong, or the check could not happen: a visit replaces it
    MISSED = "missed"  # window ended with no outcome and no visit (flagged)
    OPTED_OUT = "opted_out"  # the resident opted out of the night
    PAUSED = "paused"  # hospital stay, travel...
    CANCELLED = "cancelled"  # the plan changed or ended before the check happened


# States in which the device is wanted armed while the window lasts.
ARMING_STATES = frozenset({CheckState.UPCOMING, CheckState.OPEN, CheckState.LOOKED})
# States a check can no longer leave through time alone.
SETTLED_STATES = frozenset(CheckState) - ARMING_STATES


class Outcome(StrEnum):
    SEEN = "seen"  # seen and fine
    NOT_SEEN = "not_seen"
    SOMETHING_WRONG = "something_wrong"  # immediate visit


class StepStatus(StrEnum):
    OPEN = "open"  # a call task waiting for staff
    DONE = "done"
    TIMED_OUT = "timed_out"  # nobody completed it in time: the chain moved on
    CANCELLED = "cancelled"  # an earlier step resolved the situation


class StepResult(StrEnum):
    RESOLVED = "resolved"  # e.g. the resident answered the call and is fine
    NOT_RESOLVED = "not_resolved"
    VISIT_RAISED = "visit_raised"


class CarePlan(SQLModel, table=True):
    __tablename__ = "care_plan"

    id: int | None = Field(default=None, primary_key=True)
    resident_id: str = Field(index=True, max_length=64)  # pseudonym
    device_id: str | None = Field(default=None, foreign_key="device.id", index=True, max_length=64)
    team: str | None = Field(default=None, max_length=64)
    tz: str = Field(default="Europe/Stockholm", max_length=64)
    check_times: str = Field(max_length=400)  # "22:00,02:00" (HH:MM[:SS], night order)
    nights: str = Field(default="0123456", max_length=7)  # evenings a night begins, 0 = Monday
    window_s: int
    look_s: int = 60
    recheck_delay_s: int = 1200
    escalation: str = Field(default="call,visit", max_length=100)
    call_timeout_s: int = 900  # an open call task moves on to the next step after this
    escalate_unrecorded: bool = True  # a check ending without outcome runs the chain
    visit_on_opt_out: bool = False  # DESIGN 7: "if the plan says so"
    valid_from: date
    valid_until: date | None = None
    consent_ref: str | None = Field(default=None, max_length=64)
    consent_date: date | None = None
    has_cohabitant: bool = False
    cohabitant_consent_ref: str | None = Field(default=None, max_length=64)
    cohabitant_consent_date: date | None = None
    status: PlanStatus = Field(default=PlanStatus.DRAFT, sa_column=_enum(PlanStatus))
    version: int = 1
    created_at: float
    updated_at: float
    activated_at: float | None = None  # checks before this were never planned
    ended_at: float | None = None
    synced_through: date | None = None  # checks are materialised up to this night


class PlanPause(SQLModel, table=True):
    __tablename__ = "plan_pause"

    id: int | None = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="care_plan.id", index=True)
    kind: str = Field(default="other", max_length=16)  # hospital | travel | other
    start_at: float
    end_at: float | None = None  # None: until resumed
    created_by: str = Field(max_length=64)
    created_at: float


class PlanOptOut(SQLModel, table=True):
    __tablename__ = "plan_opt_out"
    __table_args__ = (UniqueConstraint("plan_id", "night"),)

    id: int | None = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="care_plan.id", index=True)
    night: date
    recorded_by: str = Field(max_length=64)
    recorded_at: float


class Check(SQLModel, table=True):
    """One check (or recheck) of one plan in one night."""

    __tablename__ = "care_check"

    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(unique=True, max_length=80)  # plan:night:agreed[:recheck]
    plan_id: int = Field(foreign_key="care_plan.id", index=True)
    device_id: str | None = Field(default=None, max_length=64, index=True)
    resident_id: str = Field(max_length=64)
    team: str | None = Field(default=None, max_length=64)
    night: date = Field(index=True)
    agreed: str = Field(max_length=8)  # the agreed local time (HH:MM[:SS])
    kind: CheckKind = Field(default=CheckKind.SCHEDULED, sa_column=_enum(CheckKind))
    parent_id: int | None = None  # recheck: the check it follows up
    start_at: float = Field(index=True)  # real window, epoch s
    end_at: float
    shift: str = Field(default="none", max_length=16)  # dst_gap / dst_collision
    state: CheckState = Field(default=CheckState.UPCOMING, sa_column=_enum(CheckState))
    looks: int = 0
    last_look_id: str | None = Field(default=None, max_length=64)
    outcome: Outcome | None = Field(default=None, sa_column=_enum(Outcome))
    outcome_by: str | None = Field(default=None, max_length=64)
    outcome_at: float | None = None
    unrecorded: bool = False  # window ended with no outcome recorded (flagged)
    preflight_at: float | None = None  # when the pre-flight readiness check ran
    closed_at: float | None = None


Index("ix_care_check_state_end", Check.__table__.c.state, Check.__table__.c.end_at)  # type: ignore[attr-defined]


class EscalationStep(SQLModel, table=True):
    """One step of a plan's escalation chain for one check, with time and actor."""

    __tablename__ = "escalation_step"
    __table_args__ = (UniqueConstraint("check_id", "step"),)

    id: int | None = Field(default=None, primary_key=True)
    check_id: int = Field(foreign_key="care_check.id", index=True)
    plan_id: int
    resident_id: str = Field(max_length=64)
    step: int  # 0-based position in the chain
    action: str = Field(max_length=16)  # call | visit
    why: str = Field(max_length=32)  # not_seen_twice | no_outcome
    status: StepStatus = Field(default=StepStatus.OPEN, sa_column=_enum(StepStatus))
    created_at: float
    due_at: float  # a call not done by then moves the chain on
    done_at: float | None = None
    done_by: str | None = Field(default=None, max_length=64)
    result: StepResult | None = Field(default=None, sa_column=_enum(StepResult))
    visit_id: int | None = None


# The escalation timer's "open steps now due" query, once per reconcile pass (0002).
Index(
    "ix_escalation_step_status_due",
    EscalationStep.__table__.c.status,  # type: ignore[attr-defined]
    EscalationStep.__table__.c.due_at,  # type: ignore[attr-defined]
)


class VisitLink(SQLModel, table=True):
    """Which check, plan, night and team a visit stands for (lists by night and team)."""

    __tablename__ = "visit_link"

    visit_id: int = Field(primary_key=True, foreign_key="visit.id")
    check_id: int | None = Field(default=None, index=True)
    plan_id: int | None = None
    night: date | None = Field(default=None, index=True)
    team: str | None = Field(default=None, max_length=64)


class OutboxEvent(SQLModel, table=True):
    """Durable outbox: written in the transaction of the change, sent at least once."""

    __tablename__ = "outbox_event"

    id: int | None = Field(default=None, primary_key=True)
    event_id: str = Field(unique=True, max_length=64)  # the Idempotency-Key
    kind: str = Field(max_length=48)
    payload: str  # JSON, unbounded: a bad night's coverage report can be long (0002)
    created_at: float
    attempts: int = 0
    next_attempt_at: float = Field(index=True)
    delivered_at: float | None = None
    last_error: str | None = Field(default=None, max_length=200)


class CoverageReport(SQLModel, table=True):
    __tablename__ = "coverage_report"

    id: int | None = Field(default=None, primary_key=True)
    night: date = Field(unique=True)
    generated_at: float
    ok: bool
    plans: int
    checks: int
    problems: str = Field(default="[]")  # JSON list
    created_at: datetime = Field(default_factory=utcnow)
