"""Chaos 4: a device offline across a whole window, back after it: the arm queued for it
must never open the window late.

Two independent guards, one device each:

- ``dev-stale-token``: its window (22:00-22:10) passes in *simulated* time while it is
  away, so the broker still holds the queued arm when it returns (the broker's message
  expiry runs on real time). The token's ``until`` must make the device refuse it.
- ``dev-stale-expiry``: its 8-second window passes in *real* time while it is away: the
  broker's MQTT 5 message expiry (= the token's delivery deadline) drops the queued arm
  before the device is back, so it never even sees it.

Both must end LOCKED, never armed, with a visit raised for the missed check.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
from sqlmodel import Session, select

from broker.launcher import MosquittoProcess
from broker.pki import PkiPaths
from fleet.db import init_db, make_engine
from fleet.models import CommandStatus, Connectivity, Device, Visit
from fleet.models import Window as WindowRow
from tests.chaos.conftest import Report
from tests.chaos.harness import (
    AgentHerd,
    FleetProc,
    SharedClock,
    Watch,
    Window,
    devices,
    fleet_values,
    ledger,
    until,
)
from tests.integration.sim_night import local
from tillsyn_protocol import CommandKind, LockState
from tillsyn_protocol.windows import STOCKHOLM

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN, EXPIRY = "dev-stale-token", "dev-stale-expiry"


@pytest.mark.timeout(300)
async def test_offline_across_a_window_never_arms_late(
    tmp_path: Path, chaos_pki: PkiPaths, broker: MosquittoProcess, chaos_report: Report
) -> None:
    t_start = time.monotonic()
    clock = SharedClock(tmp_path / "offset", local("2027-02-15 21:59:00"))
    values = fleet_values(
        tmp_path,
        chaos_pki,
        broker.port,
        offline_after_s=3.0,
        sweep_interval_s=1.0,
        resend_after_s=1.0,
    )
    engine = make_engine(values["database_url"])
    init_db(engine)
    windows = {
        TOKEN: [Window(local("2027-02-15 22:00:00"), local("2027-02-15 22:10:00"))],
        EXPIRY: [Window(local("2027-02-15 21:59:50"), local("2027-02-15 21:59:58"))],
    }
    with Session(engine) as s:
        for device_id, (w,) in windows.items():
            s.add(Device(id=device_id, resident_id=f"res-{device_id[4:]}"))
            s.add(
                WindowRow(
                    device_id=device_id,
                    start_local=datetime.fromtimestamp(w.start, STOCKHOLM).strftime("%H:%M:%S"),
                    duration_s=int(w.end - w.start),
                )
            )
        s.commit()
    fleet = FleetProc(tmp_path, values, clock)
    fleet.start()
    herd = AgentHerd(
        tmp_path, chaos_pki, clock, fleet.public_key, broker_port=broker.port, heartbeat_s=1
    )
    watch = Watch(windows, clock)

    async def sample() -> None:
        while True:
            watch.sample(herd.agents.values())
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    try:
        await fleet.wait_leading()
        for device_id in windows:
            herd.add(device_id)

        async def online(want: Connectivity) -> bool:
            seen = devices(engine)
            return all(seen[d].connectivity is want for d in windows)

        await until(lambda: online(Connectivity.ONLINE), timeout=30, what="online")
        clock.jump_to(local("2027-02-15 21:59:40"))
        while clock() < local("2027-02-15 21:59:45"):
            await asyncio.sleep(0.05)
        for device_id in windows:  # both lose power before their windows
            await herd.power_cut(device_id)
        await until(lambda: online(Connectivity.OFFLINE), timeout=30, what="seen offline")
        # Real time through EXPIRY's whole window, and past the start of TOKEN's: the
        # fleet has issued both arms and the broker queued them for the absent devices.
        while clock() < local("2027-02-15 22:00:05"):
            await asyncio.sleep(0.1)
        queued = {c.device_id: c for c in ledger(engine, (CommandKind.ARM,))}
        assert set(queued) == set(windows), queued
        clock.jump_to(local("2027-02-15 22:15:00"))  # TOKEN's window passes, simulated
        await asyncio.sleep(3)  # the fleet notices the jump and expires the arm

        for device_id in windows:  # both come back: rebooted agents, same persistent sessions
            herd.add(device_id)
        await until(lambda: online(Connectivity.ONLINE), timeout=30, what="back online")

        async def heard_out() -> bool:  # whatever the broker still held has been delivered
            return all(herd.agents[d].counters["received"] >= (d == TOKEN) for d in windows)

        await until(heard_out, timeout=20, what="queued arm delivered to dev-stale-token")
        await asyncio.sleep(3)
        seen = devices(engine)
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        await herd.stop()
        fleet.stop()
    commands = ledger(engine)
    with Session(engine) as s:
        visits = [(v.device_id, v.cause.value) for v in s.exec(select(Visit)).all()]
    engine.dispose()
    stale_applied = {d: len(herd.applied.get(d, [])) for d in windows}
    received = {d: herd.agents[d].counters["received"] for d in windows}
    chaos_report(
        "device offline across its whole window",
        [
            ("arms queued for absent devices", len(queued)),
            ("ledger", dict(Counter(f"{c.kind.value}:{c.status.value}" for c in commands))),
            ("stale arm delivered after the window (token until)", received[TOKEN]),
            ("stale arm delivered after the window (message expiry)", received[EXPIRY]),
            ("refused by the device", dict(herd.refused)),
            ("stale commands executed", sum(stale_applied.values())),
            ("armed at any moment", len(watch.opened) + len(watch.past_end) + len(watch.outside)),
            ("ends locked (agent)", sum(herd.agents[d].state is LockState.LOCKED for d in windows)),
            (
                "ends locked (fleet)",
                sum(seen[d].reported_state is LockState.LOCKED for d in windows),
            ),
            ("visits raised", visits),
            ("test wall time (s)", round(time.monotonic() - t_start, 1)),
        ],
    )
    assert sum(stale_applied.values()) == 0
    assert not watch.opened and not watch.past_end and not watch.outside
    assert received[TOKEN] >= 1 and sum(herd.refused.values()) >= 1  # the until guard bit
    assert received[EXPIRY] == 0  # the broker dropped it (message expiry)
    for device_id in windows:
        assert herd.agents[device_id].state is LockState.LOCKED
        assert seen[device_id].reported_state is LockState.LOCKED
    assert all(c.status is not CommandStatus.APPLIED for c in commands if c.kind is CommandKind.ARM)
    assert {d for d, cause in visits if cause == "device_offline"} == set(windows)
