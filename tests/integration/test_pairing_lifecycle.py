"""Revocation, retirement, return and swap against the real broker: a revoked device is
disconnected at once and can never connect again; history and inventory keep it all."""

from __future__ import annotations

import csv
import io
import json
import socket
import ssl
import struct
from pathlib import Path

import pytest
from sqlmodel import col, select

from broker.pki import PkiPaths
from fleet.auth import Role
from fleet.models import Connectivity, Window
from tests.integration.fleet_harness import wait_until
from tests.integration.pairing_support import (
    EnrollingAgent,
    pair_live,
    run_cli_async,
    run_pairing_env,
)

pytestmark = pytest.mark.integration


def _connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack("!H", len(cid)) + cid
    return bytes([0x10, len(body)]) + body


def broker_accepts(port: int, pki: PkiPaths, agent: EnrollingAgent, generation: int) -> bool:
    """A raw TLS + CONNECT with the device's own certificate and key."""
    ident = agent.state_dir / "identity"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=pki.ca_cert)
    ctx.load_cert_chain(ident / f"cert-{generation}.pem", ident / f"key-{generation}.pem")
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        tls = ctx.wrap_socket(sock, server_hostname="localhost")
        tls.sendall(_connect_packet(f"probe-{generation}-{agent.serial}"))
        return tls.recv(4)[:1] == b"\x20"
    except (ssl.SSLError, OSError):
        return False
    finally:
        sock.close()


async def test_retired_device_is_relocked_revoked_and_its_open_session_closed(
    make_harness, tmp_path: Path, pki_dir, mosquitto
) -> None:
    async with run_pairing_env(make_harness, tmp_path, pki_dir, mosquitto) as env:
        agent, device_id = await pair_live(env, serial="SN-RETIRE-1")
        gen = agent.identity()["generation"]
        assert broker_accepts(mosquitto.port, pki_dir, agent, gen)
        await wait_until(
            lambda: _online(env, device_id), timeout=10, what="device online before retire"
        )
        tech = await env.token("tech-default")
        resp = await env.call("POST", f"/api/devices/{device_id}/retire", token=tech)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["state"] == "retired"
        assert body["relocked"] is True
        assert body["crl_confirmed"] is True, "the broker did not pick up the new CRL"
        assert body["kicked"] is True

        # The open session is closed (its Last Will says offline) ...
        await wait_until(lambda: _offline(env, device_id), timeout=10, what="device offline")
        # ... and the device cannot come back: every reconnect is refused at the handshake.
        assert not broker_accepts(mosquitto.port, pki_dir, agent, gen)
        await wait_until(
            lambda: _refused_reconnects(agent, 2), timeout=20, what="refused reconnects"
        )
        assert (await env.h.device(device_id)).connectivity is Connectivity.OFFLINE

        record = await env.record(device_id)
        assert record is not None and record.state.value == "retired"
        assert record.ended_by == "tech-default"
        ended = [a for a in await env.audits("device.ended") if a.subject == device_id]
        assert len(ended) == 1 and '"kicked":true' in ended[0].detail


async def _online(env, device_id: str) -> bool:
    return (await env.h.device(device_id)).connectivity is Connectivity.ONLINE


async def _offline(env, device_id: str) -> bool:
    return (await env.h.device(device_id)).connectivity is Connectivity.OFFLINE


async def _refused_reconnects(agent: EnrollingAgent, n: int) -> bool:
    return agent.log().count("cannot connect to") >= n


