"""Batched reconciliation and batched device messages (SQLite, a controlled clock).

The batched pass must decide exactly what reconciling each device on its own decides; a
batch of device messages is one transaction in which a bad message is rejected alone.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlmodel import col, select

from fleet import audit, reconcile, snapshot
from fleet.batch import Inbound
from fleet.core import FleetOps
from fleet.models import AuditEvent, Command, CommandStatus, Device, Window
from fleet.plan_models import ARMING_STATES, Check, CheckState
from fleet.reconcile import Policy
from fleet.snapshot import DeviceData
from tests.unit.fleet_sim import STEPS, T0, new_ops, outcome, react, twins
from tillsyn_protocol import (
    Ack,
    AckResult,
    CommandKind,
    Event,
    EventKind,
    LockState,
    RefusalReason,
    StateReport,
)
from tillsyn_protocol.windows import STOCKHOLM, occurrences_between


@pytest.mark.parametrize("seed", range(6))
def test_batch_reconcile_decides_what_per_device_reconcile_decides(
    tmp_path: Path, seed: int
) -> None:
    a, b, ids = twins(tmp_path, seed)
    for step, now in enumerate(STEPS):
        together = a.reconcile(ids, now)
        alone = [b.reconcile([d], now) for d in ids]
        edges = {d: e for r in alone for d, e in r.next_edges.items()}
        assert together.next_edges == edges, f"step {step}"
        assert sorted(p.topic for p in together.publish) == sorted(
            p.topic for r in alone for p in r.publish
        ), f"step {step}"
        assert outcome(a) == outcome(b), f"step {step}"
        react(a, seed, step, now)
        react(b, seed, step, now)
    # A full pass (None) is the same pass over every device.
    assert outcome(a)["chain_ok"]
    full = a.reconcile(None, STEPS[-1] + 60)
    listed = b.reconcile(ids, STEPS[-1] + 60)
    assert full.next_edges == listed.next_edges
    assert outcome(a) == outcome(b)


def _ops(tmp_path: Path) -> FleetOps:
    ops = new_ops(tmp_path, tmp_path / "key.pem")
    with ops.session() as s:
        for d in ("dev-aa", "dev-bb", "dev-cc"):
            s.add(Device(id=d, resident_id=f"res-{d}"))
    return ops


def _arm(ops: FleetOps, device_id: str, now: float) -> Command:
    with ops.session() as s:
        device = s.get(Device, device_id)
        assert device is not None
        ops.ledger.issue(s, device, CommandKind.ARM, now=now, until=int(now + 600))
    return ops.run(lambda s: s.exec(select(Command).where(Command.device_id == device_id)).one())


def _ack(cmd: Command, now: float) -> Ack:
    return Ack(jti=cmd.jti, ts=now, result=AckResult.APPLIED, state=LockState.ARMED)


def _refusal(cmd: Command, now: float, state: LockState, reason: RefusalReason) -> Ack:
    return Ack(jti=cmd.jti, ts=now, result=AckResult.REFUSED, state=state, reason=reason)


def _state(state: LockState, now: float, until: float | None = None, seq: int = 0) -> StateReport:
    return StateReport(ts=now, state=state, since=now, armed_until=until, last_seq=seq)


def test_one_bad_message_in_a_batch_is_rejected_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = _ops(tmp_path)
    now = T0
    cmd_a, cmd_b = _arm(ops, "dev-aa", now), _arm(ops, "dev-bb", now)
    real_state = ops._state

    def failing_state(session, device_id, report, at):  # type: ignore[no-untyped-def]
        touched = real_state(session, device_id, report, at)  # writes, then fails
        if device_id == "dev-cc":
            raise RuntimeError("boom")
        return touched

    monkeypatch.setattr(ops, "_state", failing_state)
    before = ops.run(lambda s: len(s.exec(select(AuditEvent)).all()))
    result = ops.apply_inbound(
        [
            Inbound("dev-aa", _ack(cmd_a, now + 1), now + 1),
            Inbound("dev-gone", _state(LockState.ARMED, now + 1), now + 1),  # not in the DB
            Inbound("dev-cc", _state(LockState.ARMED, now + 1, now + 600), now + 1),
            Inbound("dev-bb", _ack(cmd_b, now + 1), now + 1),
            Inbound("dev-bb", _state(LockState.ARMED, now + 1, cmd_b.until, 1), now + 1),
        ]
    )
    assert [(i.device_id, why) for i, why, _ in result.rejected] == [
        ("dev-gone", "unknown_device"),
        ("dev-cc", "failed"),
    ]
    statuses = ops.run(lambda s: {c.device_id: c.status for c in s.exec(select(Command))})
    assert statuses == {"dev-aa": CommandStatus.APPLIED, "dev-bb": CommandStatus.APPLIED}
    devices = ops.run(lambda s: {d.id: d for d in s.exec(select(Device))})
    assert devices["dev-bb"].reported_state is LockState.ARMED
    assert devices["dev-cc"].reported_state is LockState.LOCKED  # its writes rolled back
    assert devices["dev-cc"].armed_until is None
    entries = ops.run(lambda s: s.exec(select(AuditEvent).order_by(AuditEvent.id)).all())
    new = [(e.action, e.subject) for e in entries[before:]]
    assert new == [  # an applied arm is the state it leaves the device in (its report agrees)
        ("command.acked", "dev-aa"),
        ("device.state", "dev-aa"),
        ("command.acked", "dev-bb"),
        ("device.state", "dev-bb"),
    ]
    assert ops.run(audit.verify).ok


def test_a_batch_keeps_each_devices_order(tmp_path: Path) -> None:
    ops = _ops(tmp_path)
    now = T0
    cmd = _arm(ops, "dev-aa", now)
    result = ops.apply_inbound(
        [
            Inbound("dev-aa", _state(LockState.ARMED, now + 1, cmd.until, 1), now + 1, True),
            Inbound("dev-bb", _state(LockState.ARMED, now + 1, now + 60), now + 1),
            Inbound("dev-aa", _ack(cmd, now + 1), now + 1),
            Inbound("dev-aa", _state(LockState.LOCKED, now + 2, None, 1), now + 2),
            Inbound("dev-bb", _state(LockState.LOCKED, now + 2), now + 2),
            Inbound(
                "dev-aa", Event(ts=now + 2, kind=EventKind.BOOT, state=LockState.LOCKED), now + 2
            ),
        ]
    )
    assert result.rejected == []
    devices = ops.run(lambda s: {d.id: d for d in s.exec(select(Device))})
    assert devices["dev-aa"].reported_state is LockState.LOCKED  # the later report wins
    assert devices["dev-bb"].reported_state is LockState.LOCKED
    assert devices["dev-aa"].connectivity.value == "online"  # contact came first
    actions = ops.run(
        lambda s: [
            (e.action, e.subject) for e in s.exec(select(AuditEvent).order_by(AuditEvent.id))
        ]
    )
    assert [a for a in actions if a[1] == "dev-aa"][-4:] == [
        ("device.online", "dev-aa"),
        ("device.state", "dev-aa"),
        ("command.acked", "dev-aa"),
        ("device.state", "dev-aa"),
    ]
    # Reconcile what changed, once per device.
    assert sorted(set(result.touched)) == ["dev-aa", "dev-bb"]
    assert ops.run(audit.verify).ok


def _latest(ops: FleetOps, device_id: str) -> Command:
    stmt = select(Command).where(Command.device_id == device_id).order_by(col(Command.seq).desc())
    return ops.run(lambda s: s.exec(stmt.limit(1)).one())


def _disarm(ops: FleetOps, device_id: str, now: float) -> Command:
    with ops.session() as s:
        device = s.get(Device, device_id)
        assert device is not None
        ops.ledger.issue(s, device, CommandKind.DISARM, now=now)
    return _latest(ops, device_id)


def test_a_state_that_is_the_applied_effect_of_the_latest_command_is_not_reconciled(
    tmp_path: Path,
) -> None:
    """At a window start every device reports ARMED and acks its arm in the same batch:
    that state is what the fleet decided, so the devices are not reconciled a second time.
    Every other state change still is."""
    ops = _ops(tmp_path)
    for d in ("dev-aa", "dev-bb", "dev-cc"):  # 12:00-12:10 every day; T0 is 12:00
        ops.add_window(Window(device_id=d, start_local="12:00:00", duration_s=600), T0 - 60, "it")
    now = T0 + 1  # the window start's edge: an arm each
    assert len(ops.reconcile(["dev-aa", "dev-bb", "dev-cc"], now).publish) == 3
    a, b, c = (_latest(ops, d) for d in ("dev-aa", "dev-bb", "dev-cc"))
    later = now + 1
    result = ops.apply_inbound(
        [
            # dev-aa: the arm's effect, state first, then the ack (the agent's order).
            Inbound("dev-aa", _state(LockState.ARMED, later, a.until, a.seq), later),
            Inbound("dev-aa", _ack(a, later), later),
            # dev-bb: armed, but not until the end the fleet asked for.
            Inbound("dev-bb", _state(LockState.ARMED, later, (b.until or 0) + 60, b.seq), later),
            Inbound("dev-bb", _ack(b, later), later),
            # dev-cc: reports ARMED; its ack is not in this batch.
            Inbound("dev-cc", _state(LockState.ARMED, later, c.until, c.seq), later),
        ]
    )
    assert result.rejected == []
    assert sorted(set(result.moved)) == ["dev-aa", "dev-bb", "dev-cc"]
    assert sorted(set(result.touched)) == ["dev-bb", "dev-cc"]
    # The one left out needs nothing: reconciling it anyway changes nothing.
    assert ops.reconcile(["dev-aa"], later + 1).publish == []


def test_a_state_is_reconciled_when_a_newer_command_is_on_its_way(tmp_path: Path) -> None:
    ops = _ops(tmp_path)
    now = T0
    arm = _arm(ops, "dev-aa", now)
    _disarm(ops, "dev-aa", now + 1)  # the window was cancelled meanwhile
    result = ops.apply_inbound(
        [
            Inbound("dev-aa", _state(LockState.ARMED, now + 2, arm.until, arm.seq), now + 2),
            Inbound("dev-aa", _ack(arm, now + 2), now + 2),
        ]
    )
    assert result.touched == ["dev-aa"]


def test_a_disarm_applied_and_reported_locked_is_not_reconciled(tmp_path: Path) -> None:
    ops = _ops(tmp_path)
    now = T0
    arm = _arm(ops, "dev-aa", now)
    ops.apply_inbound(
        [
            Inbound("dev-aa", _state(LockState.ARMED, now + 1, arm.until, arm.seq), now + 1),
            Inbound("dev-aa", _ack(arm, now + 1), now + 1),
        ]
    )
    disarm = _disarm(ops, "dev-aa", now + 2)
    done = Ack(jti=disarm.jti, ts=now + 3, result=AckResult.APPLIED, state=LockState.LOCKED)
    result = ops.apply_inbound(
        [
            Inbound("dev-aa", _state(LockState.LOCKED, now + 3, None, disarm.seq), now + 3),
            Inbound("dev-aa", done, now + 3),
        ]
    )
    assert result.moved == ["dev-aa"] and result.touched == []
    # A device that re-locks on its own (no command of the fleet's) is reconciled.
    rebooted = ops.apply_inbound(
        [Inbound("dev-aa", _state(LockState.ARMED, now + 4, arm.until, disarm.seq), now + 4)]
    )
    assert rebooted.touched == ["dev-aa"]


@settings(max_examples=200, deadline=None)
@given(
    start=st.sampled_from(["22:00:00", "02:30:00", "00:00:00", "23:59:59", "01:15:00"]),
    duration=st.sampled_from([60, 600, 1800, 7200, 86400]),
    weekdays=st.sampled_from(["0123456", "06", "135"]),
    # 2027: spring forward 28 March, fall back 31 October (Stockholm).
    lo=st.floats(min_value=1_801_000_000, max_value=1_830_000_000),
    span=st.floats(min_value=0, max_value=9 * 86400),
)
def test_memoised_window_occurrences_are_those_of_the_window_arithmetic(
    start: str, duration: int, weekdays: str, lo: float, span: float
) -> None:
    window = Window(device_id="dev-aa", start_local=start, duration_s=duration, weekdays=weekdays)
    direct = list(
        occurrences_between(
            [reconcile.parse_hms(start)],
            timedelta(seconds=duration),
            datetime.fromtimestamp(lo, UTC),
            datetime.fromtimestamp(lo + span, UTC),
            tz=STOCKHOLM,
            weekdays=frozenset(int(d) for d in weekdays),
        )
    )
    assert reconcile.occurrences([window], lo, lo + span) == direct
    # Spans take the memoised occurrences as epoch seconds.
    spans = reconcile.spans_of([window], [], lo, lo + span)
    merged = [(o.start.timestamp(), o.end.timestamp()) for o in direct]
    for i in range(len(merged) - 1, 0, -1):  # overlapping occurrences are one span
        if merged[i][0] < merged[i - 1][1]:
            merged[i - 1 : i + 1] = [(merged[i - 1][0], max(merged[i - 1][1], merged[i][1]))]
    assert [(s.start, s.end) for s in spans] == merged


def test_the_refusal_of_a_resent_copy_of_an_applied_command_is_not_reconciled(
    tmp_path: Path,
) -> None:
    ops = _ops(tmp_path)
    now = T0
    arm = _arm(ops, "dev-aa", now)
    other = _arm(ops, "dev-bb", now)
    replayed = _refusal(arm, now + 2, LockState.ARMED, RefusalReason.REPLAYED)
    refused = _refusal(other, now + 2, LockState.LOCKED, RefusalReason.CAMERA_FAULT)
    result = ops.apply_inbound(
        [
            Inbound("dev-aa", _ack(arm, now + 1), now + 1),  # applied, then its copy refused
            Inbound("dev-aa", replayed, now + 2),
            Inbound("dev-bb", refused, now + 2),  # a real refusal: reconciled
        ]
    )
    assert result.touched == ["dev-bb"]
    statuses = ops.run(lambda s: {c.device_id: c.status for c in s.exec(select(Command))})
    assert statuses == {"dev-aa": CommandStatus.APPLIED, "dev-bb": CommandStatus.REFUSED}


@settings(max_examples=300, deadline=None)
@given(
    checks=st.lists(
        st.tuples(
            st.floats(min_value=-7200, max_value=reconcile.EDGE_HORIZON_S - 1),  # start - now
            st.sampled_from([60, 600, 1800, 7200, 14400]),  # length
            st.sampled_from(list(CheckState)),
        ),
        max_size=12,
    ),
    armed_until=st.one_of(st.none(), st.floats(min_value=-600, max_value=7200)),
)
def test_the_next_edge_needs_only_the_first_check_past_the_horizon(
    checks: list[tuple[float, int, CheckState]], armed_until: float | None
) -> None:
    """A pass loads the checks of its horizon (two hours) and only the start of the first
    later one: the next edge is the one that all checks of the eight-day edge horizon gave."""
    policy = Policy(arm_confirm_s=60, visit_horizon_s=7200, preflight_s=1800)
    now = T0
    device = Device(id="dev-aa", reported_state=LockState.ARMED, armed_until=None)
    if armed_until is not None:
        device.armed_until = now + armed_until
    rows = sorted(
        (
            Check(id=i, device_id="dev-aa", start_at=now + at, end_at=now + at + n, state=state)
            for i, (at, n, state) in enumerate(checks)
        ),
        key=lambda c: (c.start_at, c.id),
    )
    horizon = now + max(policy.visit_horizon_s, policy.preflight_s) + 1
    arming = [c for c in rows if c.state in ARMING_STATES]
    all_of_them = DeviceData(device, checks=list(rows))
    loaded = DeviceData(device, checks=[c for c in rows if c.start_at < horizon])
    later = [c.start_at for c in arming if c.start_at >= horizon]
    loaded.later_check = min(later, default=None)
    assert reconcile.next_edge(loaded, now, policy, ()) == reconcile.next_edge(
        all_of_them, now, policy, ()
    )


def test_the_snapshot_holds_each_devices_active_windows_as_plain_values(tmp_path: Path) -> None:
    """Windows are loaded as tuples (not ORM objects): the same definitions, inactive ones
    left out, and window arithmetic gives the same occurrences for either."""
    ops = new_ops(tmp_path, tmp_path / "key.pem")
    with ops.session() as s:
        s.add(Device(id="dev-aa"))
        s.add(Device(id="dev-bb"))
        s.flush()
        s.add(Window(device_id="dev-aa", start_local="22:00:00", duration_s=600, weekdays="024"))
        s.add(Window(device_id="dev-aa", start_local="02:00:00", duration_s=900, tz="UTC"))
        s.add(Window(device_id="dev-aa", start_local="04:00:00", duration_s=60, active=False))
    with ops.session() as s:
        loaded = snapshot.load(s, ["dev-aa", "dev-bb"], T0, 3600)
        rows = s.exec(select(Window).where(col(Window.active)).order_by(col(Window.id))).all()
    assert loaded["dev-aa"].windows == [
        snapshot.WindowSpec("22:00:00", 600, "Europe/Stockholm", "024"),
        snapshot.WindowSpec("02:00:00", 900, "UTC", "0123456"),
    ]
    assert loaded["dev-bb"].windows == []
    week = (T0, T0 + 7 * 86400)
    assert reconcile.occurrences(loaded["dev-aa"].windows, *week) == reconcile.occurrences(
        rows, *week
    )
