"""The fleet's database-side core with SQLite and a controlled clock (no broker)."""

from __future__ import annotations

import itertools
import json
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import col, select

from fleet import audit, signing
from fleet.batch import Applied, Inbound
from fleet.commands import AckTimer, resend_delay
from fleet.config import FleetSettings, load_settings
from fleet.core import FleetOps
from fleet.db import init_db, make_engine
from fleet.errors import ConfigError, Conflict
from fleet.metrics import FleetMetrics
from fleet.models import (
    AuditEvent,
    Command,
    CommandStatus,
    Device,
    Visit,
    VisitCause,
    Window,
)
from fleet.reconcile import LOCK_GRACE_S, Policy
from tillsyn_protocol import (
    Ack,
    AckResult,
    CommandKind,
    LockState,
    StateReport,
    Status,
    keyring,
    verify,
)
from tillsyn_protocol.windows import STOCKHOLM

# 2026-11-23 22:00 Stockholm (CET, UTC+1) = 21:00 UTC
T22 = datetime(2026, 11, 23, 21, 0, tzinfo=UTC).timestamp()


@pytest.fixture
def ops(tmp_path: Path, database_url: str) -> Iterator[FleetOps]:
    engine = make_engine(database_url)
    init_db(engine)
    key = signing.load_or_create(tmp_path / "key.pem")
    yield FleetOps(engine, key, FleetMetrics(), Policy(arm_confirm_s=60, visit_horizon_s=3600))
    engine.dispose()


def add(ops: FleetOps, device_id: str = "dev-a1", *, start: str = "22:00:00", length: int = 600):
    ops.register_device(Device(id=device_id, resident_id="res-1"), T22 - 7200, "test")
    ops.add_window(
        Window(device_id=device_id, start_local=start, duration_s=length), T22 - 7200, "test"
    )


def commands(ops: FleetOps, device_id: str = "dev-a1") -> list[Command]:
    return list(
        ops.run(
            lambda s: s.exec(
                select(Command).where(Command.device_id == device_id).order_by(col(Command.id))
            ).all()
        )
    )


def visits(ops: FleetOps) -> list[Visit]:
    return list(ops.run(lambda s: s.exec(select(Visit).order_by(col(Visit.id))).all()))


def report(ops: FleetOps, state: LockState, until: float | None, now: float, seq: int = 0):
    ops.on_state(
        "dev-a1", StateReport(ts=now, state=state, since=now, armed_until=until, last_seq=seq), now
    )


def applied(arm: Command) -> Ack:
    """The device's ack of ``arm``: applied, now ARMED."""
    return Ack(
        ts=T22,
        jti=arm.jti,
        seq=arm.seq,
        cmd=CommandKind.ARM,
        result=AckResult.APPLIED,
        state=LockState.ARMED,
    )


def test_arm_issued_once_at_window_start_and_signed_for_the_device(ops: FleetOps) -> None:
    add(ops)
    assert ops.reconcile(None, T22 - 1).publish == []
    first = ops.reconcile(None, T22 + 0.1)
    assert len(first.publish) == 1
    assert first.publish[0].topic == "tillsyn/v1/dev/dev-a1/cmd"
    claims = verify(
        first.publish[0].payload,
        keys=keyring(ops.ledger._key.public_key),
        device_id="dev-a1",
        now=T22 + 1,
    )
    assert claims.cmd is CommandKind.ARM and claims.until == int(T22 + 600)
    assert claims.exp == claims.until  # never deliverable after its window
    # Run again (late, twice): the pending arm is not duplicated.
    assert ops.reconcile(None, T22 + 2).publish == []
    assert ops.reconcile(["dev-a1"], T22 + 3).publish == []
    assert [c.kind for c in commands(ops)] == [CommandKind.ARM]
    assert first.next_edges["dev-a1"] == pytest.approx(T22 + 600)


def test_armed_device_needs_nothing_and_relocks_itself(ops: FleetOps) -> None:
    add(ops)
    ops.reconcile(None, T22)
    report(ops, LockState.ARMED, T22 + 600, T22 + 1, seq=1)
    assert ops.reconcile(None, T22 + 300).publish == []
    # Just after the end the device's own timer is trusted for a few seconds.
    assert ops.reconcile(None, T22 + 600 + LOCK_GRACE_S / 2).publish == []
    # Still reported armed past the grace: the fleet disarms.
    late = ops.reconcile(None, T22 + 600 + LOCK_GRACE_S + 1)
    assert len(late.publish) == 1
    assert commands(ops)[-1].kind is CommandKind.DISARM
    assert commands(ops)[-1].seq == 2


