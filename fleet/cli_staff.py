"""``tillsyn staff``: accounts and API tokens, run on the server against the database."""

from __future__ import annotations

import time
from pathlib import Path

import click
from sqlmodel import Session

from . import audit, auth
from .config import load_settings
from .db import init_db, make_engine
from .errors import FleetError

config_opt = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Fleet TOML settings (for the database URL).",
)


def _session(config_path: Path | None) -> Session:
    try:
        settings = load_settings(config_path)
    except FleetError as exc:
        raise click.ClickException(f"config: {exc}") from None
    engine = make_engine(settings.database_url)
    init_db(engine)
    return Session(engine)


@click.group()
def staff() -> None:
    """Staff accounts, roles and API tokens."""


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
    """Create or update STAFF_ID with ROLES and TEAMS."""

    with _session(config_path) as session:
        account = session.get(auth.StaffAccount, staff_id) or auth.StaffAccount(id=staff_id)
        account.roles, account.teams = ",".join(roles), ",".join(teams)
        session.add(account)
        audit.append(
            session,
            ts=time.time(),
            actor="cli",
            action="staff.roles",
            subject=staff_id,
            roles=list(roles),
            teams=list(teams),
        )
        session.commit()
    click.echo(f"{staff_id}: roles {', '.join(roles)}; teams {', '.join(teams) or '-'}")


@staff.command("token")
@click.argument("staff_id")
@click.option("--role", required=True, type=click.Choice([r.value for r in auth.Role]))
@config_opt
def token(staff_id: str, role: str, config_path: Path | None) -> None:
    """Issue an API token for STAFF_ID acting as ROLE (printed once)."""

    with _session(config_path) as session:
        try:
            secret = auth.issue_token(session, staff_id, auth.Role(role))
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        audit.append(
            session, ts=time.time(), actor="cli", action="token.issued", subject=staff_id, role=role
        )
        session.commit()
    click.echo(secret)


@staff.command("revoke-token")
@click.argument("secret")
@config_opt
def revoke(secret: str, config_path: Path | None) -> None:
    """Revoke an API token."""

    with _session(config_path) as session:
        if not auth.revoke_token(session, secret):
            raise click.ClickException("no such active token")
        audit.append(session, ts=time.time(), actor="cli", action="token.revoked")
        session.commit()
    click.echo("revoked")
