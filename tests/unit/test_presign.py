"""Signing ahead (Ledger.presign): a crowded edge's arms are signed before the instant and
used by the edge only for exactly the arm it issues then, at or after the instant; the
scheduler plans the job; the service runs it in parts and survives its failure."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from apscheduler.events import EVENT_JOB_MISSED, JobEvent
from prometheus_client import CollectorRegistry
from sqlmodel import Session, col, select

from fleet import scheduler as scheduler_mod
from fleet.commands import PRESIGN_MAX_AGE_S
from fleet.config import FleetSettings
from fleet.core import FleetOps
from fleet.metrics import FleetMetrics
from fleet.models import Command, CommandStatus, Device, Window
from fleet.outbound import Publish
from fleet.scheduler import FleetScheduler
from fleet.service import RECONCILE_PART, FleetService
from fleet.snapshot import load
from tests.unit.fleet_sim import STEPS, T0, new_ops, outcome, react, twins
from tillsyn_protocol import CommandKind, TokenError, keyring, verify
from tillsyn_protocol.errors import RefusalReason


def _claims(token: str) -> dict[str, Any]:
    body = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return claims


def _issued_arms(ops: FleetOps, now: float) -> dict[tuple[str, int, int], tuple[str, str]]:
    def read(s: Session) -> dict[tuple[str, int, int], tuple[str, str]]:
        stmt = select(Command).where(Command.kind == CommandKind.ARM, Command.created_at == now)
        return {(c.device_id, c.seq, int(c.until or 0)): (c.jti, c.token) for c in s.exec(stmt)}

    return ops.run(read)


@pytest.mark.parametrize("seed", range(4))
def test_the_arms_signed_ahead_are_exactly_the_arms_the_edge_issues(
    tmp_path: Path, seed: int
) -> None:
    """Random fleets through a night: signed ahead at each instant, the edge then decides
    exactly what it decides without (commands, devices, visits), and every arm it issues
    is one signed ahead, token and jti, valid from the instant on and not before."""
    a, b, ids = twins(tmp_path, seed)
    keys = keyring(a.ledger._key.public_key)
    used = 0
    for step, now in enumerate(STEPS):
        signed = a.presign(ids, now)
        ahead = dict(a.ledger._presigned)
        assert len(ahead) == signed, f"step {step}"
        a.reconcile(ids, now)
        b.reconcile(ids, now)
        assert outcome(a) == outcome(b), f"step {step}"
        issued = _issued_arms(a, now)
        assert issued.keys() == ahead.keys(), f"step {step}"
        for (device_id, seq, until), (jti, token) in issued.items():
            signed_ahead = ahead[device_id, seq, until]
            assert (jti, token) == (signed_ahead.jti, signed_ahead.token)
            claims = verify(token, keys=keys, device_id=device_id, now=now)
            assert (claims.seq, claims.until, claims.jti) == (seq, until, jti)
            assert claims.iat == claims.nbf == int(now)
            with pytest.raises(TokenError) as refused:
                verify(token, keys=keys, device_id=device_id, now=now - 60)
            assert refused.value.reason is RefusalReason.NOT_YET_VALID
        used += len(issued)
        assert a.ledger._presigned == {}, f"step {step}: all used"
        react(a, seed, step, now)
        react(b, seed, step, now)
    assert used > 0


@pytest.fixture
def ops(tmp_path: Path) -> FleetOps:
    ops = new_ops(tmp_path, tmp_path / "key.pem")
    with ops.session() as s:
        s.add(Device(id="dev-aa", resident_id="res-aa"))
        start = datetime.fromtimestamp(T0 + 100, UTC).strftime("%H:%M:%S")
        s.add(Window(device_id="dev-aa", start_local=start, duration_s=1800, tz="UTC"))
    return ops


def _tokens(ops: FleetOps) -> list[str]:
    return ops.run(lambda s: list(s.exec(select(Command.token).order_by(col(Command.seq)))))


def test_a_signed_ahead_arm_is_not_used_before_its_instant(ops: FleetOps) -> None:
    at = T0 + 100
    assert ops.presign(["dev-aa"], at) == 1
    (ahead,) = ops.ledger._presigned.values()
    # A window already open earlier (a clock step): the arm issued before the instant is
    # signed then, and the one signed ahead can no longer match (its seq is taken).
    with ops.session() as s:
        device = s.get(Device, "dev-aa")
        assert device is not None
        ops.ledger.issue(s, device, CommandKind.ARM, now=at - 1, until=int(at + 1800))
    (token,) = _tokens(ops)
    assert token != ahead.token and _claims(token)["iat"] == int(at - 1)
    assert ops.ledger._presigned == {}


def test_a_signed_ahead_arm_is_not_used_for_another_seq_or_too_late(ops: FleetOps) -> None:
    at = T0 + 100
    ops.presign(["dev-aa"], at)
    (ahead,) = ops.ledger._presigned.values()
    with ops.session() as s:  # another command takes the predicted seq first
        device = s.get(Device, "dev-aa")
        assert device is not None
        ops.ledger.issue(s, device, CommandKind.DISARM, now=at - 5)
    ops.reconcile(["dev-aa"], at)
    _disarm, arm = _tokens(ops)
    assert arm != ahead.token and _claims(arm)["seq"] == 2
    until = int(at + 1800)
    assert list(ops.ledger._presigned) == [("dev-aa", 1, until)]  # unused, kept a while
    ops.presign(["dev-aa"], at + 1)  # the arm is pending now: nothing more to sign
    assert list(ops.ledger._presigned) == [("dev-aa", 1, until)]
    # Too late: an instant's arms are used for PRESIGN_MAX_AGE_S after it, then dropped.
    late = at + PRESIGN_MAX_AGE_S
    assert ops.ledger._signed("dev-aa", CommandKind.ARM, 1, until, late) is None
    ops.ledger._presigned[("dev-aa", 1, until)] = ahead
    ops.ledger.forget_presigned(late - 1)
    assert len(ops.ledger._presigned) == 1
    ops.ledger.forget_presigned(late + 1)
    assert ops.ledger._presigned == {}


def test_nothing_is_recorded_or_sent_when_signing_ahead(ops: FleetOps) -> None:
    ops.presign(["dev-aa"], T0 + 100)
    assert ops.run(lambda s: s.exec(select(Command)).all()) == []
    device = ops.run(lambda s: s.get(Device, "dev-aa"))
    assert device is not None and device.next_seq == 1
    data = ops.run(lambda s: load(s, ["dev-aa"], T0 + 100, 1.0))
    assert data["dev-aa"].pending == []


# --- the scheduler ----------------------------------------------------------------------


async def test_a_crowded_instant_gets_a_presign_job_before_its_edge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(scheduler_mod, "PRESIGN_LEAD_S", 1.5)
    order: list[tuple[str, int, float | None]] = []
    missed: list[str] = []

    async def on_edge(devices: list[str]) -> None:
        order.append(("edge", len(devices), None))

    async def on_presign(devices: list[str], at: float) -> None:
        order.append(("presign", len(devices), at))

    sched = FleetScheduler(
        FleetMetrics(CollectorRegistry()),
        on_edge=on_edge,
        periodic={},
        on_missed=lambda job, devices: missed.append(job),
        on_presign=on_presign,
    )
    sched.start()
    try:
        at = time.time() + 2.5  # its presign job 1.5 s before: at +1.0
        crowd = [f"dev-c{i:03d}" for i in range(scheduler_mod.PRESIGN_MIN_DEVICES)]
        sched.set_edges(dict.fromkeys(crowd, at))
        sched.set_edges({"dev-lone": at + 0.5})  # a lone device's instant: no presign job
        ids = sorted(j["id"].split(":")[0] for j in sched.jobs())
        assert ids == ["edge", "edge", "presign"]
        for _ in range(120):
            if len(order) == 3:
                break
            await asyncio.sleep(0.05)
        instant = next(o[2] for o in order if o[0] == "presign")
        assert instant is not None and at <= instant < at + 0.05
        assert [o[:2] for o in order] == [
            ("presign", len(crowd)),
            ("edge", len(crowd)),
            ("edge", 1),
        ]
        # An instant emptied before its presign job: both jobs go.
        later = time.time() + 60
        sched.set_edges(dict.fromkeys(crowd, later))
        assert len(sched.jobs()) == 2
        sched.set_edges(dict.fromkeys(crowd, None))
        assert sched.jobs() == []
        # A presign job that missed its time is no alert and repairs nothing.
        sched._listen(JobEvent(EVENT_JOB_MISSED, "presign:@123", None))
        assert missed == [] and sched.alerts == []
    finally:
        sched.shutdown()


# --- the service ------------------------------------------------------------------------


def _service(tmp_path: Path, now: list[float]) -> FleetService:
    settings = FleetSettings(
        database_url=f"sqlite:///{tmp_path / 'f.db'}", signing_key_file=tmp_path / "key.pem"
    )
    service = FleetService(settings, registry=CollectorRegistry(), clock=lambda: now[0])
    service.plans.leader = True
    return service


async def test_the_service_signs_a_big_edge_ahead_in_parts_and_its_edge_uses_them(
    tmp_path: Path,
) -> None:
    now = [T0]
    service = _service(tmp_path, now)
    at = T0 + 30
    ids = [f"dev-p{i:05d}" for i in range(RECONCILE_PART + 7)]
    start = datetime.fromtimestamp(at, UTC).strftime("%H:%M:%S")
    with service.ops.session() as s:
        s.add_all(Device(id=d, resident_id=f"res-{d}") for d in ids)
        s.flush()
        s.add_all(Window(device_id=d, start_local=start, duration_s=600, tz="UTC") for d in ids)
    parts: list[int] = []
    presign = service.ops.presign

    def counted(part: list[str], instant: float) -> int:
        parts.append(len(part))
        return presign(part, instant)

    service.ops.presign = counted  # type: ignore[method-assign,assignment]
    published: list[Publish] = []

    async def publish(items: list[Publish]) -> None:
        published.extend(items)

    service.publish = publish  # type: ignore[method-assign]
    try:
        await service._on_presign(ids, at)
        assert parts == [RECONCILE_PART, 7]
        ahead = {k[0]: p.token for k, p in service.ops.ledger._presigned.items()}
        assert len(ahead) == len(ids) and published == []
        now[0] = at + 0.2
        await service._on_edge(ids)
        assert len(published) == len(ids)
        assert {p.topic.split("/")[3]: p.payload.decode() for p in published} == ahead
        assert service.ops.ledger._presigned == {}
        statuses = service.ops.run(lambda s: set(s.exec(select(Command.status))))
        assert statuses == {CommandStatus.PENDING}
    finally:
        service._executor.shutdown(wait=True)
        service.engine.dispose()


async def test_a_failed_presign_is_logged_and_the_edge_signs_for_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = [T0]
    service = _service(tmp_path, now)

    def broken(part: list[str], instant: float) -> int:
        raise RuntimeError("database hiccup")

    service.ops.presign = broken  # type: ignore[method-assign,assignment]
    try:
        await service._on_presign(["dev-x"], T0 + 30)
        assert "signing ahead failed: RuntimeError" in caplog.text
    finally:
        service._executor.shutdown(wait=True)
        service.engine.dispose()