def test_disarm_supersedes_pending_arm(ops: FleetOps) -> None:
    add(ops)
    ops.reconcile(None, T22)
    ops.remove_window(1, T22 + 1, "test")
    report(ops, LockState.ARMED, T22 + 600, T22 + 2, seq=1)
    ops.reconcile(None, T22 + 3)
    kinds = {c.kind: c.status for c in commands(ops)}
    assert kinds == {
        CommandKind.ARM: CommandStatus.SUPERSEDED,
        CommandKind.DISARM: CommandStatus.PENDING,
    }


def test_ack_settles_command_and_foreign_ack_changes_nothing(ops: FleetOps) -> None:
    add(ops)
    add(ops, "dev-b2")
    ops.reconcile(None, T22)
    arm_a = commands(ops, "dev-a1")[0]
    # dev-b2 claims dev-a1's command: ignored.
    ops.on_ack("dev-b2", applied(arm_a), T22 + 1)
    assert commands(ops, "dev-a1")[0].status is CommandStatus.PENDING
    ops.on_ack("dev-a1", applied(arm_a), T22 + 1)
    assert commands(ops, "dev-a1")[0].status is CommandStatus.APPLIED


def device(ops: FleetOps, device_id: str = "dev-a1") -> Device:
    found = ops.run(lambda s: s.get(Device, device_id))
    assert found is not None
    return found


def test_an_applied_arm_is_the_devices_state_until_its_report_arrives(ops: FleetOps) -> None:
    """Two replicas: the ack reached one, the state report (sent first) is still on its way
    to the other. A reconcile between the two must not arm the device again."""
    add(ops)
    ops.reconcile(None, T22)
    arm = commands(ops)[0]
    ops.on_ack("dev-a1", applied(arm), T22 + 0.2)
    armed = device(ops)
    assert (armed.reported_state, armed.armed_until) == (LockState.ARMED, T22 + 600)
    assert ops.reconcile(None, T22 + 0.3).publish == []
    assert ops.reconcile(None, T22 + 61).publish == []  # and no arm-unconfirmed visit
    assert [c.kind for c in commands(ops)] == [CommandKind.ARM] and visits(ops) == []
    # The report then changes nothing: no second state entry in the audit trail.
    report(ops, LockState.ARMED, T22 + 600, T22 + 0.4, seq=1)
    states = ops.run(
        lambda s: s.exec(select(AuditEvent).where(AuditEvent.action == "device.state")).all()
    )
    assert [(json.loads(e.detail)["state"], e.ts) for e in states] == [("ARMED", T22 + 0.2)]


def test_an_ack_is_not_taken_as_state_when_it_is_not_the_latest_word(ops: FleetOps) -> None:
    add(ops)
    ops.reconcile(None, T22)
    arm = commands(ops)[0]
    # A report has already shown the arm (seq 1) and what followed it (the device locked
    # again: its own timer, a reboot): the ack is older news.
    report(ops, LockState.LOCKED, None, T22 + 0.5, seq=1)
    ops.on_ack("dev-a1", applied(arm), T22 + 0.6)
    assert device(ops).reported_state is LockState.LOCKED
    # An ack of an arm that a newer arm replaced (the window was lengthened meanwhile).
    ops.reconcile(None, T22 + 1)
    (old,) = [c for c in commands(ops) if c.status is CommandStatus.PENDING]
    ops.remove_window(1, T22 + 2, "test")
    ops.add_window(Window(device_id="dev-a1", start_local="22:00:00", duration_s=900), T22 + 2, "t")
    ops.reconcile(None, T22 + 2)
    assert [c.until for c in commands(ops)][-1] == T22 + 900
    ops.on_ack("dev-a1", applied(old), T22 + 3)
    assert device(ops).reported_state is LockState.LOCKED


def test_resend_until_acked_then_expire_at_deadline(ops: FleetOps) -> None:
    add(ops, length=30)
    ops.reconcile(None, T22)
    assert ops.resend(T22 + 5, 10) == []
    assert len(ops.resend(T22 + 11, 10)) == 1
    assert commands(ops)[0].attempts == 2
    assert ops.resend(T22 + 31, 10) == []
    assert commands(ops)[0].status is CommandStatus.EXPIRED


