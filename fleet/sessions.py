"""Server-side web sessions for interactive staff login, and the cookie that names them.

- The cookie holds 256 random bits; the database holds only their SHA-256, so a copy of
  the database does not let anyone act as a logged-in member of staff.
- Cookie: ``HttpOnly``, ``SameSite=Strict``, ``Path=/``, ``Secure`` when the request came
  over https (or always, per ``cookie_secure``); then it is named ``__Host-tillsyn`` so a
  sibling sub-domain cannot plant one.
- Stages: a password that checks out gives a short *pending* session (stage ``totp`` or
  ``enrol``, 5 minutes) that yields no principal; the second factor ends it and starts a
  *full* session under a fresh id (no session fixation across the privilege change).
- Expiry: idle (``session_idle_s`` without a request the person made; the live-update poll
  does not count) and absolute (``session_max_s`` from login, a night shift).
- CSRF: every unsafe request that authenticates by cookie must carry the session's CSRF
  token (form field ``csrf`` or header ``X-CSRF-Token``) or be a JSON request whose
  ``Origin`` is this service (what a page script sends; no other site can, as no CORS is
  granted), on top of ``SameSite=Strict``.
- Roles and teams are read from the account on every request, so a role change or a
  deactivated account takes effect at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from fastapi import HTTPException, Request, Response
from sqlalchemy import delete
from sqlmodel import Field, Session, SQLModel, col

from . import audit
from .auth import Principal, Role, StaffAccount

if TYPE_CHECKING:
    from .config import FleetSettings
    from .service import FleetService

PENDING_TTL_S = 300.0
TOUCH_EVERY_S = 30.0  # last-seen writes at most this often per session
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
POLL_HEADER = "x-tillsyn-poll"  # set by the page's live-update script: not user activity
COOKIE_PLAIN = "tillsyn"
COOKIE_SECURE = "__Host-tillsyn"


class WebSession(SQLModel, table=True):
    id_hash: str = Field(primary_key=True, max_length=64)  # sha256 of the cookie value
    staff_id: str = Field(foreign_key="staffaccount.id", index=True, max_length=64)
    stage: str = Field(max_length=8)  # "totp" | "enrol" (pending) | "full"
    csrf: str = Field(max_length=64)
    created_at: float
    last_seen_at: float
    expires_at: float  # absolute end


@dataclass(frozen=True, slots=True)
class Current:
    """The session behind a request: who, at which stage, and its CSRF token."""

    staff_id: str
    stage: str
    csrf: str


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def create(
    session: Session, staff_id: str, stage: str, *, now: float, max_s: float
) -> tuple[str, WebSession]:
    """A new session; returns the cookie value (shown to the browser only) and the row."""
    session.execute(delete(WebSession).where(col(WebSession.expires_at) < now))
    value = secrets.token_urlsafe(32)
    ttl = max_s if stage == "full" else min(PENDING_TTL_S, max_s)
    row = WebSession(
        id_hash=_hash(value),
        staff_id=staff_id,
        stage=stage,
        csrf=secrets.token_urlsafe(24),
        created_at=now,
        last_seen_at=now,
        expires_at=now + ttl,
    )
    session.add(row)
    return value, row


def lookup(
    session: Session, value: str, *, now: float, idle_s: float, touch: bool = True
) -> WebSession | None:
    """The live session for a cookie value, or ``None`` (unknown, expired or idle)."""
    if not value or len(value) > 128:
        return None
    row = session.get(WebSession, _hash(value))
    if row is None:
        return None
    idle_limit = idle_s if row.stage == "full" else PENDING_TTL_S
    if now >= row.expires_at or now - row.last_seen_at >= idle_limit:
        session.delete(row)
        audit.append(
            session,
            ts=now,
            actor=row.staff_id,
            action="session.expired",
            subject=row.staff_id,
            why="absolute" if now >= row.expires_at else "idle",
        )
        return None
    if touch and now - row.last_seen_at >= TOUCH_EVERY_S:
        row.last_seen_at = now
        session.add(row)
    return row


def end(session: Session, value: str, *, now: float, why: str = "logout") -> str | None:
    """End a session (logout). Returns whose it was."""
    row = session.get(WebSession, _hash(value)) if value and len(value) <= 128 else None
    if row is None:
        return None
    session.delete(row)
    if row.stage == "full":
        audit.append(
            session, ts=now, actor=row.staff_id, action="logout", subject=row.staff_id, why=why
        )
    return row.staff_id


def end_all(session: Session, staff_id: str) -> int:
    """End every session of an account (role change, password reset, deactivation)."""
    result = session.execute(delete(WebSession).where(col(WebSession.staff_id) == staff_id))
    return int(getattr(result, "rowcount", 0) or 0)


def principal_for(session: Session, row: WebSession) -> Principal | None:
    if row.stage != "full":
        return None
    return account_principal(session, row.staff_id)


def account_principal(session: Session, staff_id: str) -> Principal | None:
    """All the roles and teams of an active account (what a full web session acts with)."""
    account = session.get(StaffAccount, staff_id)
    if account is None or not account.active:
        return None
    roles = frozenset(Role(r) for r in account.roles.split(",") if r in Role._value2member_map_)
    teams = frozenset(t for t in account.teams.split(",") if t)
    return Principal(account.id, roles, teams)


# --- HTTP ----------------------------------------------------------------------------------


def is_https(request: Request) -> bool:
    # Behind a TLS-terminating proxy, uvicorn's --proxy-headers sets the scheme.
    return request.url.scheme == "https"


def cookie_name(settings: FleetSettings, request: Request) -> str:
    secure = settings.cookie_secure == "always" or (
        settings.cookie_secure == "auto" and is_https(request)
    )
    return COOKIE_SECURE if secure else COOKIE_PLAIN


def read_cookie(request: Request) -> str | None:
    return request.cookies.get(COOKIE_SECURE) or request.cookies.get(COOKIE_PLAIN)


def set_cookie(
    response: Response, settings: FleetSettings, request: Request, value: str, max_age: float
) -> None:
    name = cookie_name(settings, request)
    response.set_cookie(
        name,
        value,
        max_age=int(max_age),
        path="/",
        secure=name == COOKIE_SECURE,
        httponly=True,
        samesite="strict",
    )


def clear_cookie(response: Response, settings: FleetSettings, request: Request) -> None:
    name = cookie_name(settings, request)
    response.delete_cookie(
        name, path="/", secure=name == COOKIE_SECURE, httponly=True, samesite="strict"
    )


async def form(request: Request) -> dict[str, str]:
    """A url-encoded form body as a dict (first value of each field); other bodies: {}."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        return {}
    body = await request.body()  # cached on the request: the endpoint can read it again
    if len(body) > 64 * 1024:
        raise HTTPException(413, "form too large")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items() if v}


