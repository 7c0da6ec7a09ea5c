"""Engine creation and schema. SQLite gets WAL and a busy timeout; PostgreSQL is used as it is.

The schema comes from the Alembic migrations (:mod:`fleet.migrate`), never ``create_all``.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pydantic.fields import FieldInfo
from sqlalchemy import Engine, MetaData, event
from sqlmodel import Session, SQLModel, create_engine

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

M = TypeVar("M", bound=SQLModel)
B = TypeVar("B")


_REQUIRED = object()
_CONSTANT = (type(None), bool, int, float, str, bytes, enum.Enum)


@functools.cache
def _defaults(cls: type[SQLModel]) -> tuple[tuple[str, Any], ...]:
    """Each field with its default: the value itself when immutable (shared, as pydantic's
    copy would return it anyway), else the field (its factory or copy made per row)."""
    out: list[tuple[str, Any]] = []
    for name, field in cls.model_fields.items():
        if field.is_required():
            out.append((name, _REQUIRED))
        elif field.default_factory is None and isinstance(field.default, _CONSTANT):
            out.append((name, field.default))
        else:
            out.append((name, field))
    return tuple(out)


def new_row(cls: type[M], **values: Any) -> M:
    """A new row object, as ``cls(**values)`` makes it (defaults filled, nothing
    validated: table models never validate; a missing required field or an unknown one
    is a TypeError here), for rows made by the thousand.

    SQLModel's constructor sets every field through the instrumented ``__setattr__``
    (SQLAlchemy's attribute events, then pydantic's): about 40 us per command, 7 % of the
    fleet's CPU in a 10,000-device window storm. A new object has no history to record,
    so the values go into its ``__dict__``, as SQLAlchemy itself fills the objects it
    loads (a pending object's INSERT reads them from there); SQLAlchemy creates the
    instance state and SQLModel its pydantic attributes (``__new__``). Changes after this
    are tracked as usual. ``tests/unit/test_new_row.py`` holds it to the constructor."""
    obj: M = cls._sa_class_manager.new_instance()  # type: ignore[attr-defined]
    given = set(values)
    fields = obj.__dict__
    for name, default in _defaults(cls):
        if name in values:
            fields[name] = values.pop(name)
        elif default is _REQUIRED:
            raise TypeError(f"{cls.__name__}: {name} is required")
        elif isinstance(default, FieldInfo):
            fields[name] = default.get_default(call_default_factory=True)
        else:
            fields[name] = default
    if values:
        raise TypeError(f"{cls.__name__}: no field {', '.join(sorted(values))}")
    object.__setattr__(obj, "__pydantic_fields_set__", given)
    return obj


def keep(session: Session, obj: SQLModel) -> None:
    """``session.add`` for an object that is usually in the session already: the check
    is 0.25 us, the add's cascade walk over every column 3 us and up (~5 % of the fleet's
    CPU in a window storm, at two adds per message)."""
    if obj not in session:
        session.add(obj)


@contextmanager
def deferred(
    session: Session,
    key: str,
    make: Callable[[], B],
    write: Callable[[Session, B], None],
    failed: Callable[[Session, B], None] | None = None,
) -> Iterator[None]:
    """A buffer of writes kept in ``session.info[key]`` for this block and written by
    ``write`` at its end, in the caller's transaction; nested blocks share the outermost
    one's buffer. On error nothing is written (the transaction is rolled back then anyway)
    and ``failed`` may undo what the buffer did to objects in memory."""
    if key in session.info:  # already deferring: the outer block writes
        yield
        return
    buffer = make()
    session.info[key] = buffer
    try:
        yield
        del session.info[key]
        write(session, buffer)
    except BaseException:
        if failed is not None:
            failed(session, buffer)
        raise
    finally:
        session.info.pop(key, None)


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