def test_resends_back_off(ops: FleetOps) -> None:
    """10 s after the first send, then 20 s, then every 40 s: a device that is behind is
    not buried in duplicates of what waits in its broker session."""
    add(ops, length=600)
    ops.reconcile(None, T22)
    sent = [0]
    for t in range(1, 200):
        if ops.resend(T22 + t, 10):
            sent.append(t)
    assert [b - a for a, b in itertools.pairwise(sent)] == [10, 20, 40, 40, 40, 40]
    assert commands(ops)[0].attempts == len(sent)
    assert [resend_delay(a, 10) for a in (0, 1, 2, 3, 9)] == [10, 10, 20, 40, 40]


def _online(ops: FleetOps, device_id: str, now: float, boot: str = "boot-1") -> Applied:
    status = Status(ts=now, status="online", boot_id=boot)
    return ops.apply_inbound([Inbound(device_id, status, now)])


def test_an_arm_held_in_an_online_devices_session_is_resent_late(ops: FleetOps) -> None:
    """An online device's broker session delivers the arm (QoS 1): it is resent only after
    the longest ack timeout (6 x resend_after_s), not at 10 s, while an offline device's
    arm and an online device's disarm keep the short timeout."""
    add(ops, "dev-a1")
    add(ops, "dev-b2")
    _online(ops, "dev-a1", T22 - 60)
    ops.reconcile(None, T22)
    assert [c.kind for c in commands(ops, "dev-a1")] == [CommandKind.ARM]
    assert [len(ops.resend(T22 + t, 10)) for t in (10, 30, 59)] == [1, 1, 0]  # dev-b2 only
    assert commands(ops, "dev-a1")[0].attempts == 1
    assert len(ops.resend(T22 + 60, 10)) == 1
    assert commands(ops, "dev-a1")[0].attempts == 2
    # A disarm for an online device: the short timeout.
    with ops.session() as s:
        device = s.get(Device, "dev-a1")
        assert device is not None
        ops.ledger.issue(s, device, CommandKind.DISARM, now=T22 + 61)
    ops.resend(T22 + 71, 10)
    disarm = commands(ops, "dev-a1")[-1]
    assert (disarm.kind, disarm.attempts) == (CommandKind.DISARM, 2)


def test_a_device_that_reconnects_gets_its_pending_commands_at_once(ops: FleetOps) -> None:
    add(ops, "dev-a1")
    _online(ops, "dev-a1", T22 - 60)
    ops.reconcile(None, T22)
    back = _online(ops, "dev-a1", T22 + 5, boot="boot-2")  # its old session may be gone
    assert [p.topic for p in back.publish] == ["tillsyn/v1/dev/dev-a1/cmd"]
    assert commands(ops)[0].attempts == 2
    # Only the scheduler leader sends commands; a standby applies the status only.
    ops.leading = lambda: False
    assert _online(ops, "dev-a1", T22 + 6, boot="boot-3").publish == []
    assert commands(ops)[0].attempts == 2


def test_resend_waits_for_as_long_as_acks_have_been_taking(ops: FleetOps) -> None:
    """A storm in which devices ack 30 s after the send: the next command is not resent at
    10 s (it is most likely still queued for its device), but after the learnt timeout,
    capped at 6 x resend_after_s."""
    add(ops, "dev-a1")
    add(ops, "dev-b2")
    ops.reconcile(None, T22)
    arm_a = commands(ops, "dev-a1")[0]
    ops.on_ack("dev-a1", applied(arm_a), T22 + 30)
    assert ops.resend(T22 + 31, 10) == []
    assert ops.resend(T22 + 59, 10) == []
    timeout = ops.metrics.registry.get_sample_value("tillsyn_command_ack_timeout_seconds")
    assert timeout == 60  # exported for IT support
    assert len(ops.resend(T22 + 60, 10)) == 1  # 30 + 4 x 15 = 90, capped at 60
    assert commands(ops, "dev-b2")[0].attempts == 2


