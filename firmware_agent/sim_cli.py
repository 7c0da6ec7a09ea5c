"""``tillsyn sim``: run N simulated devices (real agents) against a broker.

Certificates: with ``--pki-dir`` (a CA with its key) the missing device certificates are
issued in one batch into ``CERT_DIR/<CA fingerprint>/`` (default CERT_DIR:
``PKI_DIR/sim-devices``) and reused by the next run; without the CA key they must be there
already (``--issue-only`` makes them, e.g. in a one-shot container that holds the key).

State: every device keeps its seq store in its own directory, by default on tmpfs
(``/dev/shm/tillsyn-sim-<uid>/<CA and command key fingerprint>/``) so that thousands of
fsyncs cost nothing; keyed by the fleet's command key, so a new fleet gets fresh devices.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

import click

from broker.pki import issue_device_certs
from tillsyn_protocol import load_public_key

from .sim import Fault, SimSettings, device_ids
from .sim_control import Coordinator, LocalBackend, serve
from .sim_fleet import register_over_api

__all__ = ["parse_rates", "sim"]

log = logging.getLogger("firmware_agent.sim")

_UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_rates(specs: tuple[str, ...]) -> dict[Fault, float]:
    """``die=0.01/h,hang=2/d`` -> per device per second, by fault."""
    rates: dict[Fault, float] = {}
    for spec in ",".join(specs).split(","):
        if not spec.strip():
            continue
        kind, _, value = spec.strip().partition("=")
        number, _, unit = value.partition("/")
        try:
            fault = Fault(kind)
            rates[fault] = float(number) / _UNITS[unit or "h"]
        except (ValueError, KeyError):
            raise click.BadParameter(
                f"{spec!r}: expected KIND=RATE[/s|/min|/h|/d] with KIND one of "
                + ", ".join(f.value for f in Fault),
                param_hint="--fault-rate",
            ) from None
    return rates


def _fingerprint(*files: Path) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _default_state_root(key: str) -> Path:
    shm = Path("/dev/shm")  # noqa: S108 (a per-user directory below it, mode 0700)
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return base / f"tillsyn-sim-{os.getuid()}" / key


@click.command("sim")
@click.option("-n", "--devices", default=100, show_default=True, help="How many devices.")
@click.option("--prefix", default="dev-sim", show_default=True, help="Device id prefix.")
@click.option("--first", default=0, show_default=True, help="Index of the first device.")
@click.option("--broker-host", default="127.0.0.1", show_default=True)
@click.option("--broker-port", default=8883, show_default=True)
@click.option(
    "--pki-dir", type=click.Path(path_type=Path), help="CA (ca.crt, ca.key) to issue with."
)
@click.option("--ca-file", type=click.Path(path_type=Path), help="CA certificate [PKI_DIR/ca.crt].")
@click.option(
    "--cert-dir", type=click.Path(path_type=Path), help="Certificate cache [PKI_DIR/sim-devices]."
)
@click.option(
    "--command-key",
    "command_keys",
    multiple=True,
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="The fleet's command public key (PEM); repeatable.",
)
@click.option("--state-dir", type=click.Path(path_type=Path), help="Per-device state root.")
@click.option("--heartbeat", default=30.0, show_default=True, help="Heartbeat interval, s.")
@click.option("--keepalive", default=30, show_default=True, help="MQTT keepalive, s.")
@click.option("--reconnect-min", default=1.0, show_default=True, help="Backoff floor, s.")
@click.option("--reconnect-max", default=60.0, show_default=True, help="Backoff ceiling, s.")
@click.option("--ramp", type=float, help="Spread the boots over this many s [devices/200].")
@click.option("--processes", default=1, show_default=True, help="Worker processes.")
@click.option("--direct", is_flag=True, help="No per-device relay (no hang/drop faults).")
@click.option(
    "--fault-rate",
    "fault_rates",
    multiple=True,
    help="Random faults, KIND=RATE per device, e.g. die=0.01/h (repeat or comma-separate).",
)
@click.option("--recover-after", default=120.0, show_default=True, help="Random faults last, s.")
@click.option("--control-port", type=int, help="Also take commands on 127.0.0.1:PORT.")
@click.option("--register", "register_url", help="Register the devices at this fleet API URL.")
@click.option("--token", envvar="TILLSYN_TOKEN", help="API token for --register.")
@click.option("--token-file", type=click.Path(path_type=Path), help="File holding the token.")
@click.option("--duration", default=0.0, help="Stop after this many s (0: when told).")
@click.option("--seed", type=int, help="Random seed (starts and faults).")
@click.option("--issue-only", is_flag=True, help="Issue the certificates, then exit.")
@click.option("--agent-log-level", default="ERROR", show_default=True)
@click.pass_context
def sim(
    ctx: click.Context,
    devices: int,
    prefix: str,
    first: int,
    broker_host: str,
    broker_port: int,
    pki_dir: Path | None,
    ca_file: Path | None,
    cert_dir: Path | None,
    command_keys: tuple[Path, ...],
    state_dir: Path | None,
    heartbeat: float,
    keepalive: int,
    reconnect_min: float,
    reconnect_max: float,
    ramp: float | None,
    processes: int,
    direct: bool,
    fault_rates: tuple[str, ...],
    recover_after: float,
    control_port: int | None,
    register_url: str | None,
    token: str | None,
    token_file: Path | None,
    duration: float,
    seed: int | None,
    issue_only: bool,
    agent_log_level: str,
) -> None:
    """Run DEVICES simulated devices (real agents, one mutual-TLS connection each).

    Commands on stdin (and --control-port), one per line: status, list,
    die|off|hang|drop|unplug|recover TARGET..., drift SECONDS[:PPM] TARGET..., stop.
    A TARGET is a device id, a count of random devices, or 'all'.
    See firmware_agent/sim_control.py.
    """
    ids = device_ids(devices, prefix, first)
    ca = ca_file or (pki_dir / "ca.crt" if pki_dir else None)
    if ca is None or not ca.is_file():
        raise click.UsageError("need --pki-dir or --ca-file naming an existing CA certificate")
    cache = cert_dir or (pki_dir / "sim-devices" if pki_dir else None)
    if cache is None:
        raise click.UsageError("need --pki-dir (to issue certificates) or --cert-dir")
    certs = cache / _fingerprint(ca)
    if pki_dir is not None and (pki_dir / "ca.key").is_file():
        started = time.perf_counter()
        issue_device_certs(pki_dir, ids, certs)
        log.info(
            "certificates of %d devices in %s (%.1f s)",
            len(ids),
            certs,
            time.perf_counter() - started,
        )
    missing = [i for i in ids if not (certs / f"{i}.crt").is_file()]
    if missing:
        raise click.ClickException(f"{len(missing)} device certificates missing in {certs}")
    if issue_only:
        click.echo(f"{len(ids)} device certificates in {certs}")
        return
    if not command_keys:
        raise click.UsageError("need --command-key (the fleet's command public key)")
    for key in command_keys:
        try:
            load_public_key(key.read_bytes())
        except Exception:
            raise click.BadParameter(f"not an Ed25519 public key: {key}") from None
    if register_url:
        secret = token_file.read_text().strip() if token_file else token
        secret = secret or ctx.meta.get("tillsyn.token")
        if not secret:
            raise click.UsageError("--register needs --token or --token-file")
        counts = asyncio.run(register_over_api(register_url, secret, ids))
        log.info("registered at %s: %s", register_url, dict(counts))
    settings = SimSettings(
        broker_host=broker_host,
        broker_port=broker_port,
        ca_file=ca.absolute(),
        cert_dir=certs.absolute(),
        command_keys=[k.absolute() for k in command_keys],
        state_root=(state_dir or _default_state_root(_fingerprint(ca, *command_keys))).absolute(),
        device_ids=ids,
        heartbeat_s=heartbeat,
        keepalive_s=keepalive,
        reconnect_min_s=reconnect_min,
        reconnect_max_s=reconnect_max,
        ramp_s=devices / 200 if ramp is None else ramp,
        direct=direct,
        fault_rates=parse_rates(fault_rates),
        recover_after_s=recover_after,
        seed=seed,
        agent_log_level=agent_log_level.upper(),
    )
    settings.state_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    backend = Coordinator(settings, processes) if processes > 1 else LocalBackend(settings)
    asyncio.run(serve(backend, control_port=control_port, duration_s=duration))
