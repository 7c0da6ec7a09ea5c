"""``tillsyn fleet serve`` and the API clients (devices, windows, visits, commands, look)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import httpx

from tillsyn_protocol.windows import STOCKHOLM

from .config import load_settings
from .errors import FleetError

DEV_STACK = Path("var/dev/stack.json")


@click.group()
def fleet() -> None:
    """The fleet service."""


@fleet.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="TOML settings file (TILLSYN_* environment variables also apply).",
)
@click.option("--api-port", type=int, default=None)
def serve(config_path: Path | None, api_port: int | None) -> None:
    """Run the fleet service in the foreground until SIGTERM/SIGINT."""
    from .service import FleetService

    overrides: dict[str, Any] = {} if api_port is None else {"api_port": api_port}
    try:
        settings = load_settings(config_path, **overrides)
        service = FleetService(settings)
    except FleetError as exc:
        raise click.ClickException(f"config: {exc}") from None

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop)
        await service.run()

    asyncio.run(run())


# --- API clients -----------------------------------------------------------------------


def _api_url() -> str:
    if url := os.environ.get("TILLSYN_API"):
        return url.rstrip("/")
    if DEV_STACK.exists():
        return str(json.loads(DEV_STACK.read_text())["api_url"]).rstrip("/")
    return "http://127.0.0.1:8080"


def _token() -> str | None:
    """--token / $TILLSYN_TOKEN, else the admin token the dev stack wrote to its stack file."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and (token := ctx.meta.get("tillsyn.token")):
        return str(token)
    if token := os.environ.get("TILLSYN_TOKEN"):
        return token
    if DEV_STACK.exists():
        token = json.loads(DEV_STACK.read_text()).get("admin_token")
        return str(token) if token else None
    return None


def _call(method: str, path: str, **kwargs: Any) -> Any:
    url = _api_url() + path
    if token := _token():
        kwargs["headers"] = {**kwargs.get("headers", {}), "Authorization": f"Bearer {token}"}
    try:
        resp = httpx.request(method, url, timeout=10, **kwargs)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach the fleet API at {_api_url()}: {exc}") from None
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail")
        except ValueError:
            detail = resp.text[:200]
        if isinstance(detail, list):  # validation errors: name the field
            detail = "; ".join(f"{'.'.join(map(str, d['loc'][1:]))}: {d['msg']}" for d in detail)
        if resp.status_code == 401:
            detail = f"{detail} (give an API token: --token or TILLSYN_TOKEN)"
        raise click.ClickException(f"{resp.status_code}: {detail}")
    return resp.json()


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column.endswith("_at") and isinstance(value, int | float):
        return datetime.fromtimestamp(value, STOCKHOLM).strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def _show(rows: Any, as_json: bool, columns: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    items = [
        {c: _cell(c, r.get(c)) for c in columns}
        for r in (rows if isinstance(rows, list) else [rows])
    ]
    widths = {c: max([len(c)] + [len(r[c]) for r in items]) for c in columns}
    click.echo("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for r in items:
        click.echo("  ".join(r[c].ljust(widths[c]) for c in columns))


json_opt = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@click.group()
def devices() -> None:
    """Devices known to the fleet."""


@devices.command("list")
@json_opt
def devices_list(as_json: bool) -> None:
    _show(
        _call("GET", "/api/devices"),
        as_json,
        ["id", "kind", "connectivity", "reported_state", "camera", "firmware", "resident_id"],
    )


@devices.command("add")
@click.argument("device_id")
@click.option("--kind", default="camera", type=click.Choice(["camera", "sensor", "video_phone"]))
@click.option("--resident", default=None, help="Pseudonymous resident id.")
@json_opt
def devices_add(device_id: str, kind: str, resident: str | None, as_json: bool) -> None:
    body = {"id": device_id, "kind": kind, "resident_id": resident}
    _show(_call("POST", "/api/devices", json=body), as_json, ["id", "kind", "resident_id"])


@click.group()
def windows() -> None:
    """Agreed windows (local time of day, Europe/Stockholm by default)."""


@windows.command("list")
@click.option("--device", default=None)
@json_opt
def windows_list(device: str | None, as_json: bool) -> None:
    params = {"device_id": device} if device else {}
    _show(
        _call("GET", "/api/windows", params=params),
        as_json,
        ["id", "device_id", "start_local", "duration_s", "weekdays", "tz"],
    )


@windows.command("add")
@click.argument("device_id")
@click.argument("start")
@click.option("--minutes", type=float, default=None, help="Window length in minutes.")
@click.option("--seconds", type=int, default=None, help="Window length in seconds.")
@click.option("--weekdays", default="0123456", help="Days, 0 = Monday.")
@json_opt
def windows_add(
    device_id: str,
    start: str,
    minutes: float | None,
    seconds: int | None,
    weekdays: str,
    as_json: bool,
) -> None:
    """Add a window at START (HH:MM[:SS]) for DEVICE_ID."""
    length = seconds if seconds is not None else int((minutes or 10) * 60)
    body = {"device_id": device_id, "start": start, "duration_s": length, "weekdays": weekdays}
    _show(
        _call("POST", "/api/windows", json=body),
        as_json,
        ["id", "device_id", "start_local", "duration_s"],
    )


@windows.command("rm")
@click.argument("window_id", type=int)
def windows_rm(window_id: int) -> None:
    _call("DELETE", f"/api/windows/{window_id}")
    click.echo(f"window {window_id} removed")


@click.group()
def visits() -> None:
    """Physical visits raised when a digital check cannot happen."""


@visits.command("list")
@click.option("--status", type=click.Choice(["open", "acknowledged", "closed"]), default=None)
@json_opt
def visits_list(status: str | None, as_json: bool) -> None:
    params = {"status": status} if status else {}
    _show(
        _call("GET", "/api/visits", params=params),
        as_json,
        ["id", "cause", "device_id", "resident_id", "due_at", "status", "device_back_at"],
    )


@visits.command("close")
@click.argument("visit_id", type=int)
@click.option("--by", required=True, help="Staff id.")
@click.option("--outcome", required=True)
def visits_close(visit_id: int, by: str, outcome: str) -> None:
    _call("POST", f"/api/visits/{visit_id}/close", json={"by": by, "outcome": outcome})
    click.echo(f"visit {visit_id} closed")


@click.group()
def commands() -> None:
    """The command ledger."""


@commands.command("list")
@click.option("--device", default=None)
@click.option("--status", default=None)
@json_opt
def commands_list(device: str | None, status: str | None, as_json: bool) -> None:
    params = {k: v for k, v in {"device_id": device, "status": status}.items() if v}
    _show(
        _call("GET", "/api/commands", params=params),
        as_json,
        ["id", "device_id", "seq", "kind", "status", "reason", "attempts"],
    )


@click.command()
@click.argument("device_id")
@click.option("--staff", default=None, help="Staff id of who looks (default: the token's).")
@click.option("--seconds", type=int, default=None, help="Look length (capped on the device).")
@json_opt
def look(device_id: str, staff: str | None, seconds: int | None, as_json: bool) -> None:
    """Start a look on DEVICE_ID inside its open window (needs a night staff token)."""
    body: dict[str, Any] = {"staff_id": staff} if staff else {}
    if seconds:
        body["max_s"] = seconds
    _show(
        _call("POST", f"/api/devices/{device_id}/looks", json=body),
        as_json,
        ["id", "device_id", "staff_id"],
    )
