"""``tillsyn pair``, ``tillsyn inventory ...`` and ``tillsyn device swap|retire|return|retest``.

API clients acting with a technician's token (``--token`` or ``$TILLSYN_TOKEN``; the API
address from ``$TILLSYN_API`` or the dev stack). ``pair`` waits for the commissioning
test and prints each step as it passes; it exits non-zero if the test fails.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
import httpx

from .cli import _api_url, _call, _show, _token, json_opt

__all__ = ["device", "inventory", "pair"]

STEP_TEXT = {
    "connected": "connected with its new certificate",
    "locked": "reports LOCKED",
    "armed": "test arm applied (ARMED)",
    "camera_on": "test look: camera on",
    "camera_off": "test look: camera off",
    "locked_again": "disarmed: LOCKED again",
}
INVENTORY_COLUMNS = [
    "device_id",
    "serial",
    "kind",
    "state",
    "site",
    "resident_id",
    "firmware",
    "connectivity",
    "cert_expires_at",
]


def _call_slow(method: str, path: str, timeout: float = 90.0, **kwargs: Any) -> Any:
    """Like ``_call`` for operations that wait on the device and the broker."""
    headers = {"Authorization": f"Bearer {tok}"} if (tok := _token()) else {}
    try:
        resp = httpx.request(method, _api_url() + path, headers=headers, timeout=timeout, **kwargs)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach the fleet API at {_api_url()}: {exc}") from None
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail")
        except ValueError:
            detail = resp.text[:200]
        raise click.ClickException(f"{resp.status_code}: {detail}")
    return resp.json()


def _token_option(fn: Any) -> Any:
    def remember(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value:
            ctx.find_root().meta["tillsyn.token"] = value

    return click.option(
        "--token",
        default=None,
        expose_value=False,
        callback=remember,
        help="Technician API token (default: $TILLSYN_TOKEN).",
    )(fn)


def _wait_for_test(pairing_id: int, timeout: float, as_json: bool) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    shown = 0
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = _call("GET", f"/api/pairing/{pairing_id}")
        run = view.get("commissioning") or {}
        steps = run.get("steps") or []
        for step in steps[shown:]:
            if not as_json:
                mark = "ok " if step.get("ok") else "FAILED "
                text = STEP_TEXT.get(step["step"], step["step"])
                why = f": {step['why']}" if step.get("why") else ""
                click.echo(f"  {mark} {text}{why}")
        shown = len(steps)
        if run.get("status") in ("passed", "failed"):
            return view
        time.sleep(0.5)
    raise click.ClickException(f"the commissioning test did not finish within {timeout:g} s")


def _finish(view: dict[str, Any], as_json: bool) -> None:
    run = view.get("commissioning") or {}
    if as_json:
        click.echo(json.dumps(view, indent=2))
    elif run.get("status") == "passed":
        click.echo(f"{view['device_id']} is live")
    if run.get("status") != "passed":
        raise click.ClickException(
            f"commissioning failed: {run.get('error') or 'unknown'} "
            f"(retry with `tillsyn device retest {view['device_id']}`)"
        )


@click.command()
@click.argument("code")
@click.option("--resident", required=True, help="Pseudonymous resident id.")
@click.option("--plan", default=None, help="Care plan id (optional).")
@click.option("--serial", default=None, help="Serial on the device label (else asked).")
@click.option("--site", default=None, help="Site id (optional).")
@click.option("--team", default=None, help="Team the device belongs to (default: yours).")
@click.option("--wait/--no-wait", default=True, help="Wait for the commissioning test.")
@click.option("--timeout", type=float, default=300.0, show_default=True)
@_token_option
@json_opt
def pair(
    code: str,
    resident: str,
    plan: str | None,
    serial: str | None,
    site: str | None,
    team: str | None,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Pair the device showing CODE with a resident, then run its commissioning test."""
    if serial is None:
        found = _call("POST", "/api/pairing/lookup", json={"code": code})
        click.echo(f"device: serial {found['serial']}, {found['kind']}, fw {found['firmware']}")
        if not sys.stdin.isatty() or not click.confirm("Is this the serial on the label?"):
            raise click.ClickException("not confirmed: pass --serial SERIAL from the label")
        serial = found["serial"]
    body = {
        k: v
        for k, v in {
            "code": code,
            "resident_id": resident,
            "plan_id": plan,
            "serial": serial,
            "site": site,
            "team": team,
        }.items()
        if v is not None
    }
    paired = _call("POST", "/api/pairing", json=body)
    if not as_json:
        click.echo(
            f"paired {paired['device_id']} (serial {paired['serial']}) "
            f"for resident {paired['resident_id']}; certificate {paired['cert_serial']}"
        )
    if not wait:
        if as_json:
            click.echo(json.dumps(paired, indent=2))
        return
    if not as_json:
        click.echo("commissioning test:")
    _finish(_wait_for_test(paired["pairing_id"], timeout, as_json), as_json)


