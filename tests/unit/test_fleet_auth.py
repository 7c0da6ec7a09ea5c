"""API tokens: hashed at rest, scoped to one role, revocable, disarmed with the role."""

from __future__ import annotations

import pytest
from sqlmodel import Session, select

from fleet import auth
from fleet.db import init_db, make_engine


@pytest.fixture
def session(database_url: str):
    engine = make_engine(database_url)
    init_db(engine)
    with Session(engine) as s:
        s.add(auth.StaffAccount(id="tech-1", roles="technician,night_staff", teams="north"))
        s.commit()
        yield s
    engine.dispose()


def test_token_round_trip_and_hash_at_rest(session: Session) -> None:
    token = auth.issue_token(session, "tech-1", auth.Role.TECHNICIAN)
    session.commit()
    rows = session.exec(select(auth.ApiToken)).all()
    assert len(rows) == 1 and token not in rows[0].token_hash
    p = auth.principal_for_token(session, token)
    assert p == auth.Principal("tech-1", frozenset({auth.Role.TECHNICIAN}), frozenset({"north"}))
    assert auth.principal_for_token(session, token + "x") is None
    assert auth.principal_for_token(session, "garbage") is None


def test_token_needs_the_role_and_dies_with_it(session: Session) -> None:
    with pytest.raises(ValueError, match="does not hold role"):
        auth.issue_token(session, "tech-1", auth.Role.IT_ADMIN)
    token = auth.issue_token(session, "tech-1", auth.Role.NIGHT_STAFF)
    session.commit()
    account = session.get(auth.StaffAccount, "tech-1")
    assert account is not None
    account.roles = "technician"
    session.add(account)
    session.commit()
    assert auth.principal_for_token(session, token) is None


def test_revoked_token_is_refused(session: Session) -> None:
    token = auth.issue_token(session, "tech-1", auth.Role.TECHNICIAN)
    session.commit()
    assert auth.revoke_token(session, token)
    session.commit()
    assert auth.principal_for_token(session, token) is None
    assert not auth.revoke_token(session, token)