def test_ack_timer_follows_acks_between_its_bounds() -> None:
    timer = AckTimer()
    assert timer.timeout(10) == 10  # nothing learnt: the configured floor
    for _ in range(60):
        timer.sample(15.0)
    assert 15 <= timer.timeout(10) < 16
    for _ in range(60):
        timer.sample(0.2)
    assert timer.timeout(10) == 10  # fast acks never bring it below the floor
    timer.sample(1e6)
    assert timer.timeout(10) == 60  # nor slow ones above 6 x the floor
    assert timer.timeout(0.0) == 0.0  # "resend everything now" (after a reconnect) stays so


def test_arm_not_confirmed_raises_one_visit(ops: FleetOps) -> None:
    add(ops)
    ops.reconcile(None, T22)
    ops.reconcile(None, T22 + 30)
    assert visits(ops) == []
    ops.reconcile(None, T22 + 61)
    ops.reconcile(None, T22 + 120)
    assert [v.cause for v in visits(ops)] == [VisitCause.ARM_UNCONFIRMED]


def test_offline_device_gets_one_visit_per_check_within_horizon(ops: FleetOps) -> None:
    add(ops)
    ops.on_status("dev-a1", Status(ts=T22, status="online", boot_id="b1"), T22 - 7000)
    ops.on_status("dev-a1", Status(ts=T22, status="offline", boot_id="b1"), T22 - 5000)
    ops.reconcile(None, T22 - 5000)
    assert visits(ops) == []  # the window is beyond the one-hour horizon
    ops.reconcile(None, T22 - 3000)
    ops.reconcile(None, T22 - 2000)
    ops.mark_silent([("dev-a1", T22 - 5000)], T22 - 1000)  # a second detector, same outage
    ops.reconcile(None, T22 - 1000)
    found = visits(ops)
    assert len(found) == 1
    assert found[0].cause is VisitCause.DEVICE_OFFLINE
    assert found[0].due_at == pytest.approx(T22)
    assert found[0].resident_id == "res-1"
    # Back online before the window: marked, not deleted.
    ops.on_status("dev-a1", Status(ts=T22, status="online", boot_id="b2"), T22 - 500)
    found = visits(ops)
    assert len(found) == 1 and found[0].device_back_at == pytest.approx(T22 - 500)


def test_dst_window_on_spring_forward_night(ops: FleetOps) -> None:
    # 02:30 does not exist on 2027-03-28 in Stockholm: the check runs at 03:30 CEST.
    ops.register_device(Device(id="dev-a1"), 0, "test")
    ops.add_window(Window(device_id="dev-a1", start_local="02:30:00", duration_s=600), 0, "t")
    expected = datetime(2027, 3, 28, 3, 30, tzinfo=STOCKHOLM).timestamp()
    before = ops.reconcile(None, expected - 3600)
    assert before.next_edges["dev-a1"] == pytest.approx(expected)
    assert len(ops.reconcile(None, expected + 1).publish) == 1


def test_audit_chain_detects_a_tampered_row(ops: FleetOps) -> None:
    add(ops)
    ops.reconcile(None, T22)
    report_ok = ops.run(audit.verify)
    assert report_ok.ok and report_ok.entries >= 3
    with ops.engine.begin() as conn:
        conn.execute(text("UPDATE auditevent SET actor = 'mallory' WHERE id = 2"))
    broken = ops.run(audit.verify)
    assert not broken.ok and broken.first_broken_id == 2


def test_duplicate_device_is_a_conflict(ops: FleetOps) -> None:
    add(ops)
    with pytest.raises(Conflict):
        ops.register_device(Device(id="dev-a1"), T22, "test")


def test_signing_key_created_private_and_refused_when_exposed(tmp_path: Path) -> None:
    path = tmp_path / "k" / "key.pem"
    key = signing.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert signing.load_or_create(path).kid == key.kid
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        signing.load_or_create(path)


def test_settings_errors_name_the_setting(tmp_path: Path) -> None:
    bad = tmp_path / "f.toml"
    bad.write_text('tz = "Mars/Olympus"\n')
    with pytest.raises(ConfigError, match=r"^tz: "):
        load_settings(bad)
    bad.write_text("broker_port = 70000\n")
    with pytest.raises(ConfigError, match=r"^broker_port: "):
        load_settings(bad)
    bad.write_text("nonsense = 1\n")
    with pytest.raises(ConfigError, match=r"^nonsense: "):
        load_settings(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="database_url"):
        load_settings(None, env="prod")
    assert FleetSettings().tz == "Europe/Stockholm"