@click.group()
def inventory() -> None:
    """Equipment inventory: every device, its serial, state, certificate and history."""


@inventory.command("list")
@click.option("--kind", type=click.Choice(["camera", "sensor", "video_phone"]), default=None)
@click.option("--site", default=None)
@click.option("--state", default=None, help="live, commissioning, retired, returned, ...")
@click.option("--serial", default=None)
@click.option("--csv", "as_csv", is_flag=True, help="CSV (for a spreadsheet).")
@_token_option
@json_opt
def inventory_list(
    kind: str | None,
    site: str | None,
    state: str | None,
    serial: str | None,
    as_csv: bool,
    as_json: bool,
) -> None:
    params = {
        k: v for k, v in {"kind": kind, "site": site, "state": state, "serial": serial}.items() if v
    }
    if as_csv:
        params["format"] = "csv"
        headers = {"Authorization": f"Bearer {tok}"} if (tok := _token()) else {}
        try:
            resp = httpx.get(_api_url() + "/api/inventory", params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise click.ClickException(f"cannot reach the fleet API: {exc}") from None
        if resp.status_code >= 400:
            raise click.ClickException(f"{resp.status_code}: {resp.text[:200]}")
        click.echo(resp.text, nl=False)
        return
    _show(_call("GET", "/api/inventory", params=params), as_json, INVENTORY_COLUMNS)


@inventory.command("show")
@click.argument("device_id")
@_token_option
@json_opt
def inventory_show(device_id: str, as_json: bool) -> None:
    data = _call("GET", f"/api/inventory/{device_id}")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    _show(data, False, INVENTORY_COLUMNS)
    click.echo("\ncertificates:")
    _show(data["certificates"], False, ["serial", "status", "not_after", "reason"])
    click.echo("\nhistory:")
    _show(data["history"], False, ["ts", "action", "actor", "device_id", "detail"])


@inventory.command("expiring")
@click.option("--days", type=float, default=30.0, show_default=True)
@_token_option
@json_opt
def inventory_expiring(days: float, as_json: bool) -> None:
    """Device certificates that expire within DAYS."""
    rows = _call("GET", "/api/certificates/expiring", params={"days": days})
    _show(rows, as_json, ["device_id", "serial", "status", "not_after", "renew_after"])


@click.group()
def device() -> None:
    """One device's lifecycle: swap, retire, return, retest."""


@device.command("retire")
@click.argument("device_id")
@click.option("--yes", is_flag=True, help="Do not ask.")
@_token_option
@json_opt
def device_retire(device_id: str, yes: bool, as_json: bool) -> None:
    """End the service: re-lock, revoke the certificate, disconnect it."""
    if not yes and sys.stdin.isatty():
        click.confirm(f"Retire {device_id}? Its certificate is revoked.", abort=True)
    _show(_call_slow("POST", f"/api/devices/{device_id}/retire"), as_json, _END_COLUMNS)


@device.command("return")
@click.argument("device_id")
@_token_option
@json_opt
def device_return(device_id: str, as_json: bool) -> None:
    """Equipment back in stock (retired first if it is still in service)."""
    _show(_call_slow("POST", f"/api/devices/{device_id}/return"), as_json, _END_COLUMNS)


@device.command("swap")
@click.argument("old_device_id")
@click.argument("code")
@click.option("--serial", required=True, help="Serial on the NEW device's label.")
@click.option("--site", default=None)
@click.option("--wait/--no-wait", default=True)
@click.option("--timeout", type=float, default=300.0, show_default=True)
@_token_option
@json_opt
def device_swap(
    old_device_id: str,
    code: str,
    serial: str,
    site: str | None,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Replace OLD_DEVICE_ID with the device showing CODE (same resident and plan)."""
    body = {k: v for k, v in {"code": code, "serial": serial, "site": site}.items() if v}
    paired = _call("POST", f"/api/devices/{old_device_id}/swap", json=body)
    if not as_json:
        click.echo(f"paired {paired['device_id']} to replace {old_device_id}")
    if wait:
        _finish(_wait_for_test(paired["pairing_id"], timeout, as_json), as_json)
        if not as_json:
            click.echo(f"{old_device_id} retired (certificate revoked)")


@device.command("retest")
@click.argument("device_id")
@click.option("--timeout", type=float, default=300.0, show_default=True)
@_token_option
@json_opt
def device_retest(device_id: str, timeout: float, as_json: bool) -> None:
    """Run the commissioning test again (after a failure)."""
    started = _call("POST", f"/api/devices/{device_id}/retest")
    if not as_json:
        click.echo(f"commissioning test of {device_id}:")
    _finish(_wait_for_test(started["pairing_id"], timeout, as_json), as_json)


_END_COLUMNS = ["device_id", "state", "relocked", "crl_confirmed", "kicked"]
