"""Log follow-up: random spot checks of looks, marked by an auditor, exported as CSV/PDF.

Health-care rules expect the care provider to *follow up* the access log regularly, not
only to keep it. A follow-up draws a random sample of the looks in a period (with the
operating system's random source, so nobody can predict which looks will be checked),
snapshots each sampled look (who, device, resident, when, how long, outcome) so the
follow-up stays readable after the looks themselves are purged, and lets an auditor mark
each one checked (``ok`` or ``deviation``) with a comment. Drawing and every mark are
audited; the export carries the audit chain's head hash at export time.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from fpdf import FPDF, XPos, YPos
from sqlalchemy import UniqueConstraint, delete
from sqlmodel import Field, Session, SQLModel, col, select

from . import audit
from .errors import Conflict, FleetError, NotFound
from .models import AuditEvent, Device, Look
from .plan_models import Check
from .query import among

STOCKHOLM = ZoneInfo("Europe/Stockholm")
MAX_SAMPLE = 500


class Verdict(StrEnum):
    OK = "ok"
    DEVIATION = "deviation"  # avvikelse: to be investigated


class FollowUpSample(SQLModel, table=True):
    __tablename__ = "followup_sample"

    id: int | None = Field(default=None, primary_key=True)
    period_from: float
    period_to: float
    size: int  # looks drawn
    population: int  # looks in the period
    created_by: str = Field(max_length=64)
    created_at: float = Field(index=True)


class SpotCheck(SQLModel, table=True):
    """One sampled look, snapshotted when drawn, and the auditor's mark on it."""

    __tablename__ = "followup_check"
    __table_args__ = (UniqueConstraint("sample_id", "look_id"),)

    id: int | None = Field(default=None, primary_key=True)
    sample_id: int = Field(foreign_key="followup_sample.id", index=True)
    look_id: str = Field(max_length=64)
    device_id: str = Field(max_length=64)
    resident_id: str | None = Field(default=None, max_length=64)
    staff_id: str = Field(max_length=64)
    requested_at: float
    started_at: float | None = None
    ended_at: float | None = None
    duration_s: float | None = None
    end_reason: str | None = Field(default=None, max_length=32)
    outcome: str | None = Field(default=None, max_length=32)
    verdict: str | None = Field(default=None, max_length=16)
    comment: str | None = Field(default=None, max_length=1000)
    checked_by: str | None = Field(default=None, max_length=64)
    checked_at: float | None = None


class FollowUpError(FleetError):
    pass


def look_outcomes(session: Session, look_ids: Sequence[str]) -> dict[str, str]:
    """The outcome staff recorded after each look: the outcome of the care-plan check whose
    last look it was, or an audit entry naming the look and an outcome."""
    if not look_ids:
        return {}
    wanted = set(look_ids)
    out: dict[str, str] = {}
    stmt_checks = select(Check).where(among(Check.last_look_id, sorted(wanted)))
    for check in session.exec(stmt_checks):
        if check.last_look_id and check.outcome is not None:
            out[check.last_look_id] = check.outcome.value
    stmt = select(AuditEvent).where(col(AuditEvent.action).in_(OUTCOME_ACTIONS))
    for entry in session.exec(stmt.order_by(col(AuditEvent.id))):  # the first outcome wins
        detail = _detail(entry)
        look_id, outcome = detail.get("look_id"), detail.get("outcome")
        if look_id in wanted and isinstance(outcome, str):
            out.setdefault(str(look_id), outcome)
    return out


# Audit actions that carry ``look_id`` and ``outcome`` (the care-plan checks record them).
OUTCOME_ACTIONS = ("check.outcome", "look.outcome")


