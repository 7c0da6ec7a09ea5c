"""Chaos 5: mass disconnects raise ONE platform incident for IT support, while every
affected resident's visit is still raised (fleet/incident.py, end to end).

60 devices with a check due within the visit horizon: 40 reach the broker through a
proxy (a network segment), 20 directly. A fleet service process, the test's own broker.

0. Three devices die one by one: three visits, no incident.
1. The segment goes down (every connection closed, new ones refused): one incident
   (``mass_disconnect``), a visit for each of the 40; the segment comes back: it closes.
2. The broker is SIGKILLed and stays down past the offline threshold: one incident
   (the fleet's link and the devices both go), closed when it is back.

Checked in the metrics, the audit log (counts only) and the outbox (``incident.*``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from broker.launcher import MosquittoProcess
from broker.pki import PkiPaths
from fleet.db import init_db, make_engine
from fleet.models import AuditEvent, Connectivity, Device, Visit
from fleet.models import Window as WindowRow
from fleet.plan_models import OutboxEvent
from tests.chaos.conftest import Report
from tests.chaos.harness import AgentHerd, FleetProc, SharedClock, devices, fleet_values, until
from tests.chaos.netfault import FaultProxy
from tests.integration.fleet_harness import local_hms

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEGMENT, DIRECT, SINGLE_DEATHS = 40, 20, 3
OFFLINE_AFTER_S = 4.0


def visits(engine: Engine) -> Counter[str]:
    """Offline visits per device (one per device and check: the visit key)."""
    with Session(engine) as s:
        rows = s.exec(select(Visit)).all()
    return Counter(v.device_id or "" for v in rows if v.cause.value == "device_offline")


@pytest.mark.timeout(300)
async def test_mass_disconnect_is_one_platform_incident_and_every_visit(
    tmp_path: Path, chaos_pki: PkiPaths, broker: MosquittoProcess, chaos_report: Report
) -> None:
    t_start = time.monotonic()
    clock = SharedClock(tmp_path / "offset", time.time())
    values = fleet_values(
        tmp_path,
        chaos_pki,
        broker.port,
        offline_after_s=OFFLINE_AFTER_S,
        liveness_interval_s=0.25,
        sweep_interval_s=1.0,
        incident_settle_s=3.0,
    )
    engine = make_engine(values["database_url"])
    init_db(engine)
    segment = [f"dev-ms{i:03d}" for i in range(SEGMENT)]
    direct = [f"dev-md{i:03d}" for i in range(DIRECT)]
    hms, _ = local_hms(1800)  # a check in 30 minutes: inside the visit horizon
    with Session(engine) as s:
        for device_id in segment + direct:
            s.add(Device(id=device_id, resident_id=f"res-{device_id[4:]}"))
            s.add(WindowRow(device_id=device_id, start_local=hms, duration_s=600))
        s.commit()
    proxy = await FaultProxy(broker.port).start()
    fleet = FleetProc(tmp_path, values, clock)
    fleet.start()
    herd = AgentHerd(
        tmp_path, chaos_pki, clock, fleet.public_key, broker_port=broker.port, heartbeat_s=1
    )

    async def incident(active: int) -> bool:
        return await fleet.metric("tillsyn_platform_incident_active") == active

    async def opened() -> float:
        return await fleet.metric("tillsyn_platform_incidents_total")

    async def state_of(ids: list[str], want: Connectivity) -> bool:
        seen = devices(engine)
        return all(seen[d].connectivity is want for d in ids)

    async def back_online(ids: list[str], what: str) -> None:
        """Wait for these devices to be online again; on a timeout, say which are not and
        what their agents think (the failure this guards against was seen once in CI)."""
        try:
            await until(lambda: state_of(ids, Connectivity.ONLINE), timeout=60, what=what)
        except AssertionError as exc:
            seen = devices(engine)
            late = [d for d in ids if seen[d].connectivity is not Connectivity.ONLINE]
            detail = [
                (
                    d,
                    seen[d].connectivity.value,
                    herd.agents[d].connected,
                    dict(herd.agents[d].counters),
                    _task_end(herd.tasks.get(d)),  # an agent whose run() ended never returns
                )
                for d in late
            ]
            raise AssertionError(
                f"{exc}; not online (device, fleet's view, agent connected, agent counters,"
                f" agent task): {detail}; proxy accepted {proxy.accepted}; fleet log:"
                f" {fleet.log}"
            ) from exc

    try:
        await fleet.wait_leading()
        for device_id in segment:
            herd.add(device_id, port=proxy.port)
        for device_id in direct:
            herd.add(device_id)
        await until(
            lambda: state_of(segment + direct, Connectivity.ONLINE), timeout=60, what="online"
        )

        # 0. a few devices die one by one: their visits, no incident ----------------------
        dead = direct[:SINGLE_DEATHS]
        for device_id in dead:
            await herd.power_cut(device_id)
            await until(
                lambda d=device_id: state_of([d], Connectivity.OFFLINE), timeout=30, what=device_id
            )
        await until(lambda: _true(set(dead) <= set(visits(engine))), timeout=20, what="visits")
        quiet_incidents = await opened()
        alive_direct = direct[SINGLE_DEATHS:]

        # 1. a network segment goes down ------------------------------------------------
        t0 = time.monotonic()
        proxy.set_cut(True)
        await until(lambda: incident(1), timeout=30, what="incident opened for the segment")
        seg_open_s = time.monotonic() - t0
        await until(
            lambda: state_of(segment, Connectivity.OFFLINE), timeout=30, what="segment offline"
        )
        await until(
            lambda: _true(set(segment) <= set(visits(engine))), timeout=30, what="segment visits"
        )
        seg_visits_s = time.monotonic() - t0
        await asyncio.sleep(2)  # the rest of the outage must not open a second one
        assert await opened() == 1
        t1 = time.monotonic()
        proxy.set_cut(False)
        await back_online(segment, "segment back")
        await until(lambda: incident(0), timeout=30, what="segment incident closed")
        seg_close_s = time.monotonic() - t1

        # 2. the broker dies past the offline threshold --------------------------------
        t0 = time.monotonic()
        broker.kill()
        await until(lambda: incident(1), timeout=30, what="incident opened for the broker")
        broker_open_s = time.monotonic() - t0
        await asyncio.sleep(max(0.0, 2 * OFFLINE_AFTER_S - (time.monotonic() - t0)))
        await asyncio.to_thread(broker.start)
        t1 = time.monotonic()
        await back_online(segment + alive_direct, "all back")
        await until(lambda: incident(0), timeout=30, what="broker incident closed")
        broker_close_s = time.monotonic() - t1
        total = await opened()
        by_reason = {
            r: await fleet.metric("tillsyn_platform_incidents_total", reason=r)
            for r in ("mass_disconnect", "broker_link")
        }
    finally:
        # The fleet first: stopping 57 devices is itself a mass disconnect, and a fleet
        # still running opened a third incident after the measurement (seen once in CI).
        fleet.stop()
        await herd.stop()
        await proxy.close()
    with Session(engine) as s:
        audit = s.exec(
            select(AuditEvent)
            .where(col(AuditEvent.action).startswith("incident."))
            .order_by(col(AuditEvent.id))
        ).all()
        events = s.exec(
            select(OutboxEvent).where(col(OutboxEvent.kind).startswith("incident."))
        ).all()
    per_device = visits(engine)
    engine.dispose()
    chaos_report(
        "mass disconnect: one platform incident, every visit",
        [
            ("devices (segment / direct)", f"{SEGMENT} / {DIRECT}"),
            (
                "single deaths: visits / incidents",
                f"{sum(per_device[d] for d in dead)} / {quiet_incidents:g}",
            ),
            ("segment down: incident opened after (s)", round(seg_open_s, 1)),
            ("segment down: all 40 visits raised after (s)", round(seg_visits_s, 1)),
            ("segment back: incident closed after (s)", round(seg_close_s, 1)),
            ("broker killed: incident opened after (s)", round(broker_open_s, 1)),
            ("broker back: incident closed after (s)", round(broker_close_s, 1)),
            ("incidents opened (by reason)", f"{total:g} {by_reason}"),
            ("audit entries", [a.action for a in audit]),
            ("outbox events", [e.kind for e in events]),
            ("offline visits (devices / total)", f"{len(per_device)} / {sum(per_device.values())}"),
            ("test wall time (s)", round(time.monotonic() - t_start, 1)),
        ],
    )
    assert quiet_incidents == 0
    assert total == 2  # one per outage
    assert [a.action for a in audit] == ["incident.opened", "incident.closed"] * 2
    assert all("dev-" not in a.detail and "res-" not in a.detail for a in audit)
    assert [e.kind for e in events] == ["incident.opened", "incident.closed"] * 2
    online = SEGMENT + DIRECT - SINGLE_DEATHS  # the share threshold: 20 % of these
    assert json.loads(events[0].payload)["incident"]["offline"] >= 0.2 * online
    assert set(segment) | set(dead) <= set(per_device)  # every affected resident: a visit
    assert max(per_device.values()) == 1  # one visit per device and check, whatever happened


async def _true(value: bool) -> bool:
    return value


def _task_end(task: asyncio.Task[None] | None) -> str:
    if task is None:
        return "no task"
    if not task.done():
        return "running"
    if task.cancelled():
        return "cancelled"
    return f"ended: {task.exception()!r}"
