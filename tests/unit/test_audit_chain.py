"""The audit chain: tamper evidence, the purge checkpoint, and no forks."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from fleet import audit
from fleet.db import init_db, make_engine
from fleet.models import AuditEvent

DAY = 86400.0


@pytest.fixture
def engine(database_url: str):
    engine = make_engine(database_url)
    init_db(engine)
    yield engine
    engine.dispose()


def fill(engine, n: int, start: float = 1_000_000.0, step: float = DAY) -> None:
    with Session(engine) as s:
        for i in range(n):
            audit.append(
                s,
                ts=start + i * step,
                actor=f"nurse-{i % 3}",
                action="look.started",
                subject=f"dev-{i % 4}",
                look_id=f"l{i}",
                resident="res-1",
            )
        s.commit()


def test_intact_chain_verifies(engine) -> None:
    fill(engine, 20)
    with Session(engine) as s:
        report = audit.verify(s)
    assert report.ok and report.entries == 20 and report.head is not None


@pytest.mark.parametrize(
    ("column", "value"),
    [("actor", "'someone-else'"), ("detail", "'{}'"), ("ts", "ts + 60"), ("subject", "NULL")],
)
def test_edited_row_is_found(engine, column: str, value: str) -> None:
    fill(engine, 10)
    with engine.begin() as conn:  # what someone with database access could do
        conn.execute(text(f"UPDATE auditevent SET {column} = {value} WHERE id = 6"))
    with Session(engine) as s:
        report = audit.verify(s)
    assert not report.ok
    assert report.first_broken_id == 6
    assert report.why == "content does not match its hash"


def test_edited_row_with_recomputed_hash_breaks_the_next_link(engine) -> None:
    fill(engine, 10)
    with Session(engine) as s:
        row = s.get(AuditEvent, 4)
        assert row is not None
        row.actor = "forger"
        row.hash = audit._digest(
            row.prev_hash, row.ts, row.actor, row.action, row.subject, row.detail
        )
        s.add(row)
        s.commit()
        report = audit.verify(s)
    assert report.first_broken_id == 5
    assert report.why == "prev_hash does not match the entry before"


def test_deleted_row_is_found(engine) -> None:
    fill(engine, 10)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM auditevent WHERE id = 3"))
    with Session(engine) as s:
        assert audit.verify(s).first_broken_id == 4


def test_purge_keeps_the_chain_verifiable_through_a_checkpoint(engine) -> None:
    fill(engine, 30)  # one entry a day from day 0
    cutoff = 1_000_000.0 + 10 * DAY
    with Session(engine) as s:
        result = audit.purge_before(s, before_ts=cutoff, now=1_000_000.0 + 40 * DAY, actor="cli")
        s.commit()
        assert result.count == 10 and result.through_id == 10
        rows = s.exec(select(AuditEvent).order_by(AuditEvent.id)).all()
        assert rows[0].id == 11 and all(r.ts >= cutoff for r in rows)
        assert rows[-1].action == audit.PURGED
        report = audit.verify(s)
        assert report.ok, report
        assert report.entries == 21
        # A second purge anchors at its own checkpoint.
        audit.purge_before(s, before_ts=cutoff + 5 * DAY, now=1_000_000.0 + 41 * DAY, actor="cli")
        s.commit()
        assert audit.verify(s).ok


def test_deleting_the_oldest_entries_after_a_purge_is_found(engine) -> None:
    fill(engine, 20)
    with Session(engine) as s:
        audit.purge_before(s, before_ts=1_000_000.0 + 5 * DAY, now=2_000_000.0, actor="cli")
        s.commit()
    with engine.begin() as conn:  # quietly "purge" two more without a checkpoint
        conn.execute(text("DELETE FROM auditevent WHERE id IN (6, 7)"))
    with Session(engine) as s:
        report = audit.verify(s)
    assert report.first_broken_id == 8
    assert report.why is not None and "purge checkpoint" in report.why


def test_purge_only_removes_a_prefix(engine) -> None:
    fill(engine, 5)
    fill(engine, 1, start=900_000.0)  # an old timestamp written late (another writer's clock)
    fill(engine, 5, start=1_000_000.0 + 10 * DAY)
    with Session(engine) as s:
        result = audit.purge_before(s, before_ts=1_000_000.0 + 8 * DAY, now=3e6, actor="cli")
        s.commit()
        assert result.count == 6  # entries 1..6; nothing after the first newer one
        assert audit.verify(s).ok


def test_purge_refuses_a_broken_chain(engine) -> None:
    fill(engine, 5)
    with engine.begin() as conn:
        conn.execute(text("UPDATE auditevent SET actor = 'x' WHERE id = 2"))
    with Session(engine) as s, pytest.raises(ValueError, match="broken at entry 2"):
        audit.purge_before(s, before_ts=2e6, now=3e6, actor="cli")


def test_two_writers_cannot_fork_the_chain(engine) -> None:
    fill(engine, 2)
    with Session(engine) as a, Session(engine) as b:
        audit.append(a, ts=1.0, actor="a", action="x")
        a.commit()
        # b read the same head before a committed: simulate by appending with a stale prev.
        last = b.exec(select(AuditEvent).where(AuditEvent.id == 2)).one()
        b.add(
            AuditEvent(
                ts=2.0, actor="b", action="y", detail="{}", prev_hash=last.hash, hash="f" * 64
            )
        )
        with pytest.raises(IntegrityError):
            b.commit()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_concurrent_appends_wait_for_the_head_instead_of_failing(engine) -> None:
    # PostgreSQL: a second writer (another replica) waits on the head lock, then continues
    # the chain from the first writer's entry.
    fill(engine, 1)
    done: list[BaseException | None] = []
    with Session(engine) as a:
        audit.append(a, ts=1.0, actor="a", action="x")  # holds the head until commit

        def writer_b() -> None:
            try:
                with Session(engine) as b:
                    audit.append(b, ts=2.0, actor="b", action="y")
                    b.commit()
                done.append(None)
            except BaseException as exc:
                done.append(exc)

        thread = threading.Thread(target=writer_b)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), "b did not wait for a's head"
        a.commit()
        thread.join(10)
    assert done == [None]
    with Session(engine) as s:
        report = audit.verify(s)
        assert report.ok and report.entries == 3


def test_the_prebuilt_encoders_write_what_json_dumps_wrote() -> None:
    """Entries written before the encoders were prebuilt must still verify: the detail
    text and the hashed body are byte for byte what ``json.dumps`` made of them."""
    import enum
    import hashlib
    import json
    from datetime import UTC, datetime

    class Kind(enum.StrEnum):
        ARM = "arm"

    details = [
        {},
        {"b": 1, "a": None, "c": [1.5, True, "x"]},
        {"kind": Kind.ARM, "at": datetime(2027, 1, 11, 22, tzinfo=UTC), "n": 10**20},
        {"name": "Åsa \u00e4\u2603", "f": 1e16, "g": 0.1 + 0.2, "nested": {"z": 1, "y": [None]}},
    ]
    for d in details:
        old = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
        assert audit.detail_text(d) == old
        body = json.dumps(
            ["0" * 64, round(1799.1234567, 6), "a", "b", None, old], separators=(",", ":")
        )
        digest = hashlib.sha256(body.encode()).hexdigest()
        assert audit._digest("0" * 64, 1799.1234567, "a", "b", None, old) == digest