def _detail(entry: AuditEvent) -> dict[str, Any]:
    try:
        value = json.loads(entry.detail)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def draw_sample(
    session: Session,
    *,
    start: float,
    end: float,
    size: int,
    actor: str,
    now: float,
    rng: random.Random | None = None,
) -> FollowUpSample:
    """Draw up to ``size`` looks requested in ``[start, end)`` at random."""
    if not 0 < size <= MAX_SAMPLE:
        raise FollowUpError(f"size must be between 1 and {MAX_SAMPLE}")
    if end <= start:
        raise FollowUpError("the period must end after it starts")
    looks = session.exec(
        select(Look)
        .where(col(Look.requested_at) >= start, col(Look.requested_at) < end)
        .order_by(col(Look.requested_at), col(Look.id))
    ).all()
    picked = (rng or random.SystemRandom()).sample(list(looks), min(size, len(looks)))
    picked.sort(key=lambda x: (x.requested_at, x.id))
    sample = FollowUpSample(
        period_from=start,
        period_to=end,
        size=len(picked),
        population=len(looks),
        created_by=actor,
        created_at=now,
    )
    session.add(sample)
    session.flush()
    assert sample.id is not None
    residents = _residents(session, picked)
    outcomes = look_outcomes(session, [x.id for x in picked])
    for look in picked:
        session.add(
            SpotCheck(
                sample_id=sample.id,
                look_id=look.id,
                device_id=look.device_id,
                resident_id=residents.get(look.id),
                staff_id=look.staff_id,
                requested_at=look.requested_at,
                started_at=look.started_at,
                ended_at=look.ended_at,
                duration_s=look.duration_s,
                end_reason=look.end_reason,
                outcome=outcomes.get(look.id),
            )
        )
    audit.append(
        session,
        ts=now,
        actor=actor,
        action="followup.sampled",
        subject=f"sample-{sample.id}",
        period_from=start,
        period_to=end,
        population=len(looks),
        looks=[x.id for x in picked],
    )
    return sample


def _residents(session: Session, looks: Sequence[Look]) -> dict[str, str]:
    """The resident each look was of: as logged when it was requested, else the device's."""
    out: dict[str, str] = {}
    ids = {x.id for x in looks}
    stmt = select(AuditEvent).where(AuditEvent.action == "look.requested")
    stmt = stmt.where(among(AuditEvent.subject, {x.device_id for x in looks}))
    for entry in session.exec(stmt.order_by(col(AuditEvent.id))):
        detail = _detail(entry)
        if detail.get("look_id") in ids and isinstance(detail.get("resident"), str):
            out[str(detail["look_id"])] = str(detail["resident"])
    for look in looks:
        if look.id not in out:
            device = session.get(Device, look.device_id)
            if device is not None and device.resident_id:
                out[look.id] = device.resident_id
    return out


def mark(
    session: Session,
    check_id: int,
    *,
    verdict: Verdict,
    comment: str,
    actor: str,
    now: float,
) -> SpotCheck:
    check = session.get(SpotCheck, check_id)
    if check is None:
        raise NotFound("spot check", check_id)
    comment = comment.strip()
    if len(comment) > 1000:
        raise FollowUpError("comment too long (1000 characters at most)")
    if verdict is Verdict.DEVIATION and not comment:
        raise FollowUpError("a deviation needs a comment saying what was found")
    if check.checked_at is not None and check.checked_by != actor:
        raise Conflict(f"spot check {check_id} was already marked by {check.checked_by}")
    check.verdict, check.comment = verdict.value, comment or None
    check.checked_by, check.checked_at = actor, now
    session.add(check)
    audit.append(
        session,
        ts=now,
        actor=actor,
        action="followup.checked",
        subject=f"sample-{check.sample_id}",
        check_id=check_id,
        look_id=check.look_id,
        verdict=verdict.value,
        comment=comment or None,
    )
    return check


def samples(session: Session, limit: int = 50) -> list[FollowUpSample]:
    stmt = select(FollowUpSample).order_by(col(FollowUpSample.id).desc()).limit(limit)
    return list(session.exec(stmt).all())


def sample_checks(session: Session, sample_id: int) -> tuple[FollowUpSample, list[SpotCheck]]:
    sample = session.get(FollowUpSample, sample_id)
    if sample is None:
        raise NotFound("follow-up sample", sample_id)
    stmt = select(SpotCheck).where(SpotCheck.sample_id == sample_id)
    rows = session.exec(stmt.order_by(col(SpotCheck.requested_at), col(SpotCheck.id))).all()
    return sample, list(rows)


def purge_before(session: Session, before_ts: float) -> int:
    """Retention: follow-ups whose period ended before ``before_ts`` (checks first)."""
    old = select(FollowUpSample.id).where(col(FollowUpSample.period_to) < before_ts)
    ids = list(session.exec(old).all())
    if not ids:
        return 0
    session.execute(delete(SpotCheck).where(among(SpotCheck.sample_id, ids)))
    session.execute(delete(FollowUpSample).where(among(FollowUpSample.id, ids)))
    return len(ids)


