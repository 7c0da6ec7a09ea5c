"""Care plans, checks, rechecks, escalation, pre-flight, coverage: the database-side core
(SQLite, a controlled clock, no broker). The live loop is in tests/integration."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlmodel import col, select

from fleet import audit, checks, coverage, plans, signing
from fleet.core import FleetOps
from fleet.db import init_db, make_engine
from fleet.errors import Conflict
from fleet.metrics import FleetMetrics
from fleet.models import AuditEvent, Command, Connectivity, Device, Visit, VisitCause
from fleet.plan_models import (
    CarePlan,
    Check,
    CheckKind,
    CheckState,
    EscalationStep,
    OutboxEvent,
    Outcome,
    StepResult,
    StepStatus,
)
from fleet.plans import PlanInvalid
from fleet.reconcile import Policy
from tillsyn_protocol import CommandKind, LockState, StateReport
from tillsyn_protocol.windows import STOCKHOLM

NIGHT = date(2027, 1, 11)  # a Monday


def at(day: int, hh: int, mm: int = 0, ss: int = 0) -> float:
    return datetime(2027, 1, day, hh, mm, ss, tzinfo=STOCKHOLM).timestamp()


T0 = at(11, 12)  # Monday noon: the night of the 11th begins


@pytest.fixture
def ops(tmp_path: Path, database_url: str) -> Iterator[FleetOps]:
    engine = make_engine(database_url)
    init_db(engine)
    key = signing.load_or_create(tmp_path / "key.pem")
    policy = Policy(arm_confirm_s=60, visit_horizon_s=3600, preflight_s=1800)
    ops = FleetOps(engine, key, FleetMetrics(), policy)
    with ops.session() as s:
        s.add(Device(id="dev-p1", resident_id="res-1", connectivity=Connectivity.ONLINE))
        s.add(Device(id="dev-p2", resident_id="res-2", connectivity=Connectivity.ONLINE))
    yield ops
    engine.dispose()


PLAN = {
    "resident_id": "res-1",
    "device_id": "dev-p1",
    "check_times": ["22:00", "02:00"],
    "window_s": 600,
    "look_s": 45,
    "valid_from": NIGHT,
    "consent_ref": "DNR-2027-17",
    "consent_date": date(2027, 1, 3),
    "team": "north",
}


def make_plan(ops: FleetOps, now: float = T0, **over: object) -> int:
    with ops.session() as s:
        plan, _ = plans.create(
            s, ops.check_ctx, PLAN | over, actor="it-1", reason="new plan", now=now, activate=True
        )
        assert plan.id is not None
        return plan.id


def night_checks(ops: FleetOps, plan_id: int) -> list[Check]:
    return list(
        ops.run(
            lambda s: s.exec(
                select(Check).where(Check.plan_id == plan_id).order_by(Check.start_at)
            ).all()
        )
    )


def armed(ops: FleetOps, device: str, until: float, now: float) -> None:
    ops.on_state(
        device,
        StateReport(ts=now, state=LockState.ARMED, since=now, armed_until=until, last_seq=1),
        now,
    )


def look(ops: FleetOps, check_id: int, now: float, staff: str = "nurse-1") -> None:
    with ops.session() as s:
        check = s.get(Check, check_id)
        assert check is not None and check.device_id
        device = s.get(Device, check.device_id)
        assert device is not None
        ops.start_look_in(s, device, staff, 45, now)


def outcome(ops: FleetOps, check_id: int, result: Outcome, now: float) -> None:
    with ops.session() as s:
        checks.record_outcome(s, ops.check_ctx, check_id, result, staff="nurse-1", now=now)


def visits(ops: FleetOps) -> list[Visit]:
    return list(ops.run(lambda s: s.exec(select(Visit).order_by(col(Visit.id))).all()))


def audit_actions(ops: FleetOps) -> list[tuple[str, str]]:
    return [
        (e.actor, e.action)
        for e in ops.run(lambda s: s.exec(select(AuditEvent).order_by(col(AuditEvent.id))).all())
    ]


def test_plan_needs_consent_to_be_active_and_every_change_is_audited(ops: FleetOps) -> None:
    with pytest.raises(Conflict, match="consent"), ops.session() as s:
        plans.create(
            s,
            ops.check_ctx,
            PLAN | {"consent_ref": None},
            actor="it-1",
            reason="r",
            now=T0,
            activate=True,
        )
    with ops.session() as s:
        draft, _ = plans.create(
            s, ops.check_ctx, PLAN | {"consent_ref": None}, actor="it-1", reason="draft", now=T0
        )
    assert draft.id is not None
    assert night_checks(ops, draft.id) == []  # a draft plans nothing
    with pytest.raises(Conflict, match="consent"), ops.session() as s:
        plans.activate(s, ops.check_ctx, draft.id, actor="it-1", reason="go", now=T0)
    with ops.session() as s:
        plans.update(
            s,
            ops.check_ctx,
            draft.id,
            {"consent_ref": "DNR-9", "has_cohabitant": True},
            actor="it-2",
            reason="consent signed",
            now=T0,
        )
    with pytest.raises(Conflict, match="cohabitant"), ops.session() as s:
        plans.activate(s, ops.check_ctx, draft.id, actor="it-1", reason="go", now=T0)
    with ops.session() as s:
        plans.update(
            s,
            ops.check_ctx,
            draft.id,
            {"cohabitant_consent_ref": "DNR-10", "cohabitant_consent_date": date(2027, 1, 4)},
            actor="it-2",
            reason="partner signed",
            now=T0,
        )
        plans.activate(s, ops.check_ctx, draft.id, actor="it-1", reason="go", now=T0)
    assert [c.agreed for c in night_checks(ops, draft.id)][:2] == ["22:00", "02:00"]
    with ops.session() as s:
        entries = [
            (e.actor, e.action, json.loads(e.detail))
            for e in s.exec(select(AuditEvent).order_by(col(AuditEvent.id))).all()
        ]
        assert audit.verify(s).ok
    plan_entries = [(a, act, d) for a, act, d in entries if act.startswith("plan.")]
    assert [(a, act) for a, act, _ in plan_entries] == [
        ("it-1", "plan.created"),
        ("it-2", "plan.updated"),
        ("it-2", "plan.updated"),
        ("it-1", "plan.activated"),
    ]
    assert plan_entries[1][2]["reason"] == "consent signed"
    # The consent reference itself is not copied into the audit detail.
    assert plan_entries[1][2]["changes"]["consent_ref"] == "(set)"


def test_invalid_plans_are_refused_with_the_field_named(ops: FleetOps) -> None:
    with pytest.raises(PlanInvalid, match="check_times"), ops.session() as s:
        plans.create(
            s,
            ops.check_ctx,
            PLAN | {"check_times": ["22:00", "22:05"]},
            actor="a",
            reason="r",
            now=T0,
        )
    with pytest.raises(PlanInvalid, match="escalation"), ops.session() as s:
        plans.create(
            s, ops.check_ctx, PLAN | {"escalation": ["call"]}, actor="a", reason="r", now=T0
        )
    make_plan(ops)
    with pytest.raises(Conflict, match="already serves"), ops.session() as s:
        plans.create(s, ops.check_ctx, PLAN, actor="a", reason="r", now=T0, activate=True)
    with pytest.raises(Conflict, match="another resident"), ops.session() as s:
        plans.create(
            s,
            ops.check_ctx,
            PLAN | {"device_id": "dev-p2"},
            actor="a",
            reason="r",
            now=T0,
            activate=True,
        )


def test_seen_check_arms_then_relocks_as_soon_as_the_outcome_is_recorded(ops: FleetOps) -> None:
    plan_id = make_plan(ops)
    first = night_checks(ops, plan_id)[0]
    assert first.id is not None
    assert (first.night, first.agreed, first.start_at) == (NIGHT, "22:00", at(11, 22))
    assert ops.reconcile(None, at(11, 21, 59)).publish == []
    start = ops.reconcile(None, at(11, 22, 0, 1))
    assert [c.kind for c in ops.pending_commands("dev-p1")] == [CommandKind.ARM]
    assert start.next_edges["dev-p1"] is not None
    armed(ops, "dev-p1", at(11, 22, 10), at(11, 22, 0, 2))
    with pytest.raises(Conflict, match="no look"):
        outcome(ops, first.id, Outcome.SEEN, at(11, 22, 1))
    look(ops, first.id, at(11, 22, 1))
    outcome(ops, first.id, Outcome.SEEN, at(11, 22, 2))
    ops.reconcile(["dev-p1"], at(11, 22, 2, 1))
    pending = [c.kind for c in ops.pending_commands("dev-p1") if c.kind is not CommandKind.LOOK]
    assert pending == [CommandKind.DISARM]  # privacy: done, so locked at once
    (row,) = [c for c in night_checks(ops, plan_id) if c.id == first.id]
    assert row.state is CheckState.SEEN and row.looks == 1 and row.outcome_by == "nurse-1"
    with pytest.raises(Conflict, match="already has"):
        outcome(ops, first.id, Outcome.NOT_SEEN, at(11, 22, 3))


def test_not_seen_twice_runs_the_chain_call_then_visit(ops: FleetOps) -> None:
    plan_id = make_plan(ops, recheck_delay_s=1200, call_timeout_s=600)
    first = night_checks(ops, plan_id)[0]
    assert first.id is not None
    ops.reconcile(None, at(11, 22, 0, 1))
    armed(ops, "dev-p1", at(11, 22, 10), at(11, 22, 0, 2))
    look(ops, first.id, at(11, 22, 1))
    outcome(ops, first.id, Outcome.NOT_SEEN, at(11, 22, 2))
    recheck = next(c for c in night_checks(ops, plan_id) if c.kind is CheckKind.RECHECK)
    assert recheck.id is not None
    # Open within the recheck delay: ends 20 min after "not seen", lasts the window.
    assert (recheck.start_at, recheck.end_at) == (at(11, 22, 12), at(11, 22, 22))
    ops.reconcile(None, at(11, 22, 12, 1))
    assert any(
        c.kind is CommandKind.ARM and c.until == int(at(11, 22, 22))
        for c in ops.pending_commands("dev-p1")
    )
    armed(ops, "dev-p1", at(11, 22, 22), at(11, 22, 12, 2))
    look(ops, recheck.id, at(11, 22, 13))
    outcome(ops, recheck.id, Outcome.NOT_SEEN, at(11, 22, 14))
    steps = list(
        ops.run(lambda s: s.exec(select(EscalationStep).order_by(col(EscalationStep.id))).all())
    )
    assert [(x.action, x.status) for x in steps] == [("call", StepStatus.OPEN)]
    assert visits(ops) == []
    # Nobody completes the call task within call_timeout_s: the scheduler moves on.
    ops.reconcile(None, at(11, 22, 24, 1))
    steps = list(
        ops.run(lambda s: s.exec(select(EscalationStep).order_by(col(EscalationStep.id))).all())
    )
    assert [(x.action, x.status, x.done_by) for x in steps] == [
        ("call", StepStatus.TIMED_OUT, "scheduler"),
        ("visit", StepStatus.DONE, "fleet"),
    ]
    (visit,) = visits(ops)
    assert visit.cause is VisitCause.NOT_SEEN_TWICE and visit.resident_id == "res-1"
    # Once, however often the sweep runs.
    ops.reconcile(None, at(11, 22, 30))
    assert len(visits(ops)) == 1
    # The visit is in the outbox, written with it.
    kinds = [
        e.kind
        for e in ops.run(lambda s: s.exec(select(OutboxEvent).order_by(col(OutboxEvent.id))).all())
    ]
    assert kinds == ["visit.raised"]


def test_call_task_resolved_by_staff_ends_the_chain(ops: FleetOps) -> None:
    plan_id = make_plan(ops)
    first = night_checks(ops, plan_id)[0]
    assert first.id is not None
    ops.reconcile(None, at(11, 22, 0, 1))
    armed(ops, "dev-p1", at(11, 22, 10), at(11, 22, 0, 2))
    look(ops, first.id, at(11, 22, 1))
    # The window ends with no outcome recorded: flagged, and this plan escalates it.
    ops.reconcile(None, at(11, 22, 10, 1))
    row = next(c for c in night_checks(ops, plan_id) if c.id == first.id)
    assert row.unrecorded and row.state is CheckState.ESCALATED
    (step,) = ops.run(
        lambda s: s.exec(select(EscalationStep).order_by(col(EscalationStep.id))).all()
    )
    assert step.why == "no_outcome" and step.id is not None
    with ops.session() as s:
        checks.complete_step(
            s, ops.check_ctx, step.id, StepResult.RESOLVED, staff="nurse-2", now=at(11, 22, 15)
        )
    ops.reconcile(None, at(11, 23, 0))
    assert visits(ops) == []  # resolved by phone: no visit
    assert ("nurse-2", "escalation.step_done") in audit_actions(ops)
    with ops.session() as s:
        cov = coverage.report(s, NIGHT)
    # The 22:00 check is covered by the resolved call; 02:00 has not happened yet.
    assert [p["agreed"] for p in cov["problems"]] == ["02:00"]


def test_something_wrong_raises_an_immediate_visit(ops: FleetOps) -> None:
    plan_id = make_plan(ops)
    first = night_checks(ops, plan_id)[0]
    assert first.id is not None
    ops.reconcile(None, at(11, 22, 0, 1))
    armed(ops, "dev-p1", at(11, 22, 10), at(11, 22, 0, 2))
    look(ops, first.id, at(11, 22, 1))
    outcome(ops, first.id, Outcome.SOMETHING_WRONG, at(11, 22, 2))
    (visit,) = visits(ops)
    assert visit.cause is VisitCause.SOMETHING_WRONG and visit.due_at == at(11, 22, 2)
    row = next(c for c in night_checks(ops, plan_id) if c.id == first.id)
    assert row.state is CheckState.VISIT


def test_opt_out_and_hospital_pause(ops: FleetOps) -> None:
    plan_id = make_plan(ops, visit_on_opt_out=True)
    with ops.session() as s:
        plans.add_opt_out(
            s, ops.check_ctx, plan_id, NIGHT, actor="nurse-1", reason="guests", now=T0
        )
    states = {(c.night, c.agreed): c.state for c in night_checks(ops, plan_id)}
    assert states[(NIGHT, "22:00")] is CheckState.OPTED_OUT
    assert states[(NIGHT, "02:00")] is CheckState.OPTED_OUT
    (visit,) = visits(ops)  # the plan says an opted-out night gets a visit instead
    assert visit.cause is VisitCause.OPTED_OUT and visit.due_at == at(11, 22)
    assert ops.reconcile(None, at(11, 22, 0, 1)).publish == []  # never armed
    # Hospital from Tuesday 21:00, open-ended; back Wednesday 10:00.
    with ops.session() as s:
        pause, _ = plans.add_pause(
            s,
            ops.check_ctx,
            plan_id,
            start_at=at(12, 21),
            end_at=None,
            kind="hospital",
            actor="it-1",
            reason="hospital",
            now=at(12, 13),
        )
    assert pause.id is not None
    tuesday = {
        c.agreed: c.state for c in night_checks(ops, plan_id) if c.night == date(2027, 1, 12)
    }
    assert tuesday == {"22:00": CheckState.PAUSED, "02:00": CheckState.PAUSED}
    with ops.session() as s:
        plans.end_pause(
            s,
            ops.check_ctx,
            plan_id,
            pause.id,
            at=None,
            actor="it-1",
            reason="home",
            now=at(12, 23, 30),
        )
    tuesday = {
        c.agreed: c.state for c in night_checks(ops, plan_id) if c.night == date(2027, 1, 12)
    }
    assert tuesday == {"22:00": CheckState.PAUSED, "02:00": CheckState.UPCOMING}


def test_end_of_service_closes_a_running_window_at_once(ops: FleetOps) -> None:
    plan_id = make_plan(ops)
    ops.reconcile(None, at(11, 22, 0, 1))
    armed(ops, "dev-p1", at(11, 22, 10), at(11, 22, 0, 2))
    with ops.session() as s:
        plans.end(
            s, ops.check_ctx, plan_id, actor="it-1", reason="resident ended", now=at(11, 22, 1)
        )
    ops.reconcile(None, at(11, 22, 1, 1))
    assert [c.kind for c in ops.pending_commands("dev-p1")] == [CommandKind.DISARM]
    states = {c.agreed: c.state for c in night_checks(ops, plan_id) if c.night == NIGHT}
    assert states == {"22:00": CheckState.CANCELLED, "02:00": CheckState.CANCELLED}


def test_preflight_raises_the_visit_before_the_window_not_at_its_start(ops: FleetOps) -> None:
    make_plan(ops, device_id="dev-p2", resident_id="res-2")
    with ops.session() as s:
        device = s.get(Device, "dev-p2")
        assert device is not None
        device.clock_synced = False
        s.add(device)
    ops.reconcile(None, at(11, 21, 29))
    assert visits(ops) == []  # 31 minutes ahead: not yet
    ops.reconcile(None, at(11, 21, 30, 1))
    (visit,) = visits(ops)
    assert visit.cause is VisitCause.CLOCK_UNSYNCED and visit.due_at == at(11, 22)
    assert json.loads(visit.evidence)["preflight"] is True
    ops.reconcile(None, at(11, 21, 45))
    assert len(visits(ops)) == 1
    # The check the visit replaces ends as "visit", not as an unrecorded miss.
    ops.reconcile(None, at(11, 22, 11))
    rows = ops.run(
        lambda s: s.exec(
            select(Check).where(Check.agreed == "22:00").order_by(col(Check.start_at))
        ).all()
    )
    assert rows[0].state is CheckState.VISIT and not rows[0].unrecorded


def test_coverage_lists_what_went_wrong_last_night(ops: FleetOps) -> None:
    plan_id = make_plan(ops, escalate_unrecorded=False)
    first, _second = night_checks(ops, plan_id)[:2]
    assert first.id is not None
    ops.reconcile(None, at(11, 22, 0, 1))
    armed(ops, "dev-p1", at(11, 22, 10), at(11, 22, 0, 2))
    look(ops, first.id, at(11, 22, 1))
    outcome(ops, first.id, Outcome.SEEN, at(11, 22, 2))
    ops.reconcile(None, at(12, 2, 11))  # 02:00 passed with nobody looking
    with ops.session() as s:
        device = s.get(Device, "dev-p1")
        assert device is not None
        device.connectivity = Connectivity.OFFLINE
        s.add(device)
    with ops.session() as s:
        row = coverage.store(s, NIGHT, at(12, 12, 5))
        assert row is not None and coverage.store(s, NIGHT, at(12, 12, 6)) is None
    (report,) = ops.run(coverage.reports)
    assert not report["ok"] and report["checks"] == 2
    whys = sorted((p["kind"], p["why"]) for p in report["problems"])
    assert whys == [
        ("check", "ended with no outcome and no visit"),
        ("device", "device dev-p1 is offline"),
    ]
    assert ops.run(
        lambda s: s.exec(select(Command).order_by(col(Command.id))).all()
    )  # sanity: the night did run


def test_unanswered_video_call_counts_as_not_seen(ops: FleetOps) -> None:
    plan_id = make_plan(ops)
    first = night_checks(ops, plan_id)[0]
    assert first.id is not None
    ops.reconcile(None, at(11, 22, 0, 1))
    armed(ops, "dev-p1", at(11, 22, 10), at(11, 22, 0, 2))
    look(ops, first.id, at(11, 22, 1), staff="nurse-4")
    (row,) = [c for c in night_checks(ops, plan_id) if c.id == first.id]
    assert row.last_look_id is not None
    # Another device cannot answer for it; an unknown look changes nothing.
    assert ops.call_not_answered("dev-p2", row.last_look_id, at(11, 22, 2)) == []
    assert ops.call_not_answered("dev-p1", "nope", at(11, 22, 2)) == []
    assert ops.call_not_answered("dev-p1", row.last_look_id, at(11, 22, 2)) == []
    checks_now = night_checks(ops, plan_id)
    (row,) = [c for c in checks_now if c.id == first.id]
    assert row.outcome is Outcome.NOT_SEEN and row.outcome_by == "nurse-4"
    assert row.state is CheckState.RECHECK_DUE
    assert any(c.parent_id == first.id for c in checks_now)  # the recheck window
    # Reported twice (a duplicate event): still one outcome, no error.
    assert ops.call_not_answered("dev-p1", row.last_look_id, at(11, 22, 3)) == []


def test_a_sweep_rolls_forward_only_the_plans_that_are_behind(ops: FleetOps) -> None:
    plan_id = make_plan(ops)
    helsinki = make_plan(ops, resident_id="res-2", device_id="dev-p2", tz="Europe/Helsinki")
    loaded: list[int | None] = []

    def on_load(plan: CarePlan, _context: object) -> None:
        loaded.append(plan.id)

    event.listen(CarePlan, "load", on_load)
    try:
        tomorrow = at(12, 13)  # the night of the 12th has begun: a night more to plan
        with ops.session() as s:
            checks.ensure_synced(s, ops.check_ctx, tomorrow)
        assert sorted(loaded) == sorted([plan_id, helsinki])
        for plan in (plan_id, helsinki):  # the night of the 13th is planned now
            assert max(c.night for c in night_checks(ops, plan)) == date(2027, 1, 13)
        loaded.clear()
        with ops.session() as s:  # both up to date: neither is even loaded
            assert checks.ensure_synced(s, ops.check_ctx, tomorrow + 60) == []
        assert loaded == []
    finally:
        event.remove(CarePlan, "load", on_load)
