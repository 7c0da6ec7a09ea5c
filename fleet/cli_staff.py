"""``tillsyn staff``: accounts, passwords, second factors and API tokens, on the server.

Every change is audited with the actor ``cli`` (the server's operator); no password, code
or token is ever written to the log.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import click
from sqlmodel import Session, col, select

from . import accounts, audit, auth, sessions
from .config import load_settings
from .db import init_db, make_engine
from .errors import FleetError
from .models import utcnow

config_opt = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Fleet TOML settings (for the database URL).",
)


def open_session(config_path: Path | None) -> Session:
    try:
        settings = load_settings(config_path)
    except FleetError as exc:
        raise click.ClickException(f"config: {exc}") from None
    engine = make_engine(settings.database_url)
    init_db(engine)
    return Session(engine, expire_on_commit=False)


_session = open_session  # older name


@click.group()
def staff() -> None:
    """Staff accounts, roles, passwords, second factors and API tokens."""


@staff.command("add")
@click.argument("staff_id")
@click.option(
    "--role", "roles", multiple=True, required=True, type=click.Choice([r.value for r in auth.Role])
)
@click.option("--team", "teams", multiple=True, help="Team/area id (repeatable).")
@config_opt
def add(
    staff_id: str, roles: tuple[str, ...], teams: tuple[str, ...], config_path: Path | None
) -> None:
    """Create or update STAFF_ID with ROLES and TEAMS (ends the account's web sessions)."""

    with open_session(config_path) as session:
        accounts.set_roles(
            session,
            staff_id,
            [auth.Role(r) for r in roles],
            list(teams),
            now=time.time(),
            actor="cli",
        )
        sessions.end_all(session, staff_id)
        session.commit()
    click.echo(f"{staff_id}: roles {', '.join(roles)}; teams {', '.join(teams) or '-'}")


@staff.command("list")
@config_opt
def list_cmd(config_path: Path | None) -> None:
    """Accounts with roles, teams and login state."""
    now = time.time()
    with open_session(config_path) as session:
        for account in session.exec(select(auth.StaffAccount).order_by(auth.StaffAccount.id)):
            state = accounts.credential_state(session, account.id, now)
            flags = [k for k in ("password", "totp", "locked") if state.get(k)]
            click.echo(
                f"{account.id:<20} {'active' if account.active else 'inactive':<8} "
                f"roles={account.roles or '-'} teams={account.teams or '-'} "
                f"login={'+'.join(flags) or '-'}"
            )


@staff.command("password")
@click.argument("staff_id")
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the password from stdin.")
@config_opt
def password(staff_id: str, from_stdin: bool, config_path: Path | None) -> None:
    """Set STAFF_ID's password (first login then enrols the second factor)."""
    if from_stdin:
        secret = sys.stdin.readline().rstrip("\n")
    else:
        secret = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    with open_session(config_path) as session:
        try:
            accounts.set_password(session, staff_id, secret, now=time.time(), actor="cli")
        except accounts.AccountError as exc:
            raise click.ClickException(str(exc)) from None
        sessions.end_all(session, staff_id)
        session.commit()
    click.echo(f"{staff_id}: password set")


@staff.command("reset-2fa")
@click.argument("staff_id")
@config_opt
def reset_2fa(staff_id: str, config_path: Path | None) -> None:
    """Forget STAFF_ID's authenticator (lost phone): the next login enrols a new one."""
    with open_session(config_path) as session:
        try:
            accounts.reset_totp(session, staff_id, now=time.time(), actor="cli")
        except accounts.AccountError as exc:
            raise click.ClickException(str(exc)) from None
        sessions.end_all(session, staff_id)
        session.commit()
    click.echo(f"{staff_id}: second factor reset")


@staff.command("unlock")
@click.argument("staff_id")
@config_opt
def unlock(staff_id: str, config_path: Path | None) -> None:
    """Lift a lockout after repeated failed logins."""
    with open_session(config_path) as session:
        try:
            accounts.unlock(session, staff_id, now=time.time(), actor="cli")
        except accounts.AccountError as exc:
            raise click.ClickException(str(exc)) from None
        session.commit()
    click.echo(f"{staff_id}: unlocked")


@staff.command("deactivate")
@click.argument("staff_id")
@config_opt
def deactivate(staff_id: str, config_path: Path | None) -> None:
    """Disable an account: its sessions end and its tokens stop working at once."""
    with open_session(config_path) as session:
        account = session.get(auth.StaffAccount, staff_id)
        if account is None:
            raise click.ClickException(f"no staff account {staff_id!r}")
        account.active = False
        session.add(account)
        sessions.end_all(session, staff_id)
        audit.append(
            session, ts=time.time(), actor="cli", action="staff.deactivated", subject=staff_id
        )
        session.commit()
    click.echo(f"{staff_id}: deactivated")


@staff.command("token")
@click.argument("staff_id")
@click.option("--role", required=True, type=click.Choice([r.value for r in auth.Role]))
@config_opt
def token(staff_id: str, role: str, config_path: Path | None) -> None:
    """Issue an API token for STAFF_ID acting as ROLE (printed once)."""

    with open_session(config_path) as session:
        try:
            secret = auth.issue_token(session, staff_id, auth.Role(role))
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        session.flush()
        row = session.exec(
            select(auth.ApiToken).where(auth.ApiToken.token_hash == _token_hash(secret))
        ).one()
        audit.append(
            session,
            ts=time.time(),
            actor="cli",
            action="token.issued",
            subject=staff_id,
            role=role,
            token_id=row.id,
        )
        session.commit()
    click.echo(secret)


def _token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@staff.command("tokens")
@click.argument("staff_id", required=False)
@config_opt
def tokens(staff_id: str | None, config_path: Path | None) -> None:
    """List API tokens (ids, never the secrets)."""
    with open_session(config_path) as session:
        stmt = select(auth.ApiToken).order_by(col(auth.ApiToken.id))
        if staff_id:
            stmt = stmt.where(auth.ApiToken.staff_id == staff_id)
        for row in session.exec(stmt):
            state = "revoked" if row.revoked_at else "active"
            click.echo(f"{row.id:>5}  {row.staff_id:<20} {row.role:<12} {state}")


@staff.command("revoke-token")
@click.argument("secret", required=False)
@click.option("--id", "token_id", type=int, default=None, help="Revoke by token id instead.")
@config_opt
def revoke(secret: str | None, token_id: int | None, config_path: Path | None) -> None:
    """Revoke an API token, by its secret or by --id."""
    with open_session(config_path) as session:
        if token_id is not None:
            row = session.get(auth.ApiToken, token_id)
        elif secret:
            row = session.exec(
                select(auth.ApiToken).where(auth.ApiToken.token_hash == _token_hash(secret))
            ).first()
        else:
            raise click.ClickException("give the token or --id")
        if row is None or row.revoked_at is not None:
            raise click.ClickException("no such active token")
        row.revoked_at = utcnow()
        session.add(row)
        audit.append(
            session,
            ts=time.time(),
            actor="cli",
            action="token.revoked",
            subject=row.staff_id,
            token_id=row.id,
        )
        session.commit()
    click.echo("revoked")
