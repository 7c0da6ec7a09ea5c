"""The fleet loop end to end on PostgreSQL: registration, arm and ack, offline -> visit.

The same service, Mosquitto and agent processes as ``test_fleet_loop.py``; only the
database differs (a fresh migrated PostgreSQL database, see ``tests/conftest.py``), so the
scheduler lock is PostgreSQL's advisory lock and every write path runs on it.
"""

from __future__ import annotations

import signal

import pytest
from sqlmodel import col, select

from fleet import audit
from fleet.models import Command, CommandStatus, Connectivity, VisitCause
from tests.integration.fleet_harness import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("database_url", ["postgres"], indirect=True),
]


async def test_fleet_loop_on_postgresql(make_harness, database_url: str) -> None:
    assert database_url.startswith("postgresql")
    device_id = "dev-pg-loop"
    async with make_harness(database_url=database_url, offline_after_s=3) as h:
        assert h.service.engine.dialect.name == "postgresql"
        await h.add_device(device_id)
        agent = h.agent(device_id, heartbeat_s=1)

        async def online() -> bool:
            device = await h.device(device_id)
            return device.connectivity is Connectivity.ONLINE and device.reported_at is not None

        await wait_until(online, timeout=10, what="agent online")

        # A window: armed at its start (signed command, acked), locked at its end.
        start = await h.add_window(device_id, start_in_s=2, duration_s=3)
        await wait_until(lambda: h.state_is(device_id, "ARMED"), timeout=8, what="ARMED")
        assert (await h.device(device_id)).armed_until == pytest.approx(start + 3)
        await wait_until(lambda: h.state_is(device_id, "LOCKED"), timeout=8, what="LOCKED")

        def ledger(s):
            stmt = select(Command).where(Command.device_id == device_id)
            return s.exec(stmt.order_by(col(Command.id))).all()

        rows = await h.service.db(h.service.ops.run, ledger)
        arms = [c for c in rows if c.kind.value == "arm"]
        assert len(arms) == 1 and arms[0].status is CommandStatus.APPLIED
        assert arms[0].acked_at is not None
        # Heartbeats reached the database through the batched liveness write.
        assert (await h.device(device_id)).last_seen is not None

        # The device dies with a window due within the horizon: one physical visit.
        await h.add_window(device_id, start_in_s=600, duration_s=300)
        agent.signal(signal.SIGKILL)
        visits = await wait_until(lambda: h.visits(device_id), timeout=6, what="visit")
        assert [v.cause for v in visits] == [VisitCause.DEVICE_OFFLINE]
        assert (await h.device(device_id)).connectivity is Connectivity.OFFLINE

        # Every step above was audited on one unbroken chain.
        report = await h.service.db(h.service.ops.run, audit.verify)
        assert report.ok and report.entries >= 5, report
