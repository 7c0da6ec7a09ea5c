"""Click groups ``pki`` and ``broker``, mounted by the main ``tillsyn`` CLI.

    tillsyn pki init --dir var/pki
    tillsyn pki device dev-abc --dir var/pki
    tillsyn pki revoke dev-abc --dir var/pki
    tillsyn broker run --pki var/pki --workdir var/broker --port 8883
    tillsyn broker run ... --detach  /  tillsyn broker stop --workdir var/broker

Every :class:`~broker.errors.BrokerError` (and OS error) becomes one line on stderr
and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import functools
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import ParamSpec, TypeVar

import click

from broker.errors import BrokerError, BrokerStartError
from broker.launcher import MosquittoProcess, stop_by_pidfile
from broker.pki import (
    DEFAULT_CERT_DAYS,
    PkiPaths,
    init_pki,
    is_valid_device_id,
    issue_device_cert,
    revoke,
)

__all__ = ["broker", "pki"]

P = ParamSpec("P")
R = TypeVar("R")

_HEX_SERIAL = re.compile(r"0x[0-9a-fA-F]+|[0-9a-fA-F]{2}(:[0-9a-fA-F]{2})+")


def _one_line(exc: BrokerError) -> str:
    message = str(exc).splitlines()[0]
    if isinstance(exc, BrokerStartError):
        message = getattr(exc, "reason", message)
        lines = [line.strip() for line in exc.log_tail.splitlines() if line.strip()]
        # Mosquitto's own "Error: ..." line says why; warnings (run as root) do not.
        errors = [line for line in lines if "error" in line.lower()]
        if errors or lines:
            message = f"{message}: {(errors or lines)[-1]}"
    return message


def _friendly_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn library and OS errors into ``click.ClickException`` (one line, exit 1)."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except BrokerError as exc:
            raise click.ClickException(_one_line(exc)) from exc
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            raise click.ClickException(f"{exc.strerror or exc}{where}") from exc

    return wrapper


_dir_option = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("var/pki"),
    show_default=True,
    help="PKI directory.",
)
_days_option = click.option(
    "--days",
    type=click.IntRange(min=1),
    default=DEFAULT_CERT_DAYS,
    show_default=True,
    help="Certificate validity in days.",
)


@click.group("pki")
def pki() -> None:
    """Development PKI: CA, broker, fleet and device certificates, CRL."""


@pki.command("init")
@_dir_option
@click.option(
    "--host",
    "hosts",
    multiple=True,
    default=("localhost", "127.0.0.1"),
    show_default=True,
    help="Broker DNS name or IP for the server certificate (repeatable).",
)
@_days_option
@_friendly_errors
def pki_init(directory: Path, hosts: tuple[str, ...], days: int) -> None:
    """Create the CA, broker and fleet certificates and an empty CRL (idempotent)."""
    paths = init_pki(directory, broker_hosts=hosts, days=days)
    click.echo(f"PKI ready in {paths.directory}")


@pki.command("device")
@click.argument("device_id")
@_dir_option
@_days_option
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing certificate (the old one stays valid until revoked).",
)
@_friendly_errors
def pki_device(device_id: str, directory: Path, days: int, force: bool) -> None:
    """Issue a client certificate for DEVICE_ID (CN = device id)."""
    cert, key = issue_device_cert(directory, device_id, days=days, overwrite=force)
    click.echo(f"certificate: {cert}")
    click.echo(f"key:         {key}")


def _revocation_target(directory: Path, target: str) -> int | Path:
    if is_valid_device_id(target):
        cert = PkiPaths.for_directory(directory).device_cert(target)
        if not cert.exists():
            raise BrokerError(f"no certificate for {target} in {directory}")
        return cert
    if Path(target).is_file():
        return Path(target)
    if target.isdecimal():
        return int(target)
    if _HEX_SERIAL.fullmatch(target):
        return int(target.replace(":", "").removeprefix("0x").removeprefix("0X"), 16)
    raise BrokerError(
        f"{target!r} is not a device id, a certificate file or a serial (decimal or 0x-hex)"
    )


@pki.command("revoke")
@click.argument("target")
@_dir_option
@_friendly_errors
def pki_revoke(target: str, directory: Path) -> None:
    """Revoke TARGET: a device id, a certificate file, or a serial, and rewrite the CRL."""
    serial = revoke(directory, _revocation_target(directory, target))
    click.echo(f"revoked serial {serial:#x}; CRL rewritten")
    click.echo("apply it: restart the broker (SIGHUP only affects new connections)")


@click.group("broker")
def broker() -> None:
    """Run Mosquitto with the production config (dev stack)."""


def _raise_system_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@broker.command("run")
@click.option(
    "--pki",
    "pki_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("var/pki"),
    show_default=True,
    help="PKI directory (from `tillsyn pki init`).",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("var/broker"),
    show_default=True,
    help="Where the rendered config, ACL, data and log go.",
)
@click.option("--port", type=click.IntRange(1, 65535), default=8883, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address.")
@click.option("--detach", is_flag=True, help="Start in the background (pid file in workdir).")
@_friendly_errors
def broker_run(pki_dir: Path, workdir: Path, port: int, host: str, detach: bool) -> None:
    """Run Mosquitto in the foreground until Ctrl-C (or in the background)."""
    proc = MosquittoProcess(pki=pki_dir, workdir=workdir, port=port, host=host)
    if detach:
        proc.start(detached=True)
        click.echo(f"mosquitto pid {proc.pid} on {host}:{port}, log {proc.log_path}")
        return
    signal.signal(signal.SIGTERM, _raise_system_exit)
    proc.start()
    click.echo(f"mosquitto pid {proc.pid} on {host}:{port}, log {proc.log_path} (Ctrl-C stops)")
    try:
        while proc.is_running():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    else:
        raise click.ClickException(f"mosquitto exited unexpectedly; see {proc.log_path}")
    finally:
        proc.stop()
    click.echo("mosquitto stopped")


@broker.command("stop")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("var/broker"),
    show_default=True,
)
@_friendly_errors
def broker_stop(workdir: Path) -> None:
    """Stop a Mosquitto started with `broker run --detach`."""
    if stop_by_pidfile(workdir):
        click.echo("mosquitto stopped")
    else:
        click.echo("no running mosquitto for this workdir")
