"""fleet.db.new_row makes the same row object as the model's constructor, faster."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import Session, select

from fleet.db import init_db, keep, make_engine, new_row
from fleet.models import Command, CommandKind, CommandStatus, Device

VALUES = {
    "jti": "j-1",
    "device_id": "dev-1",
    "seq": 3,
    "kind": CommandKind.ARM,
    "until": 1_800_000_000,
    "token": "header.claims.signature",
    "created_at": 1.5,
    "expires_at": 61.5,
    "attempts": 1,
    "last_sent_at": 1.5,
}


def test_the_same_object_as_the_constructor() -> None:
    made, built = Command(**VALUES), new_row(Command, **VALUES)
    assert built.model_dump() == made.model_dump()
    assert built.model_fields_set == made.model_fields_set
    assert built.status is CommandStatus.PENDING and built.id is None  # defaults filled
    assert sorted(vars(built)) == sorted(vars(made))


def test_a_missing_or_unknown_field_is_an_error() -> None:
    with pytest.raises(TypeError, match="jti is required"):
        new_row(Command, **{k: v for k, v in VALUES.items() if k != "jti"})
    with pytest.raises(TypeError, match="no field colour"):
        new_row(Command, **VALUES, colour="red")


def test_inserted_and_tracked_like_a_constructed_one(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    init_db(engine)
    with Session(engine) as s:
        s.add(Device(id="dev-1"))
        s.commit()
    with Session(engine, expire_on_commit=False) as s:
        command = new_row(Command, **VALUES)
        s.add(command)
        s.flush()  # inserted: the id comes back
        assert command.id is not None
        command.status = CommandStatus.APPLIED  # a change after the insert is an update
        keep(s, command)  # already there: nothing to add
        s.commit()
    with Session(engine) as s:
        row = s.exec(select(Command)).one()
        assert row.model_dump() == {
            **Command(**VALUES).model_dump(),
            "id": command.id,
            "status": CommandStatus.APPLIED,
        }


def test_defaults_with_a_factory_are_made_per_row() -> None:
    """Immutable defaults are shared (pydantic would hand back the same object); a
    factory runs for every row, as in the constructor."""
    from fleet.models import Window

    a = new_row(Window, device_id="dev-1", start_local="22:00:00", duration_s=600)
    b = new_row(Window, device_id="dev-1", start_local="22:00:00", duration_s=600)
    made = Window(device_id="dev-1", start_local="22:00:00", duration_s=600)
    assert a.model_dump(exclude={"created_at"}) == made.model_dump(exclude={"created_at"})
    assert a.weekdays == "0123456" and a.tz == "Europe/Stockholm" and a.active is True
    assert a.created_at is not b.created_at and a.created_at <= b.created_at
