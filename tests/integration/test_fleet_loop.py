"""The signed, fail-closed loop end to end: fleet service + real Mosquitto (production config,
mutual TLS) + real agent processes."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt
import pytest
from sqlmodel import select

from broker.launcher import free_port
from fleet.models import Command, CommandStatus, Connectivity, Look, VisitCause
from tests.helpers import make_client_ssl_context
from tests.integration.conftest import fleet_settings
from tests.integration.fleet_harness import REPO, local_hms, staff_token, wait_until
from tillsyn_protocol import SigningKey, sign
from tillsyn_protocol import tokens as tk

pytestmark = pytest.mark.integration


def metric(service, name: str, **labels: str) -> float:
    value = service.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


async def test_armed_at_window_start_and_locked_at_window_end(make_harness) -> None:
    async with make_harness() as h:
        await h.add_device("dev-loop-arm")
        h.agent("dev-loop-arm")
        await wait_until(lambda: _online(h, "dev-loop-arm"), timeout=10, what="agent online")
        start = await h.add_window("dev-loop-arm", start_in_s=2, duration_s=4)
        assert (await h.device("dev-loop-arm")).reported_state.value == "LOCKED"
        await wait_until(lambda: h.state_is("dev-loop-arm", "ARMED"), timeout=8, what="ARMED")
        armed_at = time.time()
        assert armed_at >= start - 0.5, "armed before the window opened"
        device = await h.device("dev-loop-arm")
        assert device.armed_until == pytest.approx(start + 4)
        await wait_until(lambda: h.state_is("dev-loop-arm", "LOCKED"), timeout=8, what="LOCKED")
        assert time.time() >= start + 4 - 0.5, "locked before the window closed"

        def ledger(s):
            return s.exec(select(Command).where(Command.device_id == "dev-loop-arm")).all()

        rows = await h.service.db(h.service.ops.run, ledger)
        arms = [c for c in rows if c.kind.value == "arm"]
        assert len(arms) == 1 and arms[0].status is CommandStatus.APPLIED
        # The device re-locked on its own timer; the fleet needed no disarm to get there.
        assert metric(h.service, "tillsyn_command_roundtrip_seconds_count", kind="arm") == 1


async def test_look_inside_window_is_recorded(make_harness) -> None:
    async with make_harness() as h:
        await h.add_device("dev-loop-look")
        h.agent("dev-loop-look", look_cap_s=2)
        await wait_until(lambda: _online(h, "dev-loop-look"), timeout=10, what="agent online")
        await h.add_window("dev-loop-look", start_in_s=1, duration_s=10)
        await wait_until(lambda: h.state_is("dev-loop-look", "ARMED"), timeout=8, what="ARMED")
        look = await h.service.start_look("dev-loop-look", "nurse-7", 30)
        await wait_until(lambda: h.state_is("dev-loop-look", "VIEWING"), timeout=5, what="VIEWING")

        async def ended():
            row = await h.service.db(h.service.ops.run, lambda s: s.get(Look, look.id))
            return row if row and row.ended_at else None

        row = await wait_until(ended, timeout=8, what="look ended")
        assert row.staff_id == "nurse-7" and row.started_at is not None
        # Capped on the device at 2 s although 30 s were asked for.
        assert row.duration_s == pytest.approx(2, abs=0.5)
        assert row.end_reason == "look_cap"
        await wait_until(lambda: h.state_is("dev-loop-look", "ARMED"), timeout=5, what="ARMED")


async def test_forged_token_is_refused_and_counted(make_harness) -> None:
    async with make_harness() as h:
        await h.add_device("dev-loop-forge")
        h.agent("dev-loop-forge")
        await wait_until(lambda: _online(h, "dev-loop-forge"), timeout=10, what="agent online")
        # An attacker holding the fleet's MQTT identity but not its signing key.
        forged = sign(
            tk.arm("dev-loop-forge", seq=10**6, now=time.time(), until=int(time.time()) + 600),
            SigningKey.generate(),
        )
        ctx = make_client_ssl_context(h.pki, h.pki.fleet_cert, h.pki.fleet_key)
        async with aiomqtt.Client(
            "127.0.0.1", h.broker_port, tls_context=ctx, identifier="attacker-1"
        ) as client:
            await client.publish("tillsyn/v1/dev/dev-loop-forge/cmd", forged, qos=1)

        await wait_until(
            lambda: _value(metric(h.service, "tillsyn_token_refusals_total", reason="unknown_key")),
            timeout=5,
            what="refusal counted",
        )
        await asyncio.sleep(0.5)
        assert (await h.device("dev-loop-forge")).reported_state.value == "LOCKED"


async def test_fleet_sigkilled_during_window_device_relocks_on_its_own(
    tmp_path: Path, pki_dir, mosquitto, device_cert, make_harness
) -> None:
    """The fleet process dies while a window is open; the camera still re-locks at its end."""
    device_id = "dev-loop-fleetdead"
    settings = fleet_settings(tmp_path / "svc", pki_dir, mosquitto.port)
    token = staff_token(settings.database_url)  # before the service opens the database
    toml = tmp_path / "fleet.toml"
    # Scalar settings only: nested sections keep their defaults.
    toml.write_text(
        "\n".join(
            f"{k} = {json.dumps(str(v) if isinstance(v, Path) else v)}"
            for k, v in settings.model_dump().items()
            if v is not None and not isinstance(v, dict)
        )
    )
    log = (tmp_path / "fleet.log").open("ab")
    fleet = subprocess.Popen(
        [sys.executable, "-m", "tillsyn_cli", "-v", "fleet", "serve", "--config", str(toml)],
        cwd=REPO,
        stdout=log,
        stderr=log,
    )
    api = f"http://127.0.0.1:{settings.api_port}"
    try:
        import httpx

        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=api, timeout=5, headers=headers) as http:

            async def ready():
                try:
                    return (await http.get("/readyz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_until(ready, timeout=20, what="fleet ready")
            (await http.post("/api/devices", json={"id": device_id})).raise_for_status()
            hms, start = local_hms(2)
            (
                await http.post(
                    "/api/windows", json={"device_id": device_id, "start": hms, "duration_s": 6}
                )
            ).raise_for_status()
            # The agent pins the key the fleet process created.
            from firmware_agent.provision import write_agent_config
            from fleet import signing
            from tests.integration.fleet_harness import AgentProc

            cert, key = device_cert(device_id)
            config = write_agent_config(
                tmp_path / "agent.toml",
                device_id=device_id,
                broker_host="127.0.0.1",
                broker_port=mosquitto.port,
                ca_file=pki_dir.ca_cert,
                cert_file=cert,
                key_file=key,
                command_keys=[signing.public_key_path(settings.signing_key_file)],
                state_dir=tmp_path / "agent-state",
                heartbeat_interval_s=1,
                reconnect_min_s=0.2,
                reconnect_max_s=2,
            )
            agent = AgentProc(device_id, config, tmp_path / "agent.log").start()
            try:

                async def armed():
                    d = (await http.get(f"/api/devices/{device_id}")).json()
                    return d["reported_state"] == "ARMED"

                await wait_until(armed, timeout=10, what="ARMED")
                fleet.send_signal(signal.SIGKILL)
                fleet.wait(5)
                state = await _retained_state(pki_dir, mosquitto.port, device_id)
                assert state["state"] == "ARMED"
                await asyncio.sleep(max(0.0, start + 6 - time.time()) + 1.0)
                state = await _retained_state(pki_dir, mosquitto.port, device_id)
                assert state["state"] == "LOCKED", "device did not re-lock without the fleet"
                assert state["since"] >= start + 6 - 0.5
            finally:
                agent.stop()
    finally:
        if fleet.poll() is None:
            fleet.kill()
            fleet.wait(5)
        log.close()


async def test_agent_sigkilled_raises_one_visit(make_harness) -> None:
    async with make_harness(offline_after_s=3) as h:
        await h.add_device("dev-loop-dead")
        agent = h.agent("dev-loop-dead", heartbeat_s=1)
        await wait_until(lambda: _online(h, "dev-loop-dead"), timeout=10, what="agent online")
        # A window due in 10 minutes: inside the visit horizon.
        await h.add_window("dev-loop-dead", start_in_s=600, duration_s=300)
        assert await h.visits("dev-loop-dead") == []
        killed = time.time()
        agent.signal(signal.SIGKILL)
        visits = await wait_until(lambda: h.visits("dev-loop-dead"), timeout=5, what="visit")
        assert time.time() - killed <= 3 + 1, "visit not raised within the configured threshold"
        assert [v.cause for v in visits] == [VisitCause.DEVICE_OFFLINE]
        assert (await h.device("dev-loop-dead")).connectivity is Connectivity.OFFLINE
        # Past the heartbeat-silence threshold and several sweeps: still the one visit.
        await asyncio.sleep(4)
        assert len(await h.visits("dev-loop-dead")) == 1
        assert metric(h.service, "tillsyn_visits_raised_total", cause="device_offline") == 1


async def test_silent_death_detected_by_heartbeat_silence(make_harness) -> None:
    """A hung device (no TCP close, no Last Will yet) is caught by heartbeat silence."""
    async with make_harness(offline_after_s=3) as h:
        await h.add_device("dev-loop-hang")
        agent = h.agent("dev-loop-hang", heartbeat_s=1, keepalive_s=60)
        await wait_until(lambda: _online(h, "dev-loop-hang"), timeout=10, what="agent online")
        await h.add_window("dev-loop-hang", start_in_s=600, duration_s=300)
        stopped = time.time()
        agent.signal(signal.SIGSTOP)
        visits = await wait_until(lambda: h.visits("dev-loop-hang"), timeout=8, what="visit")
        # Threshold 3 s after the last heartbeat, checked every 0.25 s.
        assert time.time() - stopped <= 3 + 1
        evidence = json.loads(visits[0].evidence)
        assert evidence["connectivity"] == "offline"
        # It comes back: the visit is kept and marked, not deleted.
        agent.signal(signal.SIGCONT)

        async def back():
            v = await h.visits("dev-loop-hang")
            return v if v and v[0].device_back_at else None

        visits = await wait_until(back, timeout=8, what="visit marked device back")
        assert len(visits) == 1 and visits[0].status.value == "open"


@pytest.mark.parametrize(
    ("channel", "payload", "why"),
    [
        ("hb", b"not json", "malformed"),
        (
            "hb",
            b'{"v":1,"ts":1,"seq":"x","uptime_s":1,"state":"LOCKED","camera":"ok",'
            b'"clock_synced":true,"fw":"1"}',
            "malformed",
        ),
        ("state", b'{"v":1,"ts":1,"state":"ARMED","since":1,"last_seq":1,"evil":1}', "malformed"),
        ("state", b'{"v":1,"ts":1,"state":"OPEN","since":1,"last_seq":1}', "malformed"),
        ("status", b'{"v":2,"ts":1,"status":"offline","boot_id":"b"}', "malformed"),
        ("ack", b"\xff\xfe\x00garbage", "malformed"),
        ("event", b"[]", "malformed"),
        ("event", b"{" + b'"a":1,' * 1000 + b"}", "malformed"),
        (
            "state",
            b'{"v":1,"ts":1,"state":"ARMED","since":1,"last_seq":1,"pad":"' + b"x" * 5000 + b'"}',
            "malformed",
        ),
    ],
)
async def test_malformed_device_messages_change_nothing(
    make_harness, device_cert, channel: str, payload: bytes, why: str
) -> None:
    async with make_harness() as h:
        device_id = "dev-loop-bad"
        await h.add_device(device_id)
        before = (await h.device(device_id)).model_dump()
        cert, key = device_cert(device_id)
        ctx = make_client_ssl_context(h.pki, cert, key)
        async with aiomqtt.Client(
            "127.0.0.1", h.broker_port, tls_context=ctx, identifier=f"{device_id}-raw"
        ) as client:
            await client.publish(f"tillsyn/v1/dev/{device_id}/{channel}", payload, qos=1)
        await wait_until(
            lambda: _value(
                metric(h.service, "tillsyn_ingest_rejected_total", channel=channel, why=why)
            ),
            timeout=5,
            what="rejection counted",
        )
        after = (await h.device(device_id)).model_dump()
        for field in ("reported_state", "armed_until", "connectivity", "device_last_seq"):
            assert after[field] == before[field], field
        assert h.service.link.connected.is_set()
        # The service still works after the bad input.
        assert (await h.service.readiness())["database"]


# --- helpers ---------------------------------------------------------------------------


async def _online(h, device_id: str) -> bool:
    device = await h.device(device_id)
    return device.connectivity is Connectivity.ONLINE and device.reported_at is not None


async def _value(v: float) -> bool:
    return v > 0


async def _retained_state(pki, port: int, device_id: str) -> dict:
    ctx: ssl.SSLContext = make_client_ssl_context(pki, pki.fleet_cert, pki.fleet_key)
    async with aiomqtt.Client(
        "127.0.0.1", port, tls_context=ctx, identifier=f"probe-{free_port()}"
    ) as client:
        await client.subscribe(f"tillsyn/v1/dev/{device_id}/state", qos=1)
        async with asyncio.timeout(5):
            async for message in client.messages:
                return json.loads(bytes(message.payload))
    raise AssertionError("no retained state")
