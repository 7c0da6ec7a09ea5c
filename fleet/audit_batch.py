"""Audit entries of a batch, chained and written together before the transaction commits.

``audit.append`` reads the chain's head and flushes once per entry (and with it every
change made before it): about 1 ms on SQLite, which for 10,000 arms at one window start
is most of the pass. Inside :func:`buffered`, the entries that the ledger and the ingest
write through :func:`append` are kept in order and written in one ``executemany`` at the
end, chained from the head read once. Entries appended directly meanwhile (a visit raised
in the same pass) are written first; every entry of a batch has the same ``ts``, and the
chain (``audit.verify``) is the same kind of chain.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert
from sqlmodel import Session, col, select

from . import audit
from .db import deferred
from .models import AuditEvent

_KEY = "tillsyn.audit_buffer"


@dataclass(frozen=True, slots=True)
class _Entry:
    ts: float
    actor: str
    action: str
    subject: str | None
    detail: str


def append(
    session: Session,
    *,
    ts: float,
    actor: str,
    action: str,
    subject: str | None = None,
    **detail: Any,
) -> None:
    """``audit.append``, deferred to the end of the batch when one is open on the session."""
    buffer: list[_Entry] | None = session.info.get(_KEY)
    if buffer is None:
        audit.append(session, ts=ts, actor=actor, action=action, subject=subject, **detail)
        return
    # The same text as audit.append hashes and stores.
    text = audit.detail_text(detail)
    buffer.append(_Entry(ts, actor, action, subject, text))


def mark(session: Session) -> int:
    """Where the open batch is (to drop what a failed message added, see :func:`drop_after`)."""
    buffer: list[_Entry] | None = session.info.get(_KEY)
    return 0 if buffer is None else len(buffer)


def drop_after(session: Session, mark: int) -> None:
    buffer: list[_Entry] | None = session.info.get(_KEY)
    if buffer is not None:
        del buffer[mark:]


@contextmanager
def buffered(session: Session) -> Iterator[None]:
    """Defer :func:`append` entries of this block and write them at its end (not on error:
    the transaction is rolled back then anyway)."""
    with deferred(session, _KEY, list, write):
        yield


def write(session: Session, entries: list[_Entry]) -> None:
    if not entries:
        return
    audit.lock_head(session)  # as audit.append: replicas append one after the other
    head = select(AuditEvent.hash).order_by(col(AuditEvent.id).desc()).limit(1)
    prev = session.exec(head).first() or audit.GENESIS  # (autoflushes direct appends first)
    rows = []
    for e in entries:
        digest = audit._digest(prev, e.ts, e.actor, e.action, e.subject, e.detail)
        rows.append(
            {
                "ts": e.ts,
                "actor": e.actor,
                "action": e.action,
                "subject": e.subject,
                "detail": e.detail,
                "prev_hash": prev,
                "hash": digest,
            }
        )
        prev = digest
    # Core, not the ORM's bulk insert: nothing to map back, a quarter less per row.
    session.execute(insert(AuditEvent.__table__), rows)  # type: ignore[attr-defined]
