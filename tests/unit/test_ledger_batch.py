"""Commands issued in a batch (fleet.commands.batched) are inserted by Core at its end:
the same rows as the ORM's, in the same transaction, and none when the batch fails."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, col, select

from fleet.commands import batched
from fleet.core import FleetOps
from fleet.models import Command, CommandStatus, Device, Window
from tests.unit.fleet_sim import T0, new_ops
from tillsyn_protocol import CommandKind

IDS = ("dev-aa", "dev-bb")


@pytest.fixture
def ops(tmp_path: Path) -> FleetOps:
    ops = new_ops(tmp_path, tmp_path / "key.pem")
    with ops.session() as s:
        for d in IDS:
            s.add(Device(id=d, resident_id=f"res-{d}"))
    return ops


def _issue(ops: FleetOps, s: Session, device_id: str, kind: CommandKind, **kw: Any) -> None:
    device = s.get(Device, device_id)
    assert device is not None
    pending = list(ops.ledger.pending(s, device_id))
    ops.ledger.issue(s, device, kind, now=T0, pending=pending, **kw)


def _rows(ops: FleetOps, device_id: str) -> list[dict[str, Any]]:
    def read(s: Session) -> list[dict[str, Any]]:
        stmt = select(Command).where(Command.device_id == device_id).order_by(col(Command.seq))
        return [c.model_dump(exclude={"id", "jti", "token", "device_id"}) for c in s.exec(stmt)]

    return ops.run(read)


def test_the_same_rows_as_the_orm_inserts(ops: FleetOps) -> None:
    with ops.session() as s:
        _issue(ops, s, "dev-aa", CommandKind.ARM, until=int(T0 + 600))  # the ORM's path
        _issue(ops, s, "dev-aa", CommandKind.DISARM)
    with ops.session() as s, batched(s):
        _issue(ops, s, "dev-bb", CommandKind.ARM, until=int(T0 + 600))
        assert s.exec(select(Command).where(Command.device_id == "dev-bb")).first() is None
        _issue(ops, s, "dev-bb", CommandKind.DISARM)
    orm, core = _rows(ops, "dev-aa"), _rows(ops, "dev-bb")
    assert core == orm
    # A command issued and superseded in the same batch is inserted as superseded.
    assert [r["status"] for r in core] == [CommandStatus.SUPERSEDED, CommandStatus.PENDING]
    tokens = ops.run(lambda s: s.exec(select(Command.token, Command.jti)).all())
    assert len({t for t, _ in tokens}) == 4 and len({j for _, j in tokens}) == 4


def test_a_failed_batch_inserts_nothing(ops: FleetOps) -> None:
    with pytest.raises(RuntimeError), ops.session() as s, batched(s):
        _issue(ops, s, "dev-aa", CommandKind.ARM, until=int(T0 + 600))
        raise RuntimeError("the pass failed")
    assert ops.run(lambda s: s.exec(select(Command)).all()) == []
    device = ops.run(lambda s: s.get(Device, "dev-aa"))
    assert device is not None and device.next_seq == 1


def test_nested_batches_insert_once_at_the_outer_end(ops: FleetOps) -> None:
    with ops.session() as s, batched(s):
        with batched(s):
            _issue(ops, s, "dev-aa", CommandKind.ARM, until=int(T0 + 600))
        assert s.exec(select(Command)).first() is None
    assert len(_rows(ops, "dev-aa")) == 1


def test_a_reconcile_pass_inserts_its_arms(ops: FleetOps) -> None:
    with ops.session() as s:
        for d in IDS:
            start = datetime.fromtimestamp(T0, UTC).strftime("%H:%M:%S")
            s.add(Window(device_id=d, start_local=start, duration_s=1800, tz="UTC"))
    out = ops.reconcile(list(IDS), T0)
    assert sorted(p.topic for p in out.publish) == [f"tillsyn/v1/dev/{d}/cmd" for d in IDS]
    for d in IDS:
        (row,) = _rows(ops, d)
        assert row["kind"] is CommandKind.ARM and row["status"] is CommandStatus.PENDING
    # The next pass finds them pending and issues nothing.
    assert ops.reconcile(list(IDS), T0 + 1).publish == []
