"""Interactive login: argon2 passwords, TOTP second factor, lockout, enrolment, sessions."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pyotp
import pytest
from sqlmodel import Session, select

from fleet import accounts, audit, auth, sessions
from fleet.db import init_db, make_engine
from fleet.errors import ConfigError
from fleet.models import AuditEvent

NOW = 1_800_000_000.0
PASSWORD = "correct horse battery"
POLICY = accounts.Policy(max_failures=3, lockout_s=600)


@pytest.fixture
def box(tmp_path: Path) -> accounts.SecretBox:
    return accounts.SecretBox.load_or_create(tmp_path / "totp.key")


@pytest.fixture
def session(database_url: str):
    engine = make_engine(database_url)
    init_db(engine)
    with Session(engine) as s:
        accounts.set_roles(s, "nurse-1", [auth.Role.NIGHT_STAFF], ["north"], now=NOW, actor="test")
        accounts.set_password(s, "nurse-1", PASSWORD, now=NOW, actor="test")
        s.commit()
        yield s
    engine.dispose()


def actions(session: Session) -> list[str]:
    return [e.action for e in session.exec(select(AuditEvent).order_by(AuditEvent.id))]


def enrol(session: Session, box: accounts.SecretBox, now: float = NOW) -> str:
    secret = accounts.begin_enrolment(session, "nurse-1", box).secret
    code = pyotp.TOTP(secret).at(now)
    assert accounts.confirm_enrolment(session, "nurse-1", code, box, now=now, policy=POLICY) is None
    session.commit()
    return secret


def test_password_is_argon2id_at_rest_and_never_in_the_log(session: Session) -> None:
    cred = session.get(accounts.StaffCredential, "nurse-1")
    assert cred is not None and cred.password_hash is not None
    assert cred.password_hash.startswith("$argon2id$")
    assert PASSWORD not in cred.password_hash
    dumped = json.dumps([e.model_dump() for e in session.exec(select(AuditEvent))])
    assert PASSWORD not in dumped


def test_weak_password_refused(session: Session) -> None:
    with pytest.raises(accounts.AccountError, match="at least"):
        accounts.set_password(session, "nurse-1", "short", now=NOW, actor="t")
    with pytest.raises(accounts.AccountError, match="no staff account"):
        accounts.set_password(session, "ghost", PASSWORD, now=NOW, actor="t")


def test_first_login_leads_to_enrolment_then_totp(
    session: Session, box: accounts.SecretBox
) -> None:
    first = accounts.check_password(session, "nurse-1", PASSWORD, now=NOW, policy=POLICY)
    assert first.step is accounts.Step.ENROL and first.refusal is None
    secret = enrol(session, box)
    again = accounts.check_password(session, "nurse-1", PASSWORD, now=NOW + 60, policy=POLICY)
    assert again.step is accounts.Step.TOTP
    code = pyotp.TOTP(secret).at(NOW + 60)
    assert accounts.check_totp(session, "nurse-1", code, box, now=NOW + 60, policy=POLICY) is None
    assert actions(session)[-3:] == ["staff.totp_enrolled", "login", "login"]


def test_enrolment_qr_is_inline_svg_of_an_otpauth_uri(
    session: Session, box: accounts.SecretBox
) -> None:
    e = accounts.begin_enrolment(session, "nurse-1", box)
    assert e.uri.startswith("otpauth://totp/Tillsyn%20Fleet:nurse-1?secret=")
    assert e.qr_svg.startswith("<svg") and "</svg>" in e.qr_svg
    pending = accounts.pending_enrolment(session, "nurse-1", box)
    assert pending is not None and pending.secret == e.secret


def test_totp_code_is_single_use_and_drift_bounded(
    session: Session, box: accounts.SecretBox
) -> None:
    secret = enrol(session, box)
    totp = pyotp.TOTP(secret)
    t = NOW + 300
    code = totp.at(t)
    assert accounts.check_totp(session, "nurse-1", code, box, now=t, policy=POLICY) is None
    # The same code again (replay, same step) is refused.
    assert (
        accounts.check_totp(session, "nurse-1", code, box, now=t + 1, policy=POLICY)
        is accounts.Refusal.BAD
    )
    # One step of drift is fine; three are not.
    assert (
        accounts.check_totp(session, "nurse-1", totp.at(t + 30), box, now=t + 60, policy=POLICY)
        is None
    )
    assert (
        accounts.check_totp(session, "nurse-1", totp.at(t + 600), box, now=t + 120, policy=POLICY)
        is accounts.Refusal.BAD
    )


def test_lockout_after_repeated_failures_and_audited(
    session: Session, box: accounts.SecretBox
) -> None:
    enrol(session, box)
    for i in range(POLICY.max_failures):
        r = accounts.check_password(
            session, "nurse-1", "wrong password!", now=NOW + i, policy=POLICY
        )
        assert r.step is None
    assert r.refusal is accounts.Refusal.LOCKED
    # Locked: even the right password is refused until the lockout ends.
    r = accounts.check_password(session, "nurse-1", PASSWORD, now=NOW + 10, policy=POLICY)
    assert r.refusal is accounts.Refusal.LOCKED
    r = accounts.check_password(
        session, "nurse-1", PASSWORD, now=NOW + POLICY.lockout_s + 10, policy=POLICY
    )
    assert r.step is accounts.Step.TOTP
    log = actions(session)
    assert log.count("login.failed") == POLICY.max_failures + 1
    assert log.count("login.locked") == 1
    assert audit.verify(session).ok


def test_wrong_totp_codes_count_towards_lockout(session: Session, box: accounts.SecretBox) -> None:
    enrol(session, box)
    for i in range(POLICY.max_failures):
        out = accounts.check_totp(
            session, "nurse-1", "000000", box, now=NOW + 100 + i, policy=POLICY
        )
    assert out is accounts.Refusal.LOCKED
    cred = session.get(accounts.StaffCredential, "nurse-1")
    assert cred is not None and cred.locked_until == NOW + 102 + POLICY.lockout_s
    accounts.unlock(session, "nurse-1", now=NOW + 200, actor="it-1")
    assert session.get(accounts.StaffCredential, "nurse-1").locked_until is None  # type: ignore[union-attr]


def test_unknown_account_gets_the_same_answer(session: Session) -> None:
    r = accounts.check_password(session, "nobody", PASSWORD, now=NOW, policy=POLICY)
    assert r == accounts.PasswordResult(None, None, accounts.Refusal.BAD)
    r = accounts.check_password(session, "nurse-1", "wrong password!", now=NOW, policy=POLICY)
    assert r == accounts.PasswordResult(None, None, accounts.Refusal.BAD)


def test_totp_secret_encrypted_at_rest_and_bound_to_the_account(
    session: Session, box: accounts.SecretBox, tmp_path: Path
) -> None:
    secret = enrol(session, box)
    cred = session.get(accounts.StaffCredential, "nurse-1")
    assert cred is not None and cred.totp_secret is not None
    assert secret not in cred.totp_secret and cred.totp_secret.startswith("v1:")
    with pytest.raises(accounts.AccountError):
        box.open("someone-else", cred.totp_secret)
    other = accounts.SecretBox.load_or_create(tmp_path / "other.key")
    with pytest.raises(accounts.AccountError):
        other.open("nurse-1", cred.totp_secret)
    assert stat.S_IMODE((tmp_path / "totp.key").stat().st_mode) == 0o600


def test_key_file_readable_by_others_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    accounts.SecretBox.load_or_create(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        accounts.SecretBox.load_or_create(path)


def test_sessions_expire_idle_and_absolute(session: Session) -> None:
    value, row = sessions.create(session, "nurse-1", "full", now=NOW, max_s=3600)
    session.commit()
    assert row.id_hash != value and value not in row.id_hash
    assert sessions.lookup(session, value, now=NOW + 100, idle_s=600) is not None
    # Touch keeps it alive while used ...
    for t in range(600, 3500, 500):
        assert sessions.lookup(session, value, now=NOW + t, idle_s=600) is not None
    # ... but never past the absolute end.
    assert sessions.lookup(session, value, now=NOW + 3600, idle_s=600) is None
    value2, _ = sessions.create(session, "nurse-1", "full", now=NOW, max_s=3600)
    assert sessions.lookup(session, value2, now=NOW + 601, idle_s=600) is None
    assert actions(session)[-2:] == ["session.expired", "session.expired"]


def test_poll_does_not_keep_a_session_alive(session: Session) -> None:
    value, _ = sessions.create(session, "nurse-1", "full", now=NOW, max_s=36000)
    for t in range(100, 700, 100):
        assert sessions.lookup(session, value, now=NOW + t, idle_s=650, touch=False) is not None
    assert sessions.lookup(session, value, now=NOW + 700, idle_s=650, touch=False) is None


def test_pending_session_yields_no_principal(session: Session) -> None:
    _, pending = sessions.create(session, "nurse-1", "totp", now=NOW, max_s=36000)
    assert pending.expires_at == NOW + sessions.PENDING_TTL_S
    assert sessions.principal_for(session, pending) is None
    _, full = sessions.create(session, "nurse-1", "full", now=NOW, max_s=36000)
    p = sessions.principal_for(session, full)
    assert p == auth.Principal("nurse-1", frozenset({auth.Role.NIGHT_STAFF}), frozenset({"north"}))
    account = session.get(auth.StaffAccount, "nurse-1")
    assert account is not None
    account.active = False
    session.add(account)
    assert sessions.principal_for(session, full) is None
