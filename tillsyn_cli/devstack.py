"""``tillsyn dev up|down|status``: a local TLS Mosquitto, the fleet service and N real agents.

Everything lives under ``var/dev`` and is described in ``var/dev/stack.json``: how to reach
the broker, the fleet's client certificate, each device's certificate and key, the API.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import click
import httpx

from broker.errors import BrokerError
from broker.launcher import MosquittoProcess, free_port, stop_by_pidfile
from broker.pki import init_pki, issue_device_cert
from firmware_agent.provision import write_agent_config
from fleet import signing

TZ = ZoneInfo("Europe/Stockholm")


def _spawn(args: list[str], log: Path, pidfile: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(f"{proc.pid}\n")
    return proc.pid


def _stop_pid(pidfile: Path, timeout: float = 10.0) -> bool:
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                pidfile.unlink(missing_ok=True)
                return True
            time.sleep(0.05)
    pidfile.unlink(missing_ok=True)
    return True


def _wait_ready(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{url}/readyz", timeout=2)
            if resp.status_code == 200:
                return
            last = resp.text[:200]
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.25)
    raise click.ClickException(f"fleet service not ready after {timeout:.0f} s: {last}")


DEV_TEAM = "dev-team"
DEMO_WINDOW_S = 180


def _seconds_of_day(hms: str) -> int:
    parts = [int(p) for p in hms.split(":")] + [0]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def _dev_staff(db_path: Path, signing_key: Path) -> dict[str, Any]:
    """An IT admin with an API token, and a night nurse with a password and an enrolled TOTP
    secret, created in the database before the service starts (dev stack only)."""
    import pyotp
    from sqlmodel import Session

    from fleet import accounts, auth
    from fleet.config import FleetSettings
    from fleet.db import init_db, make_engine

    engine = make_engine(f"sqlite:///{db_path}")
    init_db(engine)
    totp_key = FleetSettings(signing_key_file=signing_key).totp_key_path()
    box = accounts.SecretBox.load_or_create(totp_key)
    now = time.time()
    password = secrets.token_urlsafe(12)
    try:
        with Session(engine) as session:
            accounts.set_roles(session, "dev-admin", [auth.Role.IT_ADMIN], [], now=now, actor="dev")
            token = auth.issue_token(session, "dev-admin", auth.Role.IT_ADMIN)
            accounts.set_roles(
                session, "dev-nurse", [auth.Role.NIGHT_STAFF], [DEV_TEAM], now=now, actor="dev"
            )
            accounts.set_password(session, "dev-nurse", password, now=now, actor="dev")
            secret = accounts.begin_enrolment(session, "dev-nurse", box).secret
            code = pyotp.TOTP(secret).at(now - 60)
            accounts.confirm_enrolment(
                session, "dev-nurse", code, box, now=now - 60, policy=accounts.Policy()
            )
            session.commit()
    finally:
        engine.dispose()
    return {
        "admin_token": token,
        "nurse": {"staff_id": "dev-nurse", "password": password, "totp_secret": secret},
    }


@click.group()
def dev() -> None:
    """Local development stack."""


@dev.command()
@click.option("--devices", "count", type=click.IntRange(1, 50), default=5, show_default=True)
@click.option(
    "--dir", "root", type=click.Path(path_type=Path), default=Path("var/dev"), show_default=True
)
def up(count: int, root: Path) -> None:
    """Start Mosquitto (TLS), the fleet service and COUNT simulated devices."""
    if (root / "stack.json").exists():
        raise click.ClickException(
            f"a stack is already described in {root}/stack.json; run `tillsyn dev down` first"
        )
    root = root.absolute()
    if root.exists() and any(root.iterdir()):
        # A stopped stack's files (its database knows the dev staff, devices and plans this
        # one creates): kept for a look, one run back, and this stack starts clean.
        previous = root.with_name(root.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        root.rename(previous)
        click.echo(f"dev: the previous stack's files are in {previous}")
    try:
        _up(count, root)
    except BaseException:
        _stop_all(root, quiet=True)  # nothing half-started is left running
        raise


def _up(count: int, root: Path) -> None:
    pki = init_pki(root / "pki")
    try:
        broker = MosquittoProcess(pki=pki, workdir=root / "broker").start(detached=True)
    except BrokerError as exc:
        raise click.ClickException(f"broker: {exc}") from None
    api_port = free_port()
    enroll_port = free_port()
    key_path = root / "fleet" / "command-signing-key.pem"
    signing.load_or_create(key_path)  # the agents pin its public half
    pub = signing.public_key_path(key_path)
    fleet_toml = root / "fleet.toml"
    fleet_toml.write_text(
        f'database_url = "sqlite:///{root / "fleet" / "fleet.db"}"\n'
        f"broker_port = {broker.port}\n"
        f'ca_file = "{pki.ca_cert}"\ncert_file = "{pki.fleet_cert}"\n'
        f'key_file = "{pki.fleet_key}"\nsigning_key_file = "{key_path}"\n'
        f"api_port = {api_port}\noffline_after_s = 35\nsweep_interval_s = 10\n"
        # Pairing (docs/technician.md): the dev CA signs device certificates.
        f'\n[pairing]\npki_dir = "{pki.directory}"\nenroll_port = {enroll_port}\n'
        f'broker_pid_file = "{broker.pid_path}"\n'
        f'verification_uri = "http://127.0.0.1:{api_port}/pair"\n'
    )
    staff = _dev_staff(root / "fleet" / "fleet.db", key_path)
    py = sys.executable
    fleet_pid = _spawn(
        [
            py,
            "-m",
            "tillsyn_cli",
            "-v",
            "--json-logs",
            "fleet",
            "serve",
            "--config",
            str(fleet_toml),
        ],
        root / "logs" / "fleet.log",
        root / "pids" / "fleet.pid",
    )
    api = f"http://127.0.0.1:{api_port}"
    _wait_ready(api)
    auth_header = {"Authorization": f"Bearer {staff['admin_token']}"}
    start = datetime.now(TZ) + timedelta(seconds=60)
    devices: list[dict[str, Any]] = []
    for i in range(1, count + 1):
        device_id = f"dev-sim-{i:02d}"
        cert, key = issue_device_cert(pki.directory, device_id, overwrite=True)
        httpx.post(
            f"{api}/api/devices",
            json={"id": device_id, "resident_id": f"res-{i:04d}", "team": DEV_TEAM},
            headers=auth_header,
            timeout=10,
        ).raise_for_status()
        first_at = start + timedelta(seconds=20 * (i - 1))
        first = first_at.strftime("%H:%M:%S")
        # A care plan: a demo check soon, and the usual night checks (unless they would
        # overlap the demo one: a plan's checks are at least one window apart).
        times = [first] + [
            t
            for t in ("22:00", "02:00")
            if abs(_seconds_of_day(t) - _seconds_of_day(first)) > 2 * DEMO_WINDOW_S
        ]
        httpx.post(
            f"{api}/api/plans",
            json={
                "resident_id": f"res-{i:04d}",
                "device_id": device_id,
                "team": DEV_TEAM,
                "check_times": times,
                "window_s": DEMO_WINDOW_S,
                "look_s": 30,
                "consent_ref": f"dev-consent-{i:04d}",
                "consent_date": str(first_at.date()),
                "activate": True,
                "reason": "dev stack demo plan",
            },
            headers=auth_header,
            timeout=10,
        ).raise_for_status()
        config = write_agent_config(
            root / "agents" / f"{device_id}.toml",
            device_id=device_id,
            broker_host="127.0.0.1",
            broker_port=broker.port,
            ca_file=pki.ca_cert,
            cert_file=cert,
            key_file=key,
            command_keys=[pub],
            state_dir=root / "agents" / device_id,
            heartbeat_interval_s=10,
            reconnect_min_s=0.5,
            reconnect_max_s=15,
        )
        pid = _spawn(
            [py, "-m", "firmware_agent", "run", "--config", str(config)],
            root / "logs" / f"{device_id}.log",
            root / "pids" / f"{device_id}.pid",
        )
        devices.append(
            {
                "id": device_id,
                "cert": str(cert),
                "key": str(key),
                "config": str(config),
                "pid": pid,
                "first_window": first,
                "log": str(root / "logs" / f"{device_id}.log"),
            }
        )
    stack = {
        "started_at": datetime.now(TZ).isoformat(),
        "broker": {
            "host": broker.host,
            "port": broker.port,
            "ca": str(pki.ca_cert),
            "pid": broker.pid,
            "log": str(broker.log_path),
        },
        "fleet": {
            "cert": str(pki.fleet_cert),
            "key": str(pki.fleet_key),
            "pid": fleet_pid,
            "config": str(fleet_toml),
            "log": str(root / "logs" / "fleet.log"),
            "command_public_key": str(pub),
        },
        "api_url": api,
        "enroll_url": f"https://127.0.0.1:{enroll_port}",
        "metrics_url": f"{api}/metrics",
        # Dev only: an IT admin token for the CLI, and a night nurse to try the pages with.
        **staff,
        "devices": devices,
    }
    stack_file = root / "stack.json"
    stack_file.write_text(json.dumps(stack, indent=2))
    stack_file.chmod(0o600)  # holds a token and a password
    click.echo(f"""
