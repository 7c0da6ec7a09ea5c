"""Batched reconciliation and batched device messages (SQLite, a controlled clock).

The batched pass must decide exactly what reconciling each device on its own decides; a
batch of device messages is one transaction in which a bad message is rejected alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlmodel import select

from fleet import audit
from fleet.batch import Inbound
from fleet.core import FleetOps
from fleet.models import AuditEvent, Command, CommandStatus, Device
from tests.unit.fleet_sim import STEPS, T0, build, new_ops, outcome, react
from tillsyn_protocol import Ack, AckResult, CommandKind, Event, EventKind, LockState, StateReport


@pytest.mark.parametrize("seed", range(6))
def test_batch_reconcile_decides_what_per_device_reconcile_decides(
    tmp_path: Path, seed: int
) -> None:
    key = tmp_path / "key.pem"
    (tmp_path / "a").mkdir()
    a = new_ops(tmp_path / "a", key)
    ids = build(a, seed)
    (tmp_path / "b").mkdir()
    a.engine.dispose()
    shutil.copy(tmp_path / "a" / "f.db", tmp_path / "b" / "f.db")
    b = new_ops(tmp_path / "b", key)
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
    assert new == [
        ("command.acked", "dev-aa"),
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
