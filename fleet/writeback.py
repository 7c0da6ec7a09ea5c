"""Column changes of loaded rows, written together by Core at the end of a batch.

The ORM's unit of work costs about 40 us per changed object at a flush (history per
attribute, grouping, bookkeeping): at a window start that is 10,000 devices' ``next_seq``
at the edge and 10,000 devices and commands again at the acks, a fifth of the database
thread. Inside :func:`batch`, :func:`assign` sets values without history (the object reads
as changed; the session has nothing of it to flush) and notes which columns of which
object changed; the batch's end writes each object's *current* values of those columns,
one ``executemany`` per table and set of columns. Current, not the values assigned: an
ordinary ORM assignment of the same column in the same batch is then written by both
with the same value, whichever runs first. Outside a batch, and for objects not loaded
from the database, :func:`assign` is ``setattr``.

A batch that fails expires the objects it changed: their values in memory were never
written, and a savepoint's rollback expires only what the ORM flushed itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Column, Table, bindparam, inspect, update
from sqlalchemy.orm.base import instance_state
from sqlmodel import Session, SQLModel

from .db import deferred
from .errors import LostRow

_KEY = "tillsyn.writeback"


class _Buffer:
    def __init__(self) -> None:
        self.columns: dict[int, tuple[SQLModel, set[str]]] = {}  # by id(object)

    def note(self, obj: SQLModel, names: Iterable[str]) -> None:
        entry = self.columns.get(id(obj))
        if entry is None:
            self.columns[id(obj)] = (obj, set(names))
        else:
            entry[1].update(names)


def assign(session: Session, obj: SQLModel, **values: Any) -> None:
    """``setattr`` for each value; inside a batch, for a loaded object, written at its end."""
    buffer: _Buffer | None = session.info.get(_KEY)
    state = instance_state(obj)
    if buffer is None or not state.persistent:
        for name, value in values.items():
            setattr(obj, name, value)
        return
    # What ``set_committed_value`` does for a column, once for all of them: it looked up
    # each attribute's implementation and committed key by key, 40,000 times at a window
    # start (a third of this function's cost; the columns here are all scalar).
    state.dict.update(values)
    state._commit(state.dict, values.keys())
    buffer.note(obj, values.keys())


@contextmanager
def batch(session: Session) -> Iterator[None]:
    """Assignments in this block are written at its end (nested: at the outermost end)."""
    with deferred(session, _KEY, _Buffer, _write, _expire):
        yield


def _expire(session: Session, buffer: _Buffer) -> None:
    for obj, _ in buffer.columns.values():
        if inspect(obj).persistent:  # (one deleted meanwhile is no longer)
            session.expire(obj)


@contextmanager
def savepoint(session: Session) -> Iterator[None]:
    """``session.begin_nested()`` whose assignments are written before its release. Never
    inside a batch: the outer batch would write what this savepoint's rollback undid."""
    if _KEY in session.info:
        raise RuntimeError("writeback.savepoint inside a write-back batch")
    with session.begin_nested(), batch(session):
        yield


def _write(session: Session, buffer: _Buffer) -> None:
    groups: dict[tuple[Table, Column[Any], tuple[str, ...]], list[dict[str, Any]]] = {}
    for obj, names in buffer.columns.values():
        table: Table = obj.__table__  # type: ignore[attr-defined]
        (pk,) = table.primary_key.columns
        cols = tuple(sorted(names))
        row = {name: obj.__dict__[name] for name in cols}
        row["pk_"] = obj.__dict__[pk.name]
        groups.setdefault((table, pk, cols), []).append(row)
    for (table, pk, cols), rows in groups.items():
        stmt = (
            update(table)
            .where(pk == bindparam("pk_"))
            .values({name: bindparam(name) for name in cols})
        )
        conn = session.connection()
        result = conn.execute(stmt, rows)
        counted = conn.dialect.supports_sane_multi_rowcount and result.rowcount != -1
        if counted and result.rowcount != len(rows):  # (the unit of work checks the same)
            raise LostRow(f"{table.name}: {len(rows)} rows changed, {result.rowcount} written")
