"""Append-only, hash-chained audit log. Each entry commits to the one before it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from .models import AuditEvent

GENESIS = "0" * 64


def _digest(prev: str, ts: float, actor: str, action: str, subject: str | None, detail: str) -> str:
    body = json.dumps([prev, round(ts, 6), actor, action, subject, detail], separators=(",", ":"))
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
    last = session.exec(select(AuditEvent).order_by(col(AuditEvent.id).desc()).limit(1)).first()
    prev = last.hash if last else GENESIS
    text = json.dumps(detail, sort_keys=True, separators=(",", ":"), default=str)
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

    @property
    def ok(self) -> bool:
        return self.first_broken_id is None


def verify(session: Session) -> ChainReport:
    prev = GENESIS
    count = 0
    for entry in session.exec(select(AuditEvent).order_by(col(AuditEvent.id))):
        count += 1
        assert entry.id is not None
        if entry.prev_hash != prev:
            return ChainReport(count, entry.id, "prev_hash does not match the entry before")
        expect = _digest(prev, entry.ts, entry.actor, entry.action, entry.subject, entry.detail)
        if entry.hash != expect:
            return ChainReport(count, entry.id, "content does not match its hash")
        prev = entry.hash
    return ChainReport(count, None, None)
