"""Interactive staff login: argon2id passwords, a TOTP second factor (RFC 6238), lockout.

The account itself (id, roles, teams) is :class:`fleet.auth.StaffAccount`; what a person
logs in with lives here, in its own table, so API tokens and interactive login share one
principal and one role model.

- Passwords: argon2id via ``argon2-cffi`` (RFC 9106 parameters), re-hashed on login when
  the parameters change. Unknown accounts cost the same hash as known ones.
- TOTP: ``pyotp``, 6 digits, 30 s steps, one step of clock drift either way; a code is
  accepted once (the last used step is kept), so a shoulder-surfed code cannot be replayed.
- TOTP secrets are encrypted at rest with AES-256-GCM (:class:`SecretBox`), the key in a
  file beside the command signing key (0600, created on first start); the staff id is the
  associated data, so a secret copied onto another account's row does not decrypt.
- Lockout: ``max_failures`` consecutive failed passwords or codes lock the account for
  ``lockout_s``; every failure, lockout and success is in the audit log. No password,
  code or secret is ever logged.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import pyotp
import segno
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlmodel import Field, Session, SQLModel

from . import audit
from .auth import Role, StaffAccount
from .errors import ConfigError, FleetError

log = logging.getLogger(__name__)

ISSUER = "Tillsyn Fleet"
TOTP_STEP_S = 30
TOTP_DRIFT_STEPS = 1
MIN_PASSWORD_LEN = 12
MAX_PASSWORD_LEN = 256

_hasher = PasswordHasher()
# Verified against when the account is unknown, so the answer takes as long either way.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class AccountError(FleetError):
    """A refused account operation (weak password, unknown account, ...)."""


class StaffCredential(SQLModel, table=True):
    """How one staff account logs in interactively (API tokens live in ``ApiToken``)."""

    staff_id: str = Field(primary_key=True, foreign_key="staffaccount.id", max_length=64)
    password_hash: str | None = Field(default=None, max_length=255)
    password_set_at: float | None = None
    totp_secret: str | None = Field(default=None, max_length=255)  # SecretBox ciphertext
    totp_enrolled_at: float | None = None  # None: not enrolled yet (enrolment on next login)
    totp_pending: str | None = Field(default=None, max_length=255)  # shown, not confirmed
    totp_last_step: int = 0  # highest accepted 30 s step: each code works once
    failed_attempts: int = 0
    locked_until: float | None = None


# --- TOTP secrets at rest ------------------------------------------------------------------


class SecretBox:
    """AES-256-GCM with a key file; the staff id is bound in as associated data."""

    VERSION = "v1"

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    @classmethod
    def load_or_create(cls, path: Path) -> SecretBox:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process made it first: use theirs
                return cls.load_or_create(path)
            with os.fdopen(fd, "wb") as fh:
                fh.write(base64.b64encode(AESGCM.generate_key(bit_length=256)) + b"\n")
            log.info("created TOTP secret key file")
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ConfigError("totp_key_file", f"{path} is readable by others (mode {mode:o})")
        try:
            key = base64.b64decode(path.read_bytes().strip(), validate=True)
        except ValueError:
            raise ConfigError("totp_key_file", f"{path} is not a base64 key") from None
        if len(key) != 32:
            raise ConfigError("totp_key_file", f"{path} does not hold a 256-bit key")
        return cls(key)

    def seal(self, staff_id: str, secret: str) -> str:
        nonce = os.urandom(12)
        ct = self._aead.encrypt(nonce, secret.encode(), staff_id.encode())
        return f"{self.VERSION}:{base64.urlsafe_b64encode(nonce + ct).decode()}"

    def open(self, staff_id: str, sealed: str) -> str:
        version, _, body = sealed.partition(":")
        if version != self.VERSION:
            raise AccountError("TOTP secret in an unknown format")
        raw = base64.urlsafe_b64decode(body.encode())
        try:
            return self._aead.decrypt(raw[:12], raw[12:], staff_id.encode()).decode()
        except InvalidTag:
            raise AccountError("TOTP secret does not decrypt with this key") from None


# --- results -------------------------------------------------------------------------------


class Step(StrEnum):
    """What a successful password step leads to."""

    TOTP = "totp"  # enter a code
    ENROL = "enrol"  # no second factor yet: enrol one now


class Refusal(StrEnum):
    BAD = "bad"  # wrong id, password or code (never says which)
    LOCKED = "locked"


@dataclass(frozen=True, slots=True)
class PasswordResult:
    staff_id: str | None
    step: Step | None
    refusal: Refusal | None


@dataclass(frozen=True, slots=True)
class Policy:
    max_failures: int = 5
    lockout_s: float = 900.0


# --- administration ------------------------------------------------------------------------


def _credential(session: Session, staff_id: str) -> StaffCredential:
    if session.get(StaffAccount, staff_id) is None:
        raise AccountError(f"no staff account {staff_id!r}")
    return session.get(StaffCredential, staff_id) or StaffCredential(staff_id=staff_id)


def check_password_strength(password: str) -> None:
    if len(password) < MIN_PASSWORD_LEN:
        raise AccountError(f"password must be at least {MIN_PASSWORD_LEN} characters")
    if len(password) > MAX_PASSWORD_LEN:
        raise AccountError(f"password must be at most {MAX_PASSWORD_LEN} characters")


def set_password(session: Session, staff_id: str, password: str, *, now: float, actor: str) -> None:
    """Set (or reset) a password; also clears a lockout. Audited, the password is not."""
    check_password_strength(password)
    cred = _credential(session, staff_id)
    cred.password_hash = _hasher.hash(password)
    cred.password_set_at = now
    cred.failed_attempts, cred.locked_until = 0, None
    session.add(cred)
    audit.append(session, ts=now, actor=actor, action="staff.password_set", subject=staff_id)


def reset_totp(session: Session, staff_id: str, *, now: float, actor: str) -> None:
    """Forget the second factor: the next login enrols a new one (lost phone)."""
    cred = _credential(session, staff_id)
    cred.totp_secret = cred.totp_pending = None
    cred.totp_enrolled_at = None
    cred.totp_last_step = 0
    session.add(cred)
    audit.append(session, ts=now, actor=actor, action="staff.totp_reset", subject=staff_id)


def unlock(session: Session, staff_id: str, *, now: float, actor: str) -> None:
    cred = _credential(session, staff_id)
    cred.failed_attempts, cred.locked_until = 0, None
    session.add(cred)
    audit.append(session, ts=now, actor=actor, action="staff.unlocked", subject=staff_id)


def set_roles(
    session: Session,
    staff_id: str,
    roles: list[Role],
    teams: list[str],
    *,
    now: float,
    actor: str,
) -> StaffAccount:
    """Create or change an account's roles and teams (a role change, audited)."""
    account = session.get(StaffAccount, staff_id)
    before = (account.roles, account.teams) if account else None
    account = account or StaffAccount(id=staff_id)
    account.roles = ",".join(r.value for r in roles)
    account.teams = ",".join(teams)
    session.add(account)
    audit.append(
        session,
        ts=now,
        actor=actor,
        action="staff.roles",
        subject=staff_id,
        roles=[r.value for r in roles],
        teams=list(teams),
        before=list(before) if before else None,
    )
    return account


