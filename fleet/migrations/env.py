"""Alembic environment. :mod:`fleet.migrate` passes the connection in ``attributes``."""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import Connection, Enum
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

from fleet.db import metadata


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Render the models' types as the plain columns they are, so revisions need no sqlmodel."""
    if type_ != "type":
        return False
    if isinstance(obj, AutoString):
        length = getattr(obj.impl, "length", None)
        return f"sa.String(length={length})" if length else "sa.String()"
    if isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    if isinstance(obj, Enum) and not obj.native_enum:  # VARCHAR: new members need no migration
        return f"sa.String(length={obj.length})"
    return False


def run() -> None:
    conn: Connection = context.config.attributes["connection"]
    context.configure(
        connection=conn,
        target_metadata=metadata,
        # SQLite cannot ALTER most things: batch mode copies the table instead.
        render_as_batch=conn.dialect.name == "sqlite",
        compare_type=True,
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


run()
