"""``tillsyn``: fleet service, device agent, PKI, broker, dev stack and API clients.

Errors are one clear line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import sys

import click

from broker.cli import broker, pki
from firmware_agent.cli import agent
from firmware_agent.sim_cli import sim
from fleet.cli import commands, devices, fleet, look, visits, windows
from fleet.cli_audit import audit_group
from fleet.cli_db import db_group
from fleet.cli_pairing import device, inventory, pair
from fleet.cli_plans import GROUPS as PLAN_GROUPS
from fleet.cli_staff import staff

from . import logs
from .devstack import dev


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option(
    "--json-logs/--text-logs", default=None, help="Log format (default: JSON when not a terminal)."
)
@click.option(
    "--token",
    default=None,
    envvar="TILLSYN_TOKEN",
    help="API token for the API clients (default: $TILLSYN_TOKEN, else the dev stack's).",
)
@click.pass_context
def cli(ctx: click.Context, verbose: int, json_logs: bool | None, token: str | None) -> None:
    """Tillsyn Fleet: signed, fail-closed camera arming for night supervision."""
    logs.setup(verbose, json_lines=not sys.stderr.isatty() if json_logs is None else json_logs)
    if token:
        ctx.meta["tillsyn.token"] = token


for group in (fleet, agent, pki, broker, dev, devices, windows, visits, commands, look, staff):
    cli.add_command(group)
cli.add_command(audit_group)
cli.add_command(sim)  # simulated devices (firmware_agent/sim*.py)
cli.add_command(db_group)
for group in (pair, inventory, device):  # pairing and equipment (fleet/cli_pairing.py)
    cli.add_command(group)
for group in PLAN_GROUPS:  # plans, checks, escalations, night (fleet/cli_plans.py)
    cli.add_command(group)


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # last line of defence: one line, not a traceback
        click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