async def test_swap_moves_the_windows_to_the_new_device_and_retires_the_old(
    make_harness, tmp_path: Path, pki_dir, mosquitto
) -> None:
    async with run_pairing_env(make_harness, tmp_path, pki_dir, mosquitto) as env:
        old_agent, old_id = await pair_live(env, serial="SN-SWAP-OLD", resident="res-swap")
        window_start = await env.h.add_window(old_id, start_in_s=3 * 3600, duration_s=600)
        tech = await env.token("tech-default")
        new_agent = env.fresh_agent("SN-SWAP-NEW")
        code = await new_agent.user_code()
        result = await run_cli_async(
            "device",
            "swap",
            old_id,
            code,
            "--serial",
            "SN-SWAP-NEW",
            env={"TILLSYN_API": env.api, "TILLSYN_TOKEN": tech},
        )
        assert result.returncode == 0, result.stdout + result.stderr
        new_id = new_agent.identity()["device_id"]
        assert f"{new_id} is live" in result.stdout

        async def old_ended() -> bool:
            record = await env.record(old_id)
            return record is not None and record.state.value == "swapped_out"

        await wait_until(old_ended, timeout=30, what="old device swapped out")
        old, new = await env.record(old_id), await env.record(new_id)
        assert old is not None and new is not None
        assert (old.replaced_by, new.replaces) == (new_id, old_id)
        assert new.resident_id == "res-swap" and new.state.value == "live"
        windows = await env.db(lambda s: s.exec(select(Window).where(col(Window.active))).all())
        assert {w.device_id for w in windows if w.duration_s == 600} == {new_id}
        await wait_until(lambda: _offline(env, old_id), timeout=10, what="old device offline")
        assert not broker_accepts(
            mosquitto.port, pki_dir, old_agent, old_agent.identity()["generation"]
        )
        view = (await env.call("GET", f"/api/inventory/{new_id}", token=tech)).json()
        actions = [h["action"] for h in view["history"]]
        assert actions[-1] == "swapped_in" and "paired" in actions
        old_view = (await env.call("GET", f"/api/inventory/{old_id}", token=tech)).json()
        assert old_view["history"][-1]["action"] == "swapped_out"
        assert [c["status"] for c in old_view["certificates"]] == ["revoked"]
        assert window_start > 0


async def test_inventory_lists_filters_exports_csv_and_return_keeps_the_history(
    make_harness, tmp_path: Path, pki_dir, mosquitto
) -> None:
    async with run_pairing_env(make_harness, tmp_path, pki_dir, mosquitto) as env:
        agent, device_id = await pair_live(env, serial="SN-INV-1", resident="res-inv")
        tech = await env.token("tech-default")
        auditor = await env.token("auditor-1", Role.AUDITOR)
        nurse = await env.token("nurse-inv", Role.NIGHT_STAFF)

        rows = (
            await env.call("GET", "/api/inventory", token=tech, params={"state": "live"})
        ).json()
        [row] = [r for r in rows if r["device_id"] == device_id]
        assert row["serial"] == "SN-INV-1" and row["kind"] == "camera"
        assert row["firmware"] and row["connectivity"] == "online"
        assert row["cert_expires_at"] and row["resident_id"] == "res-inv"
        none = await env.call("GET", "/api/inventory", token=tech, params={"kind": "video_phone"})
        assert device_id not in {r["device_id"] for r in none.json()}
        assert (await env.call("GET", "/api/inventory", token=nurse)).status_code == 403

        csv_resp = await env.call("GET", "/api/inventory", token=auditor, params={"format": "csv"})
        assert csv_resp.status_code == 200
        assert csv_resp.headers["content-type"].startswith("text/csv")
        parsed = list(csv.DictReader(io.StringIO(csv_resp.text)))
        assert [r["serial"] for r in parsed if r["device_id"] == device_id] == ["SN-INV-1"]
        cli = await run_cli_async(
            "inventory",
            "list",
            "--csv",
            "--state",
            "live",
            env={"TILLSYN_API": env.api, "TILLSYN_TOKEN": tech},
        )
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout.splitlines()[0].startswith("device_id,serial,kind,state")
        assert device_id in cli.stdout

        expiring = await env.call(
            "GET", "/api/certificates/expiring", token=tech, params={"days": 1}
        )
        assert device_id in {c["device_id"] for c in expiring.json()}

        returned = await run_cli_async(
            "device",
            "return",
            device_id,
            "--json",
            env={"TILLSYN_API": env.api, "TILLSYN_TOKEN": tech},
        )
        assert returned.returncode == 0, returned.stdout + returned.stderr
        result = json.loads(returned.stdout)
        assert result["state"] == "returned" and result["kicked"] is True
        assert result["relocked"] is True and result["crl_confirmed"] is True
        again = await env.call("POST", f"/api/devices/{device_id}/return", token=tech)
        assert again.status_code == 409
        view = (await env.call("GET", f"/api/inventory/{device_id}", token=auditor)).json()
        assert view["state"] == "returned" and view["resident_id"] is None
        actions = [h["action"] for h in view["history"]]
        assert actions == ["paired", "live", "retired", "returned"]
        assert '"resident": "res-inv"' in view["history"][-1]["detail"]
        expiring = await env.call(
            "GET", "/api/certificates/expiring", token=tech, params={"days": 1}
        )
        assert device_id not in {c["device_id"] for c in expiring.json()}
        await wait_until(lambda: _offline(env, device_id), timeout=10, what="offline")
        assert agent.serial == "SN-INV-1"
