"""Reading the audit log: filtered listing, the per-resident extract, retention.

The per-resident extract answers the resident's right to know who looked at them and when
(*loggutdrag*). It is built from the audit log, the record that cannot be quietly edited:
every ``look.*`` entry names the resident the device served *at that moment*, so a device
that later moved to someone else does not mix two residents' looks. The :class:`Look` rows
fill in times the audit entries do not carry.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from dataclasses import asdict, dataclass
from typing import Any

from sqlmodel import Session, col, select

from . import audit, followup
from .models import AuditEvent, Look
from .query import among

LOOK_ACTIONS = ("look.requested", "look.started", "look.ended", *followup.OUTCOME_ACTIONS)


@dataclass(frozen=True, slots=True)
class Filters:
    action: str | None = None  # exact, or a prefix ending in "." ("login.")
    actor: str | None = None
    subject: str | None = None
    since: float | None = None
    until: float | None = None
    before_id: int | None = None  # paging: entries older than this id
    limit: int = 100


def search(session: Session, f: Filters) -> list[AuditEvent]:
    stmt = select(AuditEvent).order_by(col(AuditEvent.id).desc())
    if f.action:
        if f.action.endswith("."):
            stmt = stmt.where(col(AuditEvent.action).startswith(f.action, autoescape=True))
        else:
            stmt = stmt.where(AuditEvent.action == f.action)
    if f.actor:
        stmt = stmt.where(AuditEvent.actor == f.actor)
    if f.subject:
        stmt = stmt.where(AuditEvent.subject == f.subject)
    if f.since is not None:
        stmt = stmt.where(col(AuditEvent.ts) >= f.since)
    if f.until is not None:
        stmt = stmt.where(col(AuditEvent.ts) < f.until)
    if f.before_id is not None:
        stmt = stmt.where(col(AuditEvent.id) < f.before_id)
    return list(session.exec(stmt.limit(max(1, min(f.limit, 1000)))).all())


def entry_json(entry: AuditEvent) -> dict[str, Any]:
    data = entry.model_dump()
    with contextlib.suppress(ValueError):
        data["detail"] = json.loads(entry.detail)
    return data


@dataclass(slots=True)
class ExtractRow:
    look_id: str
    staff_id: str
    device_id: str
    requested_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    duration_s: float | None = None
    outcome: str | None = None
    end_reason: str | None = None


def resident_extract(session: Session, resident_id: str) -> list[ExtractRow]:
    """Every look at ``resident_id`` still in the log, oldest first."""
    needle = json.dumps({"resident": resident_id}, separators=(",", ":"))[1:-1]
    stmt = (
        select(AuditEvent)
        .where(col(AuditEvent.action).in_(LOOK_ACTIONS[:3]))
        .where(col(AuditEvent.detail).contains(needle, autoescape=True))
        .order_by(col(AuditEvent.id))
    )
    rows: dict[str, ExtractRow] = {}
    for entry in session.exec(stmt):
        detail = followup._detail(entry)
        look_id = detail.get("look_id")
        if detail.get("resident") != resident_id or not isinstance(look_id, str):
            continue
        row = rows.setdefault(look_id, ExtractRow(look_id, entry.actor, entry.subject or ""))
        if entry.action == "look.requested":
            row.requested_at = entry.ts
        elif entry.action == "look.started":
            row.started_at = entry.ts
        else:
            row.ended_at = entry.ts
            dur = detail.get("duration_s")
            row.duration_s = float(dur) if isinstance(dur, int | float) else row.duration_s
            reason = detail.get("reason")
            row.end_reason = reason if isinstance(reason, str) else row.end_reason
    if rows:
        looks = session.exec(select(Look).where(among(Look.id, list(rows)))).all()
        for look in looks:  # the device's own times are more precise than the log's
            row = rows[look.id]
            row.started_at = look.started_at or row.started_at
            row.ended_at = look.ended_at or row.ended_at
            row.duration_s = look.duration_s if look.duration_s is not None else row.duration_s
        for look_id, outcome in followup.look_outcomes(session, list(rows)).items():
            rows[look_id].outcome = outcome
    return sorted(rows.values(), key=lambda r: (r.requested_at or 0, r.look_id))


EXTRACT_COLUMNS = (
    "look_id",
    "staff_id",
    "device_id",
    "requested_at",
    "started_at",
    "ended_at",
    "duration_s",
    "outcome",
    "end_reason",
)


def extract_csv(rows: list[ExtractRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(EXTRACT_COLUMNS)
    for row in rows:
        data = asdict(row)
        w.writerow(
            [
                followup.fmt_time(data[c])
                if c.endswith("_at")
                else ("" if data[c] is None else data[c])
                for c in EXTRACT_COLUMNS
            ]
        )
    return buf.getvalue()


@dataclass(frozen=True, slots=True)
class RetentionResult:
    before_ts: float
    audit_entries: int
    followups: int
    through_id: int | None


def purge(session: Session, *, older_than_days: int, now: float, actor: str) -> RetentionResult:
    """Retention: drop audit entries and follow-ups older than the limit; audited itself."""
    before = now - older_than_days * 86400.0
    followups = followup.purge_before(session, before)
    result = audit.purge_before(session, before_ts=before, now=now, actor=actor)
    return RetentionResult(before, result.count, followups, result.through_id)