# --- export --------------------------------------------------------------------------------


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, STOCKHOLM).strftime("%Y-%m-%d %H:%M:%S")


COLUMNS = (
    "check_id",
    "look_id",
    "staff_id",
    "device_id",
    "resident_id",
    "requested_at",
    "started_at",
    "ended_at",
    "duration_s",
    "outcome",
    "verdict",
    "comment",
    "checked_by",
    "checked_at",
)


def _row(check: SpotCheck) -> list[str]:
    return [
        str(check.id),
        check.look_id,
        check.staff_id,
        check.device_id,
        check.resident_id or "",
        fmt_time(check.requested_at),
        fmt_time(check.started_at),
        fmt_time(check.ended_at),
        "" if check.duration_s is None else f"{check.duration_s:.0f}",
        check.outcome or check.end_reason or "",
        check.verdict or "",
        check.comment or "",
        check.checked_by or "",
        fmt_time(check.checked_at),
    ]


def _csv_safe(cell: str) -> str:
    # A cell opened in a spreadsheet must not run as a formula (CSV injection).
    return "'" + cell if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


def to_csv(sample: FollowUpSample, checks: Sequence[SpotCheck], head: str | None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["# follow-up sample", sample.id, "period", fmt_time(sample.period_from),
                fmt_time(sample.period_to), "looks in period", sample.population,
                "audit head", head or ""])  # fmt: skip
    w.writerow(COLUMNS)
    for check in checks:
        w.writerow([_csv_safe(c) for c in _row(check)])
    return buf.getvalue()


def _latin1(text: str) -> str:
    # The PDF core fonts are Latin-1: Swedish letters are in it; anything else is replaced.
    return text.encode("latin-1", "replace").decode("latin-1")


def to_pdf(sample: FollowUpSample, checks: Sequence[SpotCheck], head: str | None) -> bytes:
    pdf = FPDF(orientation="L", unit="mm", format="A4")
    pdf.set_title(f"Uppfoljning av loggar / log follow-up {sample.id}")
    pdf.set_auto_page_break(auto=True, margin=12)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 14)
    pdf.cell(
        0,
        8,
        _latin1(f"Uppföljning av loggar / Log follow-up #{sample.id}"),
        new_x=XPos.LMARGIN,
        new_y=YPos.NEXT,
    )
    pdf.set_font("Helvetica", "", 9)
    checked = sum(1 for c in checks if c.checked_at is not None)
    deviations = sum(1 for c in checks if c.verdict == Verdict.DEVIATION)
    for line in (
        f"Period: {fmt_time(sample.period_from)} - {fmt_time(sample.period_to)} (Europe/Stockholm)",
        f"Tittar i perioden / looks in period: {sample.population}; "
        f"stickprov / sampled: {sample.size}; granskade / checked: {checked}; "
        f"avvikelser / deviations: {deviations}",
        f"Dragen av / drawn by {sample.created_by} {fmt_time(sample.created_at)}",
        f"Granskningsloggens huvud / audit chain head: {head or '-'}",
    ):
        pdf.cell(0, 5, _latin1(line), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(2)
    headers = ("#", "Personal", "Enhet", "Brukare", "Begärd", "Längd", "Utfall", "Bedömning",
               "Kommentar", "Granskad av")  # fmt: skip
    widths = (10, 26, 30, 26, 34, 14, 24, 22, 60, 30)
    pdf.set_font("Helvetica", "B", 8)
    for h, w in zip(headers, widths, strict=True):
        pdf.cell(w, 6, _latin1(h), border=1)
    pdf.ln()
    pdf.set_font("Helvetica", "", 8)
    for check in checks:
        cells = (
            str(check.id),
            check.staff_id,
            check.device_id,
            check.resident_id or "",
            fmt_time(check.requested_at),
            "" if check.duration_s is None else f"{check.duration_s:.0f} s",
            check.outcome or check.end_reason or "",
            check.verdict or "",
            (check.comment or "")[:60],
            check.checked_by or "",
        )
        for text, w in zip(cells, widths, strict=True):
            pdf.cell(w, 5, _latin1(text)[: int(w / 1.6)], border=1)
        pdf.ln()
    return bytes(pdf.output())
