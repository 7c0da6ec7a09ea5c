"""Staff principals, roles and API tokens.

This is the shared contract every protected endpoint uses: ``Depends(require(Role.X))``
gives the endpoint an authenticated :class:`Principal` or answers 401/403. API tokens are
random 256-bit secrets shown once and stored only as SHA-256 hashes (a slow password hash
adds nothing for secrets with that much entropy). Interactive login (password + TOTP)
builds on the same principal.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from fastapi import HTTPException, Request
from sqlmodel import Field, Session, SQLModel, select

from .models import utcnow

TOKEN_PREFIX = "tf_"


class Role(StrEnum):
    IT_ADMIN = "it_admin"
    TECHNICIAN = "technician"
    NIGHT_STAFF = "night_staff"
    AUDITOR = "auditor"


class StaffAccount(SQLModel, table=True):
    """A member of staff: a pseudonymous staff id, roles and teams (no names needed)."""

    id: str = Field(primary_key=True, max_length=64)
    roles: str = Field(default="", max_length=200)  # comma-separated Role values
    teams: str = Field(default="", max_length=400)  # comma-separated team/area ids
    active: bool = True
    created_at: datetime = Field(default_factory=utcnow)


class ApiToken(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(unique=True, max_length=64)
    staff_id: str = Field(foreign_key="staffaccount.id", index=True, max_length=64)
    role: str = Field(max_length=32)  # the one role this token acts with
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Principal:
    staff_id: str
    roles: frozenset[Role]
    teams: frozenset[str]

    def has(self, *roles: Role) -> bool:
        return bool(self.roles & set(roles))


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _split(text: str) -> list[str]:
    return [p for p in text.split(",") if p]


def issue_token(session: Session, staff_id: str, role: Role) -> str:
    """Create an API token acting as ``staff_id`` with ``role``; returns it (shown once)."""
    account = session.get(StaffAccount, staff_id)
    if account is None or not account.active or role.value not in _split(account.roles):
        raise ValueError(f"{staff_id} does not hold role {role.value}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(token_hash=_hash(token), staff_id=staff_id, role=role.value))
    return token


def revoke_token(session: Session, token: str) -> bool:
    row = session.exec(select(ApiToken).where(ApiToken.token_hash == _hash(token))).first()
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    session.add(row)
    return True


def principal_for_token(session: Session, token: str) -> Principal | None:
    if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
        return None
    row = session.exec(select(ApiToken).where(ApiToken.token_hash == _hash(token))).first()
    if row is None or row.revoked_at is not None:
        return None
    account = session.get(StaffAccount, row.staff_id)
    if account is None or not account.active or row.role not in _split(account.roles):
        return None  # a role removed from the account also disarms its tokens
    return Principal(account.id, frozenset({Role(row.role)}), frozenset(_split(account.teams)))


Authenticator = Callable[[Request], Coroutine[Any, Any, Principal | None]]


def require(*roles: Role) -> Callable[[Request], Coroutine[Any, Any, Principal]]:
    """FastAPI dependency: an authenticated principal holding one of ``roles``.

    The app must set ``app.state.authenticate`` (an :data:`Authenticator`).
    """

    async def dependency(request: Request) -> Principal:
        authenticate: Authenticator = request.app.state.authenticate
        principal = await authenticate(request)
        if principal is None:
            raise HTTPException(
                401, "authentication required", headers={"WWW-Authenticate": "Bearer"}
            )
        if roles and not principal.has(*roles):
            raise HTTPException(403, f"requires role {' or '.join(r.value for r in roles)}")
        return principal

    return dependency
