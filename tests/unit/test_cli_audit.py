"""``tillsyn audit`` and ``tillsyn staff`` against a real SQLite database."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text
from sqlmodel import Session, col, select

from fleet import audit, followup
from fleet.db import init_db, make_engine
from fleet.models import AuditEvent, Device, Look
from tillsyn_cli.main import cli

HOUR = 3600.0


@pytest.fixture
def db(database_url: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TILLSYN_DATABASE_URL", database_url)
    engine = make_engine(database_url)
    init_db(engine)
    yield engine
    engine.dispose()


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, ["--text-logs", *args], input=input, catch_exceptions=False)


def seed_looks(engine, n: int, start: float) -> None:
    with Session(engine) as s:
        s.add(Device(id="dev-a", resident_id="res-0001", team="north"))
        s.add(Device(id="dev-b", resident_id="res-0002", team="north"))
        s.flush()
        for i in range(n):
            dev, res = ("dev-a", "res-0001") if i % 2 == 0 else ("dev-b", "res-0002")
            at = start + i * 60
            look = Look(
                id=f"look-{i:03d}",
                device_id=dev,
                staff_id=f"nurse-{i % 3}",
                requested_at=at,
                started_at=at + 1,
                ended_at=at + 31,
                duration_s=30,
            )
            s.add(look)
            audit.append(
                s,
                ts=at,
                actor=look.staff_id,
                action="look.requested",
                subject=dev,
                look_id=look.id,
                resident=res,
                max_s=60,
            )
            audit.append(
                s,
                ts=at + 31,
                actor=look.staff_id,
                action="look.ended",
                subject=dev,
                look_id=look.id,
                resident=res,
                duration_s=30,
                reason="cap",
            )
        s.commit()


def test_staff_lifecycle_is_audited_without_secrets(db) -> None:
    assert run("staff", "add", "aud-1", "--role", "auditor").exit_code == 0
    r = run("staff", "password", "aud-1", "--stdin", input="a long enough password\n")
    assert r.exit_code == 0, r.output
    r = run("staff", "password", "aud-1", "--stdin", input="short\n")
    assert r.exit_code == 1 and "at least" in r.output
    token = run("staff", "token", "aud-1", "--role", "auditor").output.strip()
    assert token.startswith("tf_")
    assert "revoked" not in run("staff", "tokens").output
    assert run("staff", "revoke-token", "--id", "1").exit_code == 0
    assert "revoked" in run("staff", "tokens").output
    assert run("staff", "unlock", "aud-1").exit_code == 0
    assert run("staff", "reset-2fa", "aud-1").exit_code == 0
    assert "aud-1" in run("staff", "list").output
    with Session(db) as s:
        entries = s.exec(select(AuditEvent).order_by(AuditEvent.id)).all()
        acts = [e.action for e in entries]
        blob = " ".join(e.detail for e in entries)
    assert acts == [
        "staff.roles",
        "staff.password_set",
        "token.issued",
        "token.revoked",
        "staff.unlocked",
        "staff.totp_reset",
    ]
    assert "a long enough password" not in blob and token not in blob


def test_verify_reports_the_first_broken_link(db) -> None:
    seed_looks(db, 6, start=time.time() - HOUR)
    r = run("audit", "verify")
    assert r.exit_code == 0 and r.output.startswith("ok: 12 entries, head ")
    with db.begin() as conn:
        conn.execute(text("UPDATE auditevent SET actor = 'someone' WHERE id = 5"))
    r = run("audit", "verify")
    assert r.exit_code == 1
    assert "BROKEN at entry 5" in r.output


def test_sample_check_export_and_extract(db, tmp_path: Path) -> None:
    start = time.time() - 2 * HOUR
    seed_looks(db, 20, start=start)
    run("staff", "add", "aud-1", "--role", "auditor")
    run("staff", "add", "nurse-9", "--role", "night_staff")
    iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))  # noqa: E731
    r = run(
        "audit",
        "sample",
        "--from",
        iso(start),
        "--to",
        iso(start + HOUR),
        "--size",
        "5",
        "--by",
        "nurse-9",
    )
    assert r.exit_code == 1 and "not an active auditor" in r.output
    r = run(
        "audit",
        "sample",
        "--from",
        iso(start),
        "--to",
        iso(start + HOUR),
        "--size",
        "5",
        "--by",
        "aud-1",
    )
    assert r.exit_code == 0, r.output
    assert "sample 1: 5 of 20 looks" in r.output
    with Session(db) as s:
        _, checks = followup.sample_checks(s, 1)
    assert len({c.look_id for c in checks}) == 5
    assert all(c.resident_id in ("res-0001", "res-0002") for c in checks)
    r = run("audit", "check", str(checks[0].id), "--verdict", "deviation", "--by", "aud-1")
    assert r.exit_code == 1 and "needs a comment" in r.output
    r = run(
        "audit",
        "check",
        str(checks[0].id),
        "--verdict",
        "deviation",
        "--comment",
        "=HYPERLINK(x) look outside agreed time?",
        "--by",
        "aud-1",
    )
    assert r.exit_code == 0, r.output
    pdf, csv_path = tmp_path / "f.pdf", tmp_path / "f.csv"
    r = run("audit", "export", "1", "--csv", str(csv_path), "--pdf", str(pdf))
    assert r.exit_code == 0, r.output
    assert pdf.read_bytes().startswith(b"%PDF-")
    body = csv_path.read_text()
    assert "'=HYPERLINK(x)" in body and "deviation" in body
    assert len(body.strip().splitlines()) == 2 + 5
    r = run("audit", "extract", "--resident", "res-0001", "--csv")
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("look_id,staff_id,device_id")
    assert len(lines) == 1 + 10 and all("dev-a" in line for line in lines[1:])
    with Session(db) as s:
        acts = [e.action for e in s.exec(select(AuditEvent).order_by(col(AuditEvent.id)))]
        assert {"followup.sampled", "followup.checked", "audit.extract"} <= set(acts)
        assert audit.verify(s).ok


def test_purge_is_audited_and_the_chain_still_verifies(db) -> None:
    old = time.time() - 40 * 86400
    seed_looks(db, 4, start=old)
    seed_looks_recent = time.time() - HOUR
    with Session(db) as s:
        audit.append(s, ts=seed_looks_recent, actor="x", action="device.online", subject="dev-a")
        s.commit()
    r = run("audit", "purge", "--older-than-days", "30", "--yes")
    assert r.exit_code == 0, r.output
    assert "purged 8 audit entries" in r.output and "chain ok" in r.output
    assert run("audit", "verify").exit_code == 0
    with Session(db) as s:
        acts = [e.action for e in s.exec(select(AuditEvent).order_by(AuditEvent.id))]
    assert acts == ["device.online", "audit.purged"]
    r = run("audit", "purge", "--older-than-days", "5", "--yes")
    assert r.exit_code == 2  # below the 30-day floor: refused by the option itself
