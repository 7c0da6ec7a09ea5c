"""fleet.writeback: assignments in a batch are written by Core at its end, as the ORM would
have written them; a failed batch leaves nothing in the database and nothing stale in memory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, delete, inspect
from sqlmodel import Session, col, select

from fleet import snapshot, writeback
from fleet.batch import begin
from fleet.db import make_engine
from fleet.errors import LostRow
from fleet.models import Command, CommandStatus, Device
from tillsyn_protocol import CommandKind, LockState


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    with Session(engine) as s:
        s.add(Device(id="dev-aa"))
        s.add(Device(id="dev-bb"))
        s.commit()
        s.add(
            Command(
                jti="j1",
                device_id="dev-aa",
                seq=1,
                kind=CommandKind.ARM,
                token="t",
                created_at=1.0,
                expires_at=2.0,
            )
        )
        s.commit()
    yield engine
    engine.dispose()


def _device(engine: Engine, device_id: str) -> Device:
    with Session(engine) as s:
        device = s.get(Device, device_id)
        assert device is not None
        return device


def test_written_at_the_end_of_the_batch_not_by_the_orm(engine: Engine) -> None:
    with Session(engine, expire_on_commit=False) as s:
        device = s.get(Device, "dev-aa")
        command = s.exec(select(Command)).one()
        assert device is not None
        with writeback.batch(s):
            writeback.assign(s, device, reported_state=LockState.ARMED, next_seq=7)
            writeback.assign(s, command, status=CommandStatus.APPLIED, acked_at=5.0)
            writeback.assign(s, device, reported_at=3.0)
            assert device.next_seq == 7 and device.reported_state is LockState.ARMED
            assert not s.dirty  # nothing for the unit of work
            assert _device(engine, "dev-aa").next_seq == 1  # not written yet
        s.commit()
    written = _device(engine, "dev-aa")
    assert (written.reported_state, written.next_seq, written.reported_at) == (
        LockState.ARMED,
        7,
        3.0,
    )
    assert _device(engine, "dev-bb").next_seq == 1  # only the changed row
    with Session(engine) as s:
        row = s.exec(select(Command)).one()
        assert (row.status, row.acked_at) == (CommandStatus.APPLIED, 5.0)


def test_outside_a_batch_it_is_setattr(engine: Engine) -> None:
    with Session(engine) as s:
        device = s.get(Device, "dev-aa")
        assert device is not None
        writeback.assign(s, device, next_seq=4)
        assert device in s.dirty
        s.commit()
    assert _device(engine, "dev-aa").next_seq == 4


@pytest.mark.parametrize("orm_first", [True, False])
def test_an_orm_assignment_of_the_same_column_ends_with_the_last_value(
    engine: Engine, orm_first: bool
) -> None:
    with Session(engine) as s:
        device = s.get(Device, "dev-aa")
        assert device is not None
        with writeback.batch(s):
            if orm_first:
                device.next_seq = 5
                s.flush()
                writeback.assign(s, device, next_seq=6)
            else:
                writeback.assign(s, device, next_seq=5)
                device.next_seq = 6
                s.flush()  # the ORM writes 6 before the batch writes its current value
        s.commit()
    assert _device(engine, "dev-aa").next_seq == 6


def test_a_failed_batch_writes_nothing_and_forgets_what_it_assigned(engine: Engine) -> None:
    with Session(engine, expire_on_commit=False) as s:
        device = s.get(Device, "dev-aa")
        assert device is not None
        with pytest.raises(RuntimeError), writeback.savepoint(s):
            writeback.assign(s, device, next_seq=9, reported_state=LockState.ARMED)
            raise RuntimeError("a message failed")
        assert device.next_seq == 1  # expired: read again from the database
        assert device.reported_state is LockState.LOCKED
        s.commit()
    assert _device(engine, "dev-aa").next_seq == 1


def test_a_savepoint_writes_before_its_release(engine: Engine) -> None:
    with Session(engine) as s:
        device = s.get(Device, "dev-aa")
        assert device is not None
        begin(s)  # (pysqlite: else the savepoint is the transaction, its release a commit)
        with writeback.savepoint(s):
            writeback.assign(s, device, next_seq=3)
        # Written inside the outer transaction: visible to its own queries.
        assert s.exec(select(Device.next_seq).where(Device.id == "dev-aa")).one() == 3
        s.rollback()
    assert _device(engine, "dev-aa").next_seq == 1


def test_objects_not_loaded_are_assigned_as_usual(engine: Engine) -> None:
    with Session(engine) as s:
        with writeback.batch(s):
            new = Device(id="dev-new")
            s.add(new)
            writeback.assign(s, new, next_seq=2)
            assert new in s.new
        s.commit()
    assert _device(engine, "dev-new").next_seq == 2


def test_a_row_gone_before_the_write_is_an_error(engine: Engine) -> None:
    with Session(engine) as s:
        device = s.get(Device, "dev-bb")
        assert device is not None
        with (
            pytest.raises(LostRow, match="device: 1 rows changed, 0 written"),
            writeback.batch(s),
        ):
            writeback.assign(s, device, next_seq=2)
            s.execute(delete(Device).where(Device.id == "dev-bb"))  # type: ignore[arg-type]


def test_rows_with_the_same_columns_are_written_together(engine: Engine) -> None:
    with Session(engine) as s:
        devices = s.exec(select(Device).order_by(col(Device.id))).all()
        with writeback.batch(s):
            for i, device in enumerate(devices):
                writeback.assign(s, device, next_seq=10 + i)
        s.commit()
    assert [_device(engine, d).next_seq for d in ("dev-aa", "dev-bb")] == [10, 11]


def test_one_of_several_rows_gone_is_an_error(engine: Engine) -> None:
    with Session(engine) as s:
        devices = s.exec(select(Device).order_by(col(Device.id))).all()
        with (
            pytest.raises(LostRow, match="device: 2 rows changed, 1 written"),
            writeback.batch(s),
        ):
            for device in devices:
                writeback.assign(s, device, next_seq=2)
            s.execute(delete(Device).where(Device.id == "dev-bb"))  # type: ignore[arg-type]


def test_a_savepoint_inside_a_batch_is_refused(engine: Engine) -> None:
    with (
        Session(engine) as s,
        writeback.batch(s),
        pytest.raises(RuntimeError, match="inside a write-back batch"),
        writeback.savepoint(s),
    ):
        pass


def test_an_unflushed_orm_change_of_the_same_column_gives_way_and_others_stay(
    engine: Engine,
) -> None:
    """The batch takes a column over from the unit of work (the assigned value is written,
    once); the ORM still writes the object's other changed columns."""
    with Session(engine) as s:
        device = s.get(Device, "dev-aa")
        assert device is not None
        with writeback.batch(s):
            device.next_seq = 5  # not flushed
            device.firmware = "2.0"
            writeback.assign(s, device, next_seq=6)
        s.commit()
    written = _device(engine, "dev-aa")
    assert (written.next_seq, written.firmware) == (6, "2.0")


def test_an_expired_or_deferred_column_is_assigned_without_a_load(engine: Engine) -> None:
    with Session(engine, expire_on_commit=False) as s:
        device = s.exec(snapshot.devices().where(Device.id == "dev-aa")).one()
        s.expire(device, ["next_seq"])
        with writeback.batch(s):
            writeback.assign(s, device, next_seq=8)
            assert "next_seq" not in inspect(device).expired_attributes
            assert device.next_seq == 8  # read from memory, not loaded over
        assert device.created_at is not None  # deferred: loaded on first access
        s.commit()
    assert _device(engine, "dev-aa").next_seq == 8