Tillsyn Fleet dev stack is up ({count} simulated devices).

  Pages        {api}/login   (night staff "dev-nurse": password and TOTP secret
               under "nurse" in the stack file; add the secret to an authenticator app)
  API          {api}/api/devices   (token: admin_token in the stack file; the CLI uses it)
  API docs     {api}/docs
  Metrics      {api}/metrics
  Pairing      {api}/pair   (devices enroll at https://127.0.0.1:{enroll_port})
  Broker       mqtts://127.0.0.1:{broker.port}  (mutual TLS, CA {pki.ca_cert})
  Stack file   {root}/stack.json
  Logs         {root}/logs/

Each device has a care plan with a check starting from {start:%H:%M:%S} (Stockholm time),
20 s apart, lasting 3 minutes, plus the night checks at 22:00 and 02:00: watch them arm and
re-lock with

  .venv/bin/tillsyn devices list        .venv/bin/tillsyn commands list
  and look in (inside its window) as dev-nurse on {api}/night

Kill a device to see a physical visit raised:  kill -9 {devices[0]["pid"]}
then:  .venv/bin/tillsyn visits list
Stop everything:  .venv/bin/tillsyn dev down
""")


@dev.command()
@click.option(
    "--dir", "root", type=click.Path(path_type=Path), default=Path("var/dev"), show_default=True
)
def down(root: Path) -> None:
    """Stop the dev stack (agents, fleet, broker)."""
    click.echo(f"stopped {_stop_all(root)} processes")


def _stop_all(root: Path, *, quiet: bool = False) -> int:
    stopped = 0
    for pidfile in sorted((root / "pids").glob("dev-*.pid")):
        stopped += _stop_pid(pidfile)
    stopped += _stop_pid(root / "pids" / "fleet.pid")
    try:
        stopped += stop_by_pidfile(root / "broker")
    except BrokerError as exc:
        if not quiet:
            raise click.ClickException(f"broker: {exc}") from None
    (root / "stack.json").unlink(missing_ok=True)
    return stopped


@dev.command()
@click.option(
    "--dir", "root", type=click.Path(path_type=Path), default=Path("var/dev"), show_default=True
)
def status(root: Path) -> None:
    """Show what runs."""
    path = root / "stack.json"
    if not path.exists():
        raise click.ClickException("no dev stack (run `tillsyn dev up`)")
    stack = json.loads(path.read_text())
    try:
        ready = httpx.get(f"{stack['api_url']}/readyz", timeout=3).json()
    except httpx.HTTPError as exc:
        ready = {"error": str(exc)}
    click.echo(
        json.dumps(
            {
                "api_url": stack["api_url"],
                "readyz": ready,
                "devices": [d["id"] for d in stack["devices"]],
            },
            indent=2,
        )
    )
