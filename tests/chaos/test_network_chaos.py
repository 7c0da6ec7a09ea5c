"""Chaos 3: network faults between the agents and the broker.

Agents reach the broker through :class:`tests.chaos.netfault.FaultProxy` (a userspace
TCP proxy on loopback: delay, jitter, loss as retransmission stalls, half-open
connections); the fleet service process talks to the broker directly. Heartbeat 1 s,
offline threshold 6 s, keepalive 5 s (the agent's minimum); production is 30 / 90 / 30 s
(the offline threshold here is 6 heartbeats, not 3: a margin for a busy CI machine).

1. Moderate faults (100-200 ms delay, 5 % loss with 200 ms+ stalls) while windows open
   and close: no false offline alarm, every command applied; meanwhile some devices
   really die (power cut: no FIN, the connection just goes silent) and every death is
   detected.
2. Every connection goes half-open: the agents' keepalive finds it, they reconnect, and
   the fleet sees every live device online again.
3. Duplicated and reordered commands, at the MQTT level (a TCP stream cannot carry
   either): a command delivered twice more through the broker, and an old one after a
   newer: no second application, no state change.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiomqtt
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from broker.launcher import MosquittoProcess
from broker.pki import PkiPaths
from fleet.db import init_db, make_engine
from fleet.models import AuditEvent, CommandStatus, Connectivity, Device
from fleet.models import Window as WindowRow
from tests.chaos.conftest import Report
from tests.chaos.harness import (
    AgentHerd,
    FleetProc,
    SharedClock,
    devices,
    fleet_values,
    ledger,
    until,
)
from tests.chaos.netfault import FaultProxy
from tests.helpers import make_client_ssl_context
from tests.integration.fleet_harness import local_hms
from tillsyn_protocol import Channel, CommandKind, LockState, device_topic

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 30
DEATHS = 5
OFFLINE_AFTER_S = 6.0


def offline_alarms(engine: Engine) -> list[tuple[str, float]]:
    with Session(engine) as s:
        rows = s.exec(
            select(AuditEvent)
            .where(AuditEvent.action == "device.offline")
            .order_by(col(AuditEvent.id))
        ).all()
    return [(r.subject or "", r.ts) for r in rows]


@pytest.mark.timeout(300)
async def test_loss_delay_half_open_duplicates_and_reordering(
    tmp_path: Path, chaos_pki: PkiPaths, broker: MosquittoProcess, chaos_report: Report
) -> None:
    t_start = time.monotonic()
    clock = SharedClock(tmp_path / "offset", time.time())  # real time: the broker's too
    values = fleet_values(
        tmp_path,
        chaos_pki,
        broker.port,
        offline_after_s=OFFLINE_AFTER_S,
        liveness_interval_s=0.25,
        sweep_interval_s=1.0,
        resend_after_s=1.0,
    )
    engine = make_engine(values["database_url"])
    init_db(engine)
    ids = [f"dev-nf{i:03d}" for i in range(N)]
    with Session(engine) as s:
        for i, device_id in enumerate(ids):
            s.add(Device(id=device_id, resident_id=f"res-nf{i:03d}"))
        s.commit()
    proxy = await FaultProxy(broker.port).start()
    fleet = FleetProc(tmp_path, values, clock)
    fleet.start()
    herd = AgentHerd(
        tmp_path,
        chaos_pki,
        clock,
        fleet.public_key,
        broker_port=proxy.port,
        heartbeat_s=1,
        keepalive_s=5,
        reconnect_max_s=1,
    )
    try:
        await fleet.wait_leading()
        for device_id in ids:
            herd.add(device_id)

        async def online(want: set[str]) -> bool:
            seen = devices(engine)
            return all(seen[d].connectivity is Connectivity.ONLINE for d in want)

        await until(lambda: online(set(ids)), timeout=60, what="all online")

        # 1. moderate loss and delay, windows opening and closing, some real deaths ------
        proxy.faults.delay_s, proxy.faults.jitter_s = 0.1, 0.1
        proxy.faults.loss, proxy.faults.rto_s = 0.05, 0.2
        before = len(offline_alarms(engine))
        hms, start = local_hms(4)
        with Session(engine) as s:
            for device_id in ids:
                s.add(WindowRow(device_id=device_id, start_local=hms, duration_s=12))
            s.commit()
        dead = ids[-DEATHS:]
        alive = ids[:-DEATHS]
        await asyncio.sleep(max(0.0, start + 5 - time.time()))

        async def armed() -> bool:
            return all(herd.agents[d].state is LockState.ARMED for d in alive)

        await until(armed, timeout=20, what="armed through a lossy link")
        # A power cut sends no FIN: half-open the device's connection, then end the agent.
        for device_id in dead:
            client = herd.agents[device_id].mqtt_client
            assert client is not None
            assert proxy.blackhole_peer(client._client.socket().getsockname()[1])
        died_at = time.time()
        for device_id in dead:
            await herd.power_cut(device_id)

        async def deaths_seen() -> bool:
            seen = devices(engine)
            return all(seen[d].connectivity is Connectivity.OFFLINE for d in dead)

        await until(deaths_seen, timeout=30, what="real deaths detected")
        alarms = offline_alarms(engine)[before:]
        detection = [ts - died_at for d, ts in alarms if d in dead]
        await asyncio.sleep(max(0.0, start + 12 + 8 - time.time()))  # window over, quiet

        async def settled() -> bool:
            pending = [
                c
                for c in ledger(engine)
                if c.status is CommandStatus.PENDING and c.device_id in alive
            ]
            return not pending and all(herd.agents[d].state is LockState.LOCKED for d in alive)

        await until(settled, timeout=30, what="window closed, ledger settled")
        alarms = offline_alarms(engine)[before:]
        false_alarms = [d for d, _ in alarms if d not in dead]
        missed_deaths = [d for d in dead if d not in {a for a, _ in alarms}]
        lost = [
            c
            for c in ledger(engine)
            if c.device_id in alive
            and c.status not in (CommandStatus.APPLIED, CommandStatus.SUPERSEDED)
        ]
        stalls = proxy.stalls

        # 2. half-open: nothing passes, nothing is closed -------------------------------
        disconnects = {d: herd.agents[d].counters["disconnects"] for d in alive}
        timeouts_before = broker.log_path.read_text().count("exceeded timeout")
        t_hole = time.monotonic()
        proxy.blackhole_now()

        async def noticed() -> bool:
            return all(herd.agents[d].counters["disconnects"] > disconnects[d] for d in alive)

        await until(noticed, timeout=30, every=0.1, what="agents' keepalive finds half-open")
        agent_detect_s = time.monotonic() - t_hole
        await until(lambda: online(set(alive)), timeout=30, what="live devices back online")
        back_s = time.monotonic() - t_hole
        broker_timeouts = broker.log_path.read_text().count("exceeded timeout") - timeouts_before

        # 3. duplicates and reordering through the broker --------------------------------
        proxy.faults.delay_s = proxy.faults.jitter_s = proxy.faults.loss = 0.0
        target = alive[0]
        arms = [c for c in ledger(engine, (CommandKind.ARM,)) if c.device_id == target]
        (old_arm,) = arms
        hms, start = local_hms(3)
        with Session(engine) as s:
            s.add(WindowRow(device_id=target, start_local=hms, duration_s=20))
            s.commit()
        await until(
            lambda: _true(herd.agents[target].state is LockState.ARMED),
            timeout=20,
            what="second window armed",
        )
        (new_arm,) = [
            c
            for c in ledger(engine, (CommandKind.ARM,))
            if c.device_id == target and c.jti != old_arm.jti
        ]
        applied_before = list(herd.applied[target])
        dup_before = herd.agents[target].counters["duplicate"]
        refused_before = herd.agents[target].counters["refused"]
        async with aiomqtt.Client(
            "127.0.0.1",
            broker.port,
            identifier=f"chaos-fleet-{int(time.time())}",
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=make_client_ssl_context(
                chaos_pki, chaos_pki.fleet_cert, chaos_pki.fleet_key
            ),
        ) as client:
            topic = device_topic(target, Channel.CMD)
            for token in (new_arm.token, new_arm.token, old_arm.token):  # dup, dup, reordered
                await client.publish(topic, token, qos=1)
        await until(
            lambda: _true(
                herd.agents[target].counters["duplicate"]
                - dup_before
                + herd.agents[target].counters["refused"]
                - refused_before
                >= 3
            ),
            timeout=15,
            what="duplicates and the stale command answered",
        )
        state_after = herd.agents[target].state
        applied_after = list(herd.applied[target])
        duplicates = herd.agents[target].counters["duplicate"] - dup_before
        stale_refused = herd.agents[target].counters["refused"] - refused_before
    finally:
        await herd.stop()
        fleet.stop()
        await proxy.close()
    engine.dispose()
    chaos_report(
        "network faults between agents and broker",
        [
            ("devices", N),
            ("link", "delay 100-200 ms, 5 % loss as 200 ms+ stalls"),
            ("stalled chunks (lost segments)", stalls),
            ("false offline alarms", len(false_alarms)),
            ("commands lost over the lossy link", len(lost)),
            ("real deaths / detected", f"{DEATHS} / {DEATHS - len(missed_deaths)}"),
            ("death detection, max (s)", round(max(detection), 1)),
            ("half-open connections (live devices)", len(alive)),
            ("found by agents' keepalive within (s)", round(agent_detect_s, 1)),
            ("broker keepalive timeouts logged", broker_timeouts),
            ("all live devices online again within (s)", round(back_s, 1)),
            ("duplicate deliveries answered 'duplicate'", duplicates),
            ("reordered (older) command refused", stale_refused),
            ("applied twice", len(herd.applied_twice())),
            ("test wall time (s)", round(time.monotonic() - t_start, 1)),
        ],
    )
    assert false_alarms == []
    assert missed_deaths == []
    assert lost == []
    assert applied_after == applied_before  # nothing re-applied
    assert duplicates >= 2 and stale_refused >= 1  # (the fleet's own resends add some)
    assert state_after is LockState.ARMED
    assert herd.applied_twice() == []


async def _true(value: bool) -> bool:
    return value
