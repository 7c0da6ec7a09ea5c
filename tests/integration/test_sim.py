"""The device simulator against the test Mosquitto and a fleet service: 50 real agents come
online, and each fault does what it says as the fleet sees it."""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path

import click
import pytest

from broker.pki import PkiPaths, issue_device_certs
from firmware_agent.sim import Fault, SimSettings, Simulator, device_ids
from firmware_agent.sim_cli import parse_rates
from firmware_agent.sim_control import Command, parse_command
from fleet import signing
from fleet.models import Connectivity, Device
from tests.integration.fleet_harness import Harness, wait_until
from tillsyn_protocol import CameraHealth

pytestmark = pytest.mark.integration

DEVICES = 50
OFFLINE_AFTER_S = 3.0


def settings_for(h: Harness, ids: list[str], tmp: Path, pki: PkiPaths) -> SimSettings:
    issue_device_certs(pki.directory, ids, tmp / "certs")
    return SimSettings(
        broker_port=h.broker_port,
        ca_file=pki.ca_cert,
        cert_dir=tmp / "certs",
        command_keys=[signing.public_key_path(h.service.settings.signing_key_file)],
        state_root=tmp / "state",
        device_ids=ids,
        heartbeat_s=1,
        keepalive_s=5,
        reconnect_min_s=0.2,
        reconnect_max_s=1,
        ramp_s=2,
        health_interval_s=0.2,
    )


async def devices(h: Harness, ids: list[str]) -> dict[str, Device]:
    rows = await h.service.db(h.service.ops.run, lambda s: [s.get(Device, i) for i in ids])
    return {d.id: d for d in rows if d is not None}


def online(rows: dict[str, Device], ids: list[str]) -> bool:
    return all(rows[i].connectivity is Connectivity.ONLINE for i in ids)


def offline(rows: dict[str, Device], ids: list[str]) -> bool:
    return all(rows[i].connectivity is Connectivity.OFFLINE for i in ids)


async def test_fifty_devices_online_then_every_fault_as_the_fleet_sees_it(
    make_harness, pki_dir: PkiPaths, tmp_path: Path
) -> None:
    ids = device_ids(DEVICES, f"dev-sim{uuid.uuid4().hex[:6]}")
    async with make_harness(offline_after_s=OFFLINE_AFTER_S) as h:
        for device_id in ids:
            await h.add_device(device_id)
        sim = Simulator(settings_for(h, ids, tmp_path, pki_dir), rng=random.Random(7))
        await sim.start()
        try:
            await sim.wait_connected(within_s=30)

            async def all_online() -> bool:
                return online(await devices(h, ids), ids)

            await wait_until(all_online, timeout=20, what="every simulated device online")

            die, off, hang, drop, unplug, drift = (ids[i : i + 2] for i in range(0, 12, 2))
            healthy = ids[12:]
            hit = time.monotonic()
            assert set(await sim.fault(Fault.DIE, die)) == set(die)
            assert set(await sim.fault(Fault.OFF, off)) == set(off)
            assert set(await sim.fault(Fault.HANG, hang)) == set(hang)
            assert set(await sim.fault(Fault.DROP, drop)) == set(drop)
            assert set(await sim.fault(Fault.UNPLUG, unplug)) == set(unplug)
            assert set(await sim.fault(Fault.DRIFT, drift, offset_s=120)) == set(drift)

            # die: the Last Will; off: the agent's own "offline"; both at once.
            async def dead_offline() -> bool:
                return offline(await devices(h, ids), die + off)

            await wait_until(dead_offline, timeout=OFFLINE_AFTER_S, what="dead devices offline")
            rows = await devices(h, ids)
            # Silence needs at least threshold - heartbeat interval (2 s) after the hit.
            if time.monotonic() - hit < 1.5:
                assert all(rows[i].connectivity is Connectivity.ONLINE for i in hang + drop), (
                    "a hung or cut-off device only goes offline by silence"
                )

            # hang / drop: offline after the heartbeat-silence threshold (or the keepalive).
            async def silent_offline() -> bool:
                return offline(await devices(h, ids), hang + drop)

            await wait_until(silent_offline, timeout=OFFLINE_AFTER_S + 4, what="silent offline")
            assert time.monotonic() - hit >= OFFLINE_AFTER_S - 1.5, "not by silence"

            # unplug: a camera fault; drift: the heartbeats' clock skew.
            async def camera_and_clock() -> bool:
                rows = await devices(h, ids)
                return all(rows[i].camera is CameraHealth.UNPLUGGED for i in unplug) and all(
                    rows[i].clock_skew_s is not None and 115 < rows[i].clock_skew_s < 125
                    for i in drift
                )

            await wait_until(camera_and_clock, timeout=8, what="camera fault and clock skew")
            rows = await devices(h, ids)
            assert online(rows, healthy + unplug + drift)
            assert all(rows[i].camera is CameraHealth.OK for i in healthy)

            # recover: every device back online with a working camera.
            faulty = die + off + hang + drop + unplug + drift
            assert set(await sim.recover(faulty)) == set(faulty)

            async def all_back() -> bool:
                rows = await devices(h, ids)
                return online(rows, ids) and all(rows[i].camera is CameraHealth.OK for i in ids)

            await wait_until(all_back, timeout=20, what="every device back")
            status = sim.status()
            assert status["connected"] == DEVICES and status["crashed"] == 0
            # Rebooted devices connect again; a short drop resumes the same connection.
            assert status["connects"] >= DEVICES + len(die + off + hang)
        finally:
            await sim.stop()


def test_control_lines_parse() -> None:
    assert parse_command("die 3") == Command("die", count=3)
    assert parse_command("drift 120:50 dev-a1 2") == Command(
        "drift", ["dev-a1"], 2, offset_s=120, rate_ppm=50
    )
    assert parse_command("recover all").all
    assert parse_command("hang dev-a1 dev-b2").line() == "hang dev-a1 dev-b2"
    for bad in ("", "explode 1", "die", "die x", "status 1", "drift"):
        with pytest.raises(ValueError):
            parse_command(bad)


def test_fault_rates_parse_per_device_per_second() -> None:
    rates = parse_rates(("die=0.36/h,hang=86.4/d", "drop=1/s"))
    assert rates == {
        Fault.DIE: pytest.approx(1e-4),
        Fault.HANG: pytest.approx(1e-3),
        Fault.DROP: 1.0,
    }
    with pytest.raises(click.BadParameter, match="KIND=RATE"):
        parse_rates(("melt=1/h",))
