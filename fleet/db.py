"""Engine creation and schema. SQLite gets WAL and a busy timeout; PostgreSQL is used as it is.

The schema comes from the Alembic migrations (:mod:`fleet.migrate`), never ``create_all``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, MetaData, event
from sqlmodel import SQLModel, create_engine

from . import (  # noqa: F401  (registers the tables)
    accounts,
    auth,
    followup,
    inventory,
    models,
    plan_models,
    sessions,
)

# Every table, once the modules above are imported: what the migrations must produce.
metadata: MetaData = SQLModel.metadata


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            hide_parameters=True,  # errors and logs never carry row values (resident ids)
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, hide_parameters=True)


def init_db(engine: Engine) -> None:
    """Migrate the schema to the newest revision (stamping a pre-migration database first)."""
    from .migrate import upgrade

    upgrade(engine)
