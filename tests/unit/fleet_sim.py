"""A randomised fleet for reconciliation tests: plans, legacy windows, offline devices,
faulty cameras, armed devices, holds; and what a reconcile left behind, normalised so that
two databases can be compared (ids, jtis and signatures differ; what was decided must not)."""

from __future__ import annotations

import random
import shutil
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sqlmodel import Session, select

from fleet import audit, plans, signing
from fleet.core import FleetOps
from fleet.db import init_db, make_engine
from fleet.metrics import FleetMetrics
from fleet.models import (
    AuditEvent,
    Command,
    CommandStatus,
    Connectivity,
    Device,
    Visit,
    Window,
)
from fleet.plan_models import Check, EscalationStep
from fleet.reconcile import Policy
from tillsyn_protocol import Ack, AckResult, CameraHealth, CommandKind, LockState, StateReport
from tillsyn_protocol.windows import STOCKHOLM

NIGHT = date(2027, 1, 11)  # a Monday


def at(day: int, hh: int, mm: int = 0, ss: int = 0) -> float:
    return datetime(2027, 1, day, hh, mm, ss, tzinfo=STOCKHOLM).timestamp()


T0 = at(11, 12)
# Instants around the night's edges: pre-flight, starts, arm confirmation, ends, grace.
STEPS = [
    at(11, 21, 29),
    at(11, 21, 45),
    at(11, 22, 0, 1),
    at(11, 22, 1, 30),
    at(11, 22, 10, 3),
    at(11, 22, 10, 9),
    at(11, 22, 31),
    at(11, 23, 5),
    at(12, 1, 45),
    at(12, 2, 0, 2),
    at(12, 2, 12),
    at(12, 2, 40),
]
TIMES = [["22:00"], ["22:00", "02:00"], ["22:30"], ["22:00", "23:00"], ["02:00"]]


def new_ops(root: Path, key_file: Path) -> FleetOps:
    engine = make_engine(f"sqlite:///{root / 'f.db'}")
    init_db(engine)
    key = signing.load_or_create(key_file)
    policy = Policy(arm_confirm_s=60, visit_horizon_s=3600, preflight_s=1800)
    return FleetOps(engine, key, FleetMetrics(), policy)


def twins(root: Path, seed: int) -> tuple[FleetOps, FleetOps, list[str]]:
    """Two copies of one random fleet (``build``), in ``root/a`` and ``root/b``, sharing a
    signing key: one to run a variant on, one to run as before."""
    key = root / "key.pem"
    (root / "a").mkdir()
    a = new_ops(root / "a", key)
    ids = build(a, seed)
    (root / "b").mkdir()
    a.engine.dispose()
    shutil.copy(root / "a" / "f.db", root / "b" / "f.db")
    return a, new_ops(root / "b", key), ids


def build(ops: FleetOps, seed: int, n: int = 14) -> list[str]:
    rng = random.Random(seed)
    ids = [f"dev-r{seed}-{i:02d}" for i in range(n)]
    with ops.session() as s:
        for i, d in enumerate(ids):
            armed = rng.random() < 0.2
            s.add(
                Device(
                    id=d,
                    resident_id=f"res-{i}",
                    connectivity=rng.choice([Connectivity.ONLINE] * 4 + [Connectivity.OFFLINE]),
                    camera=rng.choice([CameraHealth.OK] * 4 + [CameraHealth.FAULT, None]),
                    clock_synced=rng.random() < 0.9,
                    reported_state=LockState.ARMED if armed else LockState.LOCKED,
                    armed_until=rng.choice([None, at(11, 21, 0), at(11, 22, 10)])
                    if armed
                    else None,
                    hold_until=at(11, 22, 5) if rng.random() < 0.07 else None,
                )
            )
    for i, d in enumerate(ids):
        kind = rng.random()
        if kind < 0.65:
            values: dict[str, Any] = {
                "resident_id": f"res-{i}",
                "device_id": d,
                "check_times": rng.choice(TIMES),
                "window_s": rng.choice([600, 1200]),
                "valid_from": NIGHT,
                "consent_ref": "DNR-1",
                "consent_date": date(2027, 1, 3),
                "escalation": rng.choice([["call", "visit"], ["visit"]]),
                "escalate_unrecorded": rng.random() < 0.7,
            }
            with ops.session() as s:
                plans.create(
                    s, ops.check_ctx, values, actor="it", reason="r", now=T0, activate=True
                )
        elif kind < 0.9:
            start = rng.choice(["22:00:00", "22:05:00", "02:00:00"])
            window = Window(device_id=d, start_local=start, duration_s=rng.choice([600, 900]))
            ops.add_window(window, T0, "test")
    return ids


def react(ops: FleetOps, seed: int, step: int, now: float) -> None:
    """Devices acknowledge some of their pending commands (the same ones in every copy)."""
    rng = random.Random(seed * 1000 + step)
    with ops.session() as s:
        pending = s.exec(
            select(Command.device_id, Command.kind, Command.jti, Command.seq, Command.until)
            .where(Command.status == CommandStatus.PENDING)
            .order_by(Command.device_id, Command.seq)
        ).all()
    for device_id, kind, jti, seq, until in pending:
        if rng.random() < 0.6:
            continue
        state = LockState.ARMED if kind is CommandKind.ARM else LockState.LOCKED
        ops.on_ack(device_id, Ack(jti=jti, ts=now, result=AckResult.APPLIED, state=state), now)
        armed_until = until if kind is CommandKind.ARM else None
        report = StateReport(ts=now, state=state, since=now, armed_until=armed_until, last_seq=seq)
        ops.on_state(device_id, report, now)


def outcome(ops: FleetOps) -> dict[str, Any]:
    """What the database says was decided, without ids, jtis, signatures or order."""

    def read(s: Session) -> dict[str, Any]:
        return {
            "commands": sorted(
                (c.device_id, c.seq, c.kind.value, c.until, c.status.value, c.created_at)
                for c in s.exec(select(Command))
            ),
            "devices": sorted(
                (d.id, d.next_seq, d.device_last_seq, d.reported_state.value)
                for d in s.exec(select(Device))
            ),
            "visits": sorted(
                (v.key, v.cause.value, v.device_id, v.due_at) for v in s.exec(select(Visit))
            ),
            "checks": sorted(
                (c.key, c.state.value, c.preflight_at, c.unrecorded, c.closed_at)
                for c in s.exec(select(Check))
            ),
            "steps": sorted(
                (st.check_id, st.step, st.action, st.status.value, st.due_at)
                for st in s.exec(select(EscalationStep))
            ),
            "audit": sorted((e.action, e.subject or "", e.ts) for e in s.exec(select(AuditEvent))),
            "chain_ok": audit.verify(s).ok,
        }

    return ops.run(read)
