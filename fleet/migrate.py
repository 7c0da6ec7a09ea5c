"""Schema migrations: Alembic, run from code (no alembic.ini at runtime).

The scripts ship inside the package (``fleet/migrations``). :func:`upgrade` is what
:func:`fleet.db.init_db` runs at every start and ``tillsyn db upgrade`` runs on demand:

- A database made by the old ``create_all`` (tables, no ``alembic_version``) is stamped at
  the baseline, whose schema is exactly what ``create_all`` made, then upgraded.
- Two processes starting at once migrate one after the other: PostgreSQL takes an advisory
  lock on the migrating connection, an SQLite file a lock file beside it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from filelock import FileLock
from sqlalchemy import Connection, Engine, inspect, text

from .errors import SchemaError

log = logging.getLogger(__name__)

SCRIPTS = Path(__file__).with_name("migrations")
BASELINE = "0001"  # the schema of the last create_all release
# Not the scheduler's key (fleet/leader.py): b"tillmig" as a number, visible in pg_locks.
LOCK_KEY = int.from_bytes(b"tillmig", "big")


def _config(conn: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS))
    # r0001_baseline.py: a valid module name (mypy checks the revisions too).
    cfg.set_main_option("file_template", "r%%(rev)s_%%(slug)s")
    cfg.attributes["connection"] = conn
    return cfg


def head() -> str:
    rev = ScriptDirectory.from_config(_config()).get_current_head()
    assert rev is not None
    return rev


@contextmanager
def _locked(engine: Engine) -> Iterator[Connection]:
    """A connection no other migrating process runs beside."""
    db = engine.url.database or ""
    if engine.dialect.name == "sqlite" and db not in ("", ":memory:"):
        with FileLock(f"{db}.migrate.lock"), engine.connect() as conn:
            yield conn
        return
    with engine.connect() as conn:
        if engine.dialect.name != "postgresql":
            yield conn
            return
        # Session-level lock: held across alembic's own transactions, waits for the other.
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": LOCK_KEY})
        conn.commit()
        try:
            yield conn
        finally:
            conn.rollback()
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
            conn.commit()


def _current(conn: Connection) -> str | None:
    rev = MigrationContext.configure(conn).get_current_revision()
    conn.rollback()  # alembic must find the connection outside a transaction
    return rev


def _is_legacy(conn: Connection) -> bool:
    from .db import metadata

    tables = set(inspect(conn).get_table_names())
    conn.rollback()
    return "alembic_version" not in tables and bool(tables & set(metadata.tables))


def _run(engine: Engine, action: str, revision: str) -> str | None:
    with _locked(engine) as conn:
        cfg = _config(conn)
        legacy = _is_legacy(conn)
        try:
            if legacy:
                command.stamp(cfg, BASELINE)
                log.warning("database made before migrations: stamped at baseline %s", BASELINE)
            if action == "upgrade":
                command.upgrade(cfg, revision)
            else:
                command.downgrade(cfg, revision)
        except CommandError as exc:  # e.g. a revision only newer code knows
            raise SchemaError(str(exc)) from None
        conn.commit()
        if legacy and (diffs := _differences(conn)):
            # Made by an older create_all (it never altered tables): say so, do not guess.
            log.warning(
                "schema differs from the models (%d differences): see tillsyn db check", len(diffs)
            )
        return _current(conn)


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Bring the schema to ``revision`` (default: the newest); returns where it is now."""
    return _run(engine, "upgrade", revision)


def downgrade(engine: Engine, revision: str) -> str | None:
    """Take the schema back to ``revision`` (``base``: nothing). Loses the data it drops."""
    return _run(engine, "downgrade", revision)


def current(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return _current(conn)


def differences(engine: Engine) -> list[Any]:
    """What the database schema lacks or has beyond the models (empty: they match)."""
    with engine.connect() as conn:
        return _differences(conn)


def _differences(conn: Connection) -> list[Any]:
    from .db import metadata

    ctx = MigrationContext.configure(conn, opts={"compare_type": True})
    diffs = list(compare_metadata(ctx, metadata))
    conn.rollback()
    return diffs


def revision(engine: Engine, message: str) -> None:
    """Developers: write a new revision from the models' difference to ``engine`` (at head)."""
    with engine.connect() as conn:
        command.revision(
            _config(conn), message=message, autogenerate=True, rev_id=f"{int(head()) + 1:04d}"
        )