# --- login ---------------------------------------------------------------------------------


def _fail(
    session: Session, cred: StaffCredential, policy: Policy, now: float, why: str, ip: str | None
) -> Refusal:
    cred.failed_attempts += 1
    audit.append(
        session,
        ts=now,
        actor=cred.staff_id,
        action="login.failed",
        subject=cred.staff_id,
        why=why,
        attempt=cred.failed_attempts,
        ip=ip,
    )
    if cred.failed_attempts >= policy.max_failures:
        cred.locked_until = now + policy.lockout_s
        cred.failed_attempts = 0
        audit.append(
            session,
            ts=now,
            actor="fleet",
            action="login.locked",
            subject=cred.staff_id,
            until=cred.locked_until,
            ip=ip,
        )
        log.warning("account locked after repeated failed logins")
    session.add(cred)
    return Refusal.BAD


def _locked(cred: StaffCredential, now: float) -> bool:
    return cred.locked_until is not None and now < cred.locked_until


def check_password(
    session: Session,
    staff_id: str,
    password: str,
    *,
    now: float,
    policy: Policy,
    ip: str | None = None,
) -> PasswordResult:
    """First step of a login. Never says whether the id or the password was wrong."""
    account = session.get(StaffAccount, staff_id) if 0 < len(staff_id) <= 64 else None
    cred = session.get(StaffCredential, staff_id) if account else None
    if account is None or cred is None or cred.password_hash is None or not account.active:
        with contextlib.suppress(VerificationError):  # same cost as a real check
            _hasher.verify(_DUMMY_HASH, password[:MAX_PASSWORD_LEN] or "-")
        audit.append(
            session,
            ts=now,
            actor="anonymous",
            action="login.failed",
            subject=account.id if account else None,
            why="unknown_or_inactive",
            ip=ip,
        )
        return PasswordResult(None, None, Refusal.BAD)
    if _locked(cred, now):
        audit.append(
            session,
            ts=now,
            actor=staff_id,
            action="login.failed",
            subject=staff_id,
            why="locked",
            ip=ip,
        )
        return PasswordResult(None, None, Refusal.LOCKED)
    try:
        _hasher.verify(cred.password_hash, password[:MAX_PASSWORD_LEN])
    except (VerificationError, InvalidHashError):
        refusal = _fail(session, cred, policy, now, "password", ip)
        return PasswordResult(None, None, Refusal.LOCKED if _locked(cred, now) else refusal)
    if _hasher.check_needs_rehash(cred.password_hash):
        cred.password_hash = _hasher.hash(password)
        session.add(cred)
    step = Step.TOTP if cred.totp_enrolled_at is not None else Step.ENROL
    return PasswordResult(staff_id, step, None)


