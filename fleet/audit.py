"""Append-only, hash-chained audit log. Each entry commits to the one before it.

Retention deletes the oldest entries, which would cut the chain's anchor (the first entry
commits to ``GENESIS``). So a purge removes only a *prefix* of the chain and appends an
``audit.purged`` entry recording the hash of the last entry it removed; :func:`verify`
takes the newest such checkpoint as the anchor the first remaining entry must continue
from. Deleting entries after the checkpoint, or editing any, is still found. (What a hash
chain alone cannot show is the newest entries being cut off the end: ``verify`` prints
the head hash so follow-up reports can record it elsewhere.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete
from sqlalchemy import text as sql
from sqlmodel import Session, col, select

from .models import AuditEvent

GENESIS = "0" * 64
# pg advisory lock key of the chain's head: b"tillaud" as a number, visible in pg_locks.
HEAD_LOCK_KEY = int.from_bytes(b"tillaud", "big")
_HEAD_LOCKED = "tillsyn.audit_head_locked"


def lock_head(session: Session) -> None:
    """Take the chain's head for the rest of this transaction (PostgreSQL).

    Two replicas appending at once would read the same head, and the unique ``prev_hash``
    would fail the second transaction (an ack or a look lost). Under this lock the second
    waits and, READ COMMITTED, reads the head the first committed. (SQLite keeps the
    unique ``prev_hash`` alone: there a fork still fails the second transaction.)
    """
    tx = session.get_transaction()
    if tx is not None and session.info.get(_HEAD_LOCKED) is tx:
        return  # already held: released at this transaction's end
    if session.get_bind().dialect.name != "postgresql":
        return
    session.execute(sql("SELECT pg_advisory_xact_lock(:k)"), {"k": HEAD_LOCK_KEY})
    session.info[_HEAD_LOCKED] = session.get_transaction()


# json.dumps with options builds a new encoder per call; these give the same text
# (tests/unit/test_audit_chain.py) at half the cost, thousands of entries a window start.
_BODY = json.JSONEncoder(separators=(",", ":"))
_DETAIL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def detail_text(detail: dict[str, Any]) -> str:
    """An entry's detail as stored and hashed: sorted keys, compact, anything else str()."""
    return _DETAIL.encode(detail)


def _digest(prev: str, ts: float, actor: str, action: str, subject: str | None, detail: str) -> str:
    body = _BODY.encode([prev, round(ts, 6), actor, action, subject, detail])
    return hashlib.sha256(body.encode()).hexdigest()


def append(
    session: Session,
    *,
    ts: float,
    actor: str,
    action: str,
    subject: str | None = None,
    **detail: Any,
) -> AuditEvent:
    """Add one entry in the caller's transaction (so it commits with the change it records)."""
    lock_head(session)
    last = session.exec(select(AuditEvent).order_by(col(AuditEvent.id).desc()).limit(1)).first()
    prev = last.hash if last else GENESIS
    text = detail_text(detail)
    entry = AuditEvent(
        ts=ts,
        actor=actor,
        action=action,
        subject=subject,
        detail=text,
        prev_hash=prev,
        hash=_digest(prev, ts, actor, action, subject, text),
    )
    session.add(entry)
    session.flush()
    return entry


@dataclass(frozen=True, slots=True)
class ChainReport:
    entries: int
    first_broken_id: int | None
    why: str | None
    head: str | None = None  # hash of the newest entry (record it elsewhere to anchor)

    @property
    def ok(self) -> bool:
        return self.first_broken_id is None


PURGED = "audit.purged"


def checkpoint(session: Session) -> str:
    """The hash the first remaining entry must continue from (``GENESIS`` if never purged)."""
    stmt = (
        select(AuditEvent)
        .where(AuditEvent.action == PURGED)
        .order_by(col(AuditEvent.id).desc())
        .limit(1)
    )
    last_purge = session.exec(stmt).first()
    if last_purge is None:
        return GENESIS
    try:
        anchor = json.loads(last_purge.detail).get("last_hash")
    except (ValueError, AttributeError):
        anchor = None
    return anchor if isinstance(anchor, str) else "unreadable purge checkpoint"


def verify(session: Session) -> ChainReport:
    prev = checkpoint(session)
    count = 0
    stmt = select(AuditEvent).order_by(col(AuditEvent.id)).execution_options(yield_per=2000)
    for entry in session.exec(stmt):
        count += 1
        assert entry.id is not None
        if entry.prev_hash != prev:
            if count == 1:
                why = "first entry does not continue from the genesis or purge checkpoint"
                return ChainReport(count, entry.id, why)
            return ChainReport(count, entry.id, "prev_hash does not match the entry before")
        expect = _digest(prev, entry.ts, entry.actor, entry.action, entry.subject, entry.detail)
        if entry.hash != expect:
            return ChainReport(count, entry.id, "content does not match its hash")
        prev = entry.hash
    return ChainReport(count, None, None, prev if count else None)


@dataclass(frozen=True, slots=True)
class Purged:
    count: int
    through_id: int | None
    last_hash: str | None


def purge_before(session: Session, *, before_ts: float, now: float, actor: str) -> Purged:
    """Delete the longest prefix of the chain older than ``before_ts``; record a checkpoint.

    Only a prefix: an old entry after a newer one (clocks differ between writers) stays,
    and so does everything after it, so the chain stays contiguous. Refuses to run on a
    broken chain, which would destroy the evidence. The checkpoint entry is appended in
    the same transaction as the deletion.
    """
    report = verify(session)
    if not report.ok:
        raise ValueError(f"audit chain broken at entry {report.first_broken_id}: not purging")
    newer = session.exec(
        select(AuditEvent.id).where(AuditEvent.ts >= before_ts).order_by(col(AuditEvent.id))
    ).first()
    stmt = select(AuditEvent).order_by(col(AuditEvent.id).desc()).limit(1)
    if newer is not None:
        stmt = stmt.where(col(AuditEvent.id) < newer)
    last = session.exec(stmt).first()
    if last is None:
        append(
            session,
            ts=now,
            actor=actor,
            action=PURGED,
            count=0,
            before=before_ts,
            last_hash=checkpoint(session),
            through_id=None,
        )
        return Purged(0, None, None)
    assert last.id is not None
    count = session.execute(delete(AuditEvent).where(col(AuditEvent.id) <= last.id)).rowcount  # type: ignore[attr-defined]
    append(
        session,
        ts=now,
        actor=actor,
        action=PURGED,
        count=count,
        before=before_ts,
        through_id=last.id,
        last_hash=last.hash,
    )
    return Purged(int(count), last.id, last.hash)
