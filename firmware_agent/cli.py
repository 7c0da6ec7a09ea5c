"""Command line of the device agent: ``run`` and ``check-config``.

Mounted in the main ``tillsyn`` CLI as ``tillsyn agent ...``, and runnable on a device as
``python -m firmware_agent run --config /etc/tillsyn-agent/agent.toml``.

Exit status: 0 after a clean stop (SIGTERM/SIGINT), 2 for a configuration error, 3 when
the persisted state is unusable (the agent refuses to start; see ``store.py``), 1 for
anything else.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import click

from .config import load_config
from .errors import AgentError, ConfigError, NotEnrolled, StoreError

__all__ = ["agent"]

log = logging.getLogger("firmware_agent")

EXIT_CONFIG = 2
EXIT_STATE = 3

_config_option = click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The agent's TOML config file.",
)


@click.group(name="agent")
def agent() -> None:
    """The device agent that runs on every home camera."""


@agent.command("run")
@_config_option
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
def run_command(config_path: Path, log_level: str) -> None:
    """Run the agent in the foreground until SIGTERM or SIGINT."""
    _setup_logging(log_level)
    try:
        asyncio.run(_serve(config_path))
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        sys.exit(EXIT_CONFIG)
    except StoreError as exc:
        log.error("refusing to start: %s", exc)
        sys.exit(EXIT_STATE)
    except AgentError as exc:
        log.error("agent failed: %s", exc)
        sys.exit(1)


@agent.command("check-config")
@_config_option
def check_config_command(config_path: Path) -> None:
    """Validate the config, the TLS files, the pinned keys and the persisted state."""
    from .link import make_ssl_context
    from .store import SeqStore

    try:
        try:
            config = load_config(config_path)
        except NotEnrolled as exc:
            from .enroll import load_enroll_settings

            enroll = load_enroll_settings(config_path).enroll
            click.echo(f"ok: {exc.why}; will enroll at {enroll.url} as serial {enroll.serial}")
            return
        make_ssl_context(config.tls)
        keys = config.command_keyring()
        last_seq = SeqStore(config.state_dir).load()
    except ConfigError as exc:
        click.echo(f"configuration error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except StoreError as exc:
        click.echo(f"state error: {exc}", err=True)
        sys.exit(EXIT_STATE)
    click.echo(
        f"ok: {config.device_id} ({config.kind.value}, fw {config.firmware_version}), "
        f"broker {config.broker.host}:{config.broker.port}, "
        f"{len(keys)} command key(s), camera {config.camera.type}, last seq {last_seq}"
    )


async def _serve(config_path: Path) -> None:
    from .agent import Agent

    loop = asyncio.get_running_loop()
    try:
        config = load_config(config_path)
    except NotEnrolled:
        if not await _enroll(config_path):
            return  # stopped while waiting for a technician
        config = load_config(config_path)
    node = Agent(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, node.request_stop)
    try:
        await node.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _enroll(config_path: Path) -> bool:
    """First boot: pair with the fleet (RFC 8628). False if stopped before that."""
    from .camera import build_display
    from .enroll import Enroller, load_enroll_settings

    settings = load_enroll_settings(config_path)
    enroller = Enroller(settings, display=build_display(settings.camera, settings.state_dir))
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(enroller.run(), name="enroll")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        log.info("stopped before pairing")
        return False
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return True


def _setup_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:  # the main tillsyn CLI may have configured logging already
        logging.basicConfig(
            level=level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    else:
        logging.getLogger("firmware_agent").setLevel(level.upper())