def _same_origin_json(request: Request) -> bool:
    """A JSON request the browser says comes from this origin. Another site cannot send
    one: a cross-origin JSON POST needs a CORS preflight, which this service never grants."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    origin = request.headers.get("origin")
    own = f"{request.url.scheme}://{request.url.netloc}"
    return ctype == "application/json" and origin is not None and origin == own


async def check_csrf(request: Request, current: Current) -> None:
    """Unsafe cookie-authenticated requests carry the session's token (form field ``csrf``
    or header ``X-CSRF-Token``), or are JSON from this very origin (page scripts)."""
    if request.method in SAFE_METHODS or _same_origin_json(request):
        return
    sent = request.headers.get("x-csrf-token") or (await form(request)).get("csrf", "")
    if not sent or not hmac.compare_digest(sent.encode(), current.csrf.encode()):
        raise HTTPException(403, "CSRF token missing or wrong")


async def authenticate(service: FleetService, request: Request) -> Principal | None:
    """The principal of a full session named by the request's cookie (CSRF-checked)."""
    value = read_cookie(request)
    if value is None:
        return None
    now = service.clock()
    settings = service.settings
    touch = request.headers.get(POLL_HEADER) is None

    def q(s: Session) -> tuple[Principal | None, Current] | None:
        row = lookup(s, value, now=now, idle_s=settings.session_idle_s, touch=touch)
        if row is None:
            return None
        return principal_for(s, row), Current(row.staff_id, row.stage, row.csrf)

    found: tuple[Principal | None, Current] | None = await service.db(service.ops.run, q)
    if found is None:
        return None
    principal, current = found
    request.state.web = current
    if principal is None:
        return None
    await check_csrf(request, current)
    return principal
