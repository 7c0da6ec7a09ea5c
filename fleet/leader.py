"""Exactly one active scheduler: a lock in (or next to) the database.

- SQLite: an OS file lock (``flock`` through filelock) on ``<database>.scheduler.lock``,
  held by the process for its lifetime; the kernel drops it when the process dies, however
  it dies, so a killed leader never leaves a stale lock behind.
- PostgreSQL: ``pg_try_advisory_lock`` on a dedicated connection held for the process
  lifetime; the server drops it when that session ends (process death, network loss).
- An in-memory SQLite database cannot be shared, so it is always its own leader.

Every replica runs ingest and the API; only the lock holder runs the scheduler's jobs.
A standby retries the lock every ``scheduler_lock_retry_s`` and takes over when the
leader is gone; a leader that finds its PostgreSQL session gone steps down at once.
All methods block briefly: call them on the database thread.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import filelock
from sqlalchemy import Connection, Engine, text

log = logging.getLogger(__name__)

# pg advisory lock key: b"tillsyn" as a number, so it is recognisable in pg_locks.
ADVISORY_KEY = int.from_bytes(b"tillsyn", "big")


class SchedulerLock(Protocol):
    where: str

    def try_acquire(self) -> bool:
        """Take the lock if free; True if this process holds it (now or already)."""
        ...

    def still_held(self) -> bool: ...

    def release(self) -> None: ...


class FileSchedulerLock:
    def __init__(self, path: Path) -> None:
        self.where = str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = filelock.FileLock(path, thread_local=False, blocking=False)

    def try_acquire(self) -> bool:
        if self._lock.is_locked:
            return True
        try:
            self._lock.acquire()
        except filelock.Timeout:
            return False
        return True

    def still_held(self) -> bool:
        return bool(self._lock.is_locked)

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release(force=True)


class PgAdvisoryLock:
    def __init__(self, engine: Engine) -> None:
        url = engine.url
        self.where = (
            f"postgresql advisory lock {ADVISORY_KEY} on {url.host}:{url.port}/{url.database}"
        )
        self._engine = engine
        self._conn: Connection | None = None

    def try_acquire(self) -> bool:
        if self._conn is not None:
            return self.still_held()
        conn = self._engine.connect()
        try:
            got = bool(
                conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": ADVISORY_KEY}).scalar()
            )
            conn.commit()
        except Exception:
            conn.close()
            raise
        if got:
            self._conn = conn  # kept checked out: the lock lives as long as this session
        else:
            conn.close()
        return got

    def still_held(self) -> bool:
        conn = self._conn
        if conn is None:
            return False
        try:
            held = conn.execute(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                    " AND pid = pg_backend_pid() AND objid = :lo AND classid = :hi AND granted"
                ),
                {"lo": ADVISORY_KEY & 0xFFFFFFFF, "hi": ADVISORY_KEY >> 32},
            ).scalar()
            conn.commit()
        except Exception as exc:  # session gone: so is the lock
            log.error("scheduler lock connection lost: %s", type(exc).__name__)
            self._drop()
            return False
        if not held:
            self._drop()
        return bool(held)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()
                conn.close()
            except Exception as exc:  # already broken; nothing more to do
                log.debug("closing lost lock connection: %s", type(exc).__name__)

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_KEY})
            conn.commit()
        finally:
            conn.close()


class AlwaysLeader:
    where = "in-memory database"

    def try_acquire(self) -> bool:
        return True

    def still_held(self) -> bool:
        return True

    def release(self) -> None:
        return None


def lock_for(database_url: str, engine: Engine) -> SchedulerLock:
    if database_url.startswith("sqlite:///"):
        path = database_url.removeprefix("sqlite:///")
        if path in (":memory:", ""):
            return AlwaysLeader()
        db = Path(path)
        return FileSchedulerLock(db.with_name(db.name + ".scheduler.lock"))
    if engine.dialect.name == "postgresql":
        return PgAdvisoryLock(engine)
    raise ValueError(f"no scheduler lock for database dialect {engine.dialect.name}")
