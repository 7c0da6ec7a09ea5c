"""``tillsyn audit``: verify the chain, follow up looks, per-resident extract, retention.

These run on the server against the database (like ``tillsyn staff``), so the log can be
verified and followed up even while the service is down.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path

import click
from sqlmodel import Session

from . import audit, audit_query, auth, followup
from .cli_staff import config_opt, open_session
from .config import load_settings
from .errors import FleetError

STOCKHOLM = followup.STOCKHOLM


def _when(text: str, *, end_of_day: bool = False) -> float:
    """``YYYY-MM-DD`` (Stockholm; as an end: the end of that day) or an ISO date-time."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text) + timedelta(days=1 if end_of_day else 0)
            return datetime.combine(day, dtime(0), STOCKHOLM).timestamp()
        at = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not YYYY-MM-DD or an ISO date-time") from None
    return (at if at.tzinfo else at.replace(tzinfo=STOCKHOLM)).timestamp()


def _auditor(session: Session, staff_id: str) -> None:
    account = session.get(auth.StaffAccount, staff_id)
    if account is None or not account.active or auth.Role.AUDITOR.value not in account.roles:
        raise click.ClickException(f"{staff_id} is not an active auditor")


@click.group("audit")
def audit_group() -> None:
    """The audit log: verify, follow up, extract, retention."""


@audit_group.command()
@config_opt
def verify(config_path: Path | None) -> None:
    """Check the hash chain; exit 1 and name the first broken entry if it is broken."""
    with open_session(config_path) as session:
        report = audit.verify(session)
    if not report.ok:
        click.echo(
            f"BROKEN at entry {report.first_broken_id}: {report.why} "
            f"({report.entries} entries read)",
            err=True,
        )
        sys.exit(1)
    click.echo(f"ok: {report.entries} entries, head {report.head or '-'}")


@audit_group.command("log")
@click.option("--action", default=None, help="Exact action, or a prefix ending in '.'.")
@click.option("--actor", default=None)
@click.option("--subject", default=None)
@click.option("--from", "since", default=None, help="YYYY-MM-DD or ISO date-time.")
@click.option("--to", "until", default=None, help="YYYY-MM-DD (inclusive) or ISO date-time.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@config_opt
def log_cmd(
    action: str | None,
    actor: str | None,
    subject: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    as_json: bool,
    config_path: Path | None,
) -> None:
    """Show audit entries, newest first."""
    filters = audit_query.Filters(
        action=action,
        actor=actor,
        subject=subject,
        since=_when(since) if since else None,
        until=_when(until, end_of_day=True) if until else None,
        limit=limit,
    )
    with open_session(config_path) as session:
        rows = [audit_query.entry_json(e) for e in audit_query.search(session, filters)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        detail = json.dumps(r["detail"], separators=(",", ":"))[:100]
        click.echo(
            f"{r['id']:>7}  {followup.fmt_time(r['ts'])}  {r['actor']:<16} "
            f"{r['action']:<22} {r['subject'] or '-':<16} {detail}"
        )


@audit_group.command()
@click.option("--from", "since", required=True, help="YYYY-MM-DD or ISO date-time.")
@click.option("--to", "until", required=True, help="YYYY-MM-DD (inclusive) or ISO date-time.")
@click.option("--size", type=click.IntRange(1, followup.MAX_SAMPLE), default=20, show_default=True)
@click.option("--by", "by", required=True, help="Staff id of the auditor drawing the sample.")
@config_opt
def sample(since: str, until: str, size: int, by: str, config_path: Path | None) -> None:
    """Draw a random sample of the looks in a period for spot checks."""
    with open_session(config_path) as session:
        _auditor(session, by)
        try:
            drawn = followup.draw_sample(
                session,
                start=_when(since),
                end=_when(until, end_of_day=True),
                size=size,
                actor=by,
                now=time.time(),
            )
        except FleetError as exc:
            raise click.ClickException(str(exc)) from None
        assert drawn.id is not None
        _, checks = followup.sample_checks(session, drawn.id)
        session.commit()
    click.echo(f"sample {drawn.id}: {drawn.size} of {drawn.population} looks")
    for c in checks:
        click.echo(
            f"  check {c.id:>5}  {followup.fmt_time(c.requested_at)}  {c.staff_id:<16} "
            f"{c.device_id:<16} {c.resident_id or '-'}"
        )


@audit_group.command("check")
@click.argument("check_id", type=int)
@click.option("--verdict", type=click.Choice([v.value for v in followup.Verdict]), required=True)
@click.option("--comment", default="", help="What was checked or found.")
@click.option("--by", "by", required=True, help="Staff id of the auditor.")
@config_opt
def check_cmd(check_id: int, verdict: str, comment: str, by: str, config_path: Path | None) -> None:
    """Mark one sampled look as checked."""
    with open_session(config_path) as session:
        _auditor(session, by)
        try:
            followup.mark(
                session,
                check_id,
                verdict=followup.Verdict(verdict),
                comment=comment,
                actor=by,
                now=time.time(),
            )
        except FleetError as exc:
            raise click.ClickException(str(exc)) from None
        session.commit()
    click.echo(f"check {check_id}: {verdict}")


@audit_group.command()
@click.argument("sample_id", type=int)
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), default=None)
@click.option("--pdf", "pdf_path", type=click.Path(path_type=Path), default=None)
@config_opt
def export(
    sample_id: int, csv_path: Path | None, pdf_path: Path | None, config_path: Path | None
) -> None:
    """Export a follow-up as CSV and/or PDF (CSV to stdout if neither is given)."""
    with open_session(config_path) as session:
        try:
            drawn, checks = followup.sample_checks(session, sample_id)
        except FleetError as exc:
            raise click.ClickException(str(exc)) from None
        head = audit.verify(session).head
    if csv_path is None and pdf_path is None:
        click.echo(followup.to_csv(drawn, checks, head), nl=False)
        return
    if csv_path is not None:
        csv_path.write_text(followup.to_csv(drawn, checks, head))
        click.echo(f"wrote {csv_path}")
    if pdf_path is not None:
        pdf_path.write_bytes(followup.to_pdf(drawn, checks, head))
        click.echo(f"wrote {pdf_path}")


