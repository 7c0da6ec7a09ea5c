"""The scheduler lock: one holder at a time, on SQLite (file lock) and PostgreSQL (advisory
lock), and a holder that dies hands over to a standby."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from fleet.leader import AlwaysLeader, FileSchedulerLock, PgAdvisoryLock, lock_for


def test_file_lock_one_holder_then_failover(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db.scheduler.lock"
    a, b = FileSchedulerLock(path), FileSchedulerLock(path)
    assert a.try_acquire() and a.still_held()
    assert not b.try_acquire() and not b.still_held()
    assert a.try_acquire()  # re-entrant for its holder
    a.release()
    assert b.try_acquire()


def test_file_lock_is_dropped_when_the_holder_process_dies(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    code = (
        "import sys, time; from fleet.leader import FileSchedulerLock;"
        f"l = FileSchedulerLock(__import__('pathlib').Path({str(path)!r}));"
        "assert l.try_acquire(); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
        standby = FileSchedulerLock(path)
        assert not standby.try_acquire()
        proc.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        proc.wait(10)
        assert standby.try_acquire()
    finally:
        proc.kill()
        proc.wait(10)


def test_lock_for_picks_the_backend(tmp_path: Path) -> None:
    engine = create_engine("sqlite://")
    assert isinstance(lock_for("sqlite:///:memory:", engine), AlwaysLeader)
    lock = lock_for(f"sqlite:///{tmp_path / 'f.db'}", engine)
    assert isinstance(lock, FileSchedulerLock) and lock.where.endswith("f.db.scheduler.lock")


@pytest.fixture
def pg(database_url: str):
    engine = create_engine(database_url, pool_pre_ping=True)
    yield engine
    engine.dispose()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_postgres_advisory_lock_one_holder_then_failover(pg, database_url: str) -> None:
    other = create_engine(database_url)
    a, b = PgAdvisoryLock(pg), PgAdvisoryLock(other)
    try:
        assert a.try_acquire() and a.still_held()
        assert not b.try_acquire()
        # The holder's session dies (killed from outside, as a lost connection would be).
        with other.connect() as admin:
            admin.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks"
                    " WHERE locktype = 'advisory' AND objid = :lo AND pid <> pg_backend_pid()"
                    "   AND database = (SELECT oid FROM pg_database"
                    "                   WHERE datname = current_database())"
                ),
                {"lo": int.from_bytes(b"tillsyn", "big") & 0xFFFFFFFF},
            )
        assert not a.still_held()  # the leader notices and steps down
        assert b.try_acquire() and b.still_held()
    finally:
        a.release()
        b.release()
        other.dispose()