def _accept_code(cred: StaffCredential, secret: str, code: str, now: float) -> bool:
    code = code.strip().replace(" ", "")
    if len(code) != 6 or not code.isdigit():
        return False
    totp = pyotp.TOTP(secret, interval=TOTP_STEP_S)
    current = int(now // TOTP_STEP_S)
    for step in range(current - TOTP_DRIFT_STEPS, current + TOTP_DRIFT_STEPS + 1):
        if step > cred.totp_last_step and hmac.compare_digest(totp.generate_otp(step), code):
            cred.totp_last_step = step
            return True
    return False


def check_totp(
    session: Session,
    staff_id: str,
    code: str,
    box: SecretBox,
    *,
    now: float,
    policy: Policy,
    ip: str | None = None,
) -> Refusal | None:
    """Second step: ``None`` means logged in (audited ``login``)."""
    cred = session.get(StaffCredential, staff_id)
    if cred is None or cred.totp_secret is None:
        return Refusal.BAD
    if _locked(cred, now):
        audit.append(
            session, ts=now, actor=staff_id, action="login.failed", subject=staff_id, why="locked"
        )
        return Refusal.LOCKED
    if not _accept_code(cred, box.open(staff_id, cred.totp_secret), code, now):
        _fail(session, cred, policy, now, "totp", ip)
        return Refusal.LOCKED if _locked(cred, now) else Refusal.BAD
    cred.failed_attempts = 0
    session.add(cred)
    audit.append(session, ts=now, actor=staff_id, action="login", subject=staff_id, ip=ip)
    return None


@dataclass(frozen=True, slots=True)
class Enrolment:
    secret: str  # base32, for typing into an app by hand
    uri: str  # otpauth:// URI
    qr_svg: str  # inline SVG of the URI


def begin_enrolment(session: Session, staff_id: str, box: SecretBox) -> Enrolment:
    """A new pending secret (shown once as a QR code); replaces an earlier pending one."""
    cred = _credential(session, staff_id)
    if cred.totp_enrolled_at is not None:
        raise AccountError("a second factor is already enrolled; ask IT to reset it")
    secret = pyotp.random_base32()
    cred.totp_pending = box.seal(staff_id, secret)
    session.add(cred)
    return enrolment_view(staff_id, secret)


def pending_enrolment(session: Session, staff_id: str, box: SecretBox) -> Enrolment | None:
    cred = session.get(StaffCredential, staff_id)
    if cred is None or cred.totp_pending is None or cred.totp_enrolled_at is not None:
        return None
    return enrolment_view(staff_id, box.open(staff_id, cred.totp_pending))


def enrolment_view(staff_id: str, secret: str) -> Enrolment:
    uri = pyotp.TOTP(secret, interval=TOTP_STEP_S).provisioning_uri(
        name=staff_id, issuer_name=ISSUER
    )
    qr = segno.make(uri, error="m")
    svg = qr.svg_inline(scale=5, dark="#000", light="#fff", omitsize=False)
    return Enrolment(secret, uri, svg)


def confirm_enrolment(
    session: Session,
    staff_id: str,
    code: str,
    box: SecretBox,
    *,
    now: float,
    policy: Policy,
    ip: str | None = None,
) -> Refusal | None:
    """The first code from the app proves the secret arrived: it becomes the factor."""
    cred = session.get(StaffCredential, staff_id)
    if cred is None or cred.totp_pending is None:
        return Refusal.BAD
    if _locked(cred, now):
        return Refusal.LOCKED
    secret = box.open(staff_id, cred.totp_pending)
    if not _accept_code(cred, secret, code, now):
        _fail(session, cred, policy, now, "totp_enrol", ip)
        return Refusal.LOCKED if _locked(cred, now) else Refusal.BAD
    cred.totp_secret, cred.totp_pending = box.seal(staff_id, secret), None
    cred.totp_enrolled_at = now
    cred.failed_attempts = 0
    session.add(cred)
    audit.append(session, ts=now, actor=staff_id, action="staff.totp_enrolled", subject=staff_id)
    audit.append(session, ts=now, actor=staff_id, action="login", subject=staff_id, ip=ip)
    return None


def credential_state(session: Session, staff_id: str, now: float) -> dict[str, object]:
    """What an admin may see about a login (never the hash or the secret)."""
    cred = session.get(StaffCredential, staff_id)
    if cred is None:
        return {"password": False, "totp": False, "locked": False}
    return {
        "password": cred.password_hash is not None,
        "totp": cred.totp_enrolled_at is not None,
        "locked": _locked(cred, now),
        "failed_attempts": cred.failed_attempts,
    }