@audit_group.command()
@click.option("--resident", required=True, help="Pseudonymous resident id.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV instead of a table.")
@config_opt
def extract(resident: str, as_csv: bool, config_path: Path | None) -> None:
    """Who looked at a resident, and when (the resident's right to see the log)."""
    with open_session(config_path) as session:
        rows = audit_query.resident_extract(session, resident)
        audit.append(
            session,
            ts=time.time(),
            actor="cli",
            action="audit.extract",
            subject=resident,
            looks=len(rows),
        )
        session.commit()
    if as_csv:
        click.echo(audit_query.extract_csv(rows), nl=False)
        return
    click.echo(f"{len(rows)} looks at {resident}")
    for r in rows:
        dur = "-" if r.duration_s is None else f"{r.duration_s:.0f} s"
        click.echo(
            f"  {followup.fmt_time(r.requested_at or r.started_at)}  {r.staff_id:<16} "
            f"{r.device_id:<16} {dur:>6}  {r.outcome or r.end_reason or '-'}"
        )


@audit_group.command()
@click.option(
    "--older-than-days",
    type=click.IntRange(min=30),
    default=None,
    help="Default: the audit_retention_days setting (5 years).",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@config_opt
def purge(older_than_days: int | None, yes: bool, config_path: Path | None) -> None:
    """Delete audit entries and follow-ups past retention (the purge itself is audited)."""
    days = older_than_days or load_settings(config_path).audit_retention_days
    if not yes:
        click.confirm(f"Delete audit entries older than {days} days?", abort=True)
    with open_session(config_path) as session:
        try:
            result = audit_query.purge(session, older_than_days=days, now=time.time(), actor="cli")
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        session.commit()
        report = audit.verify(session)
    click.echo(
        f"purged {result.audit_entries} audit entries and {result.followups} follow-ups "
        f"older than {followup.fmt_time(result.before_ts)}; chain "
        f"{'ok' if report.ok else 'BROKEN'} ({report.entries} entries)"
    )
