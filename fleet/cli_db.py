"""``tillsyn db``: migrate the schema explicitly (the service also upgrades at start)."""

from __future__ import annotations

from pathlib import Path

import click
from sqlalchemy import Engine

from . import migrate
from .config import load_settings
from .db import make_engine
from .errors import FleetError

config_opt = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Fleet TOML settings (for the database URL).",
)


def _engine(config_path: Path | None) -> Engine:
    try:
        return make_engine(load_settings(config_path).database_url)
    except FleetError as exc:
        raise click.ClickException(f"config: {exc}") from None


@click.group("db")
def db_group() -> None:
    """Database schema migrations (back up the database before upgrading)."""


@db_group.command("upgrade")
@config_opt
@click.option("--to", "revision", default="head", show_default=True, help="Target revision.")
def upgrade(config_path: Path | None, revision: str) -> None:
    """Migrate the schema to the newest revision (or --to)."""
    try:
        now = migrate.upgrade(_engine(config_path), revision)
    except FleetError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"database at revision {now}")


@db_group.command("current")
@config_opt
def current(config_path: Path | None) -> None:
    """Print the database's revision and the newest this version knows."""
    rev = migrate.current(_engine(config_path))
    click.echo(f"current: {rev or 'none (empty or made before migrations)'}")
    click.echo(f"head:    {migrate.head()}")


@db_group.command("check")
@config_opt
def check(config_path: Path | None) -> None:
    """Exit 1 unless the database is at the newest revision and matches the models."""
    engine = _engine(config_path)
    rev, head = migrate.current(engine), migrate.head()
    if rev != head:
        raise click.ClickException(f"database at {rev or 'no revision'}, code expects {head}")
    diffs = migrate.differences(engine)
    for diff in diffs:
        click.echo(f"differs: {diff}", err=True)
    if diffs:
        raise click.ClickException(f"schema differs from the models ({len(diffs)} differences)")
    click.echo(f"ok: at {head}, schema matches the models")


@db_group.command("revision")
@config_opt
@click.option("-m", "--message", required=True, help="What the revision changes.")
def revision(config_path: Path | None, message: str) -> None:
    """Developers: write a new revision from the models' difference to the (upgraded) database."""
    migrate.revision(_engine(config_path), message)
