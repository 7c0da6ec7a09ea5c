"""Chaos 1: the broker SIGKILLed and restarted many times during a simulated night.

``TILLSYN_CHAOS_DEVICES`` in-process agents (default 1000, the issue's size),
each with one 10-minute window in one of four cohorts (22:00, 22:20, 22:40, 23:00), a
fleet service process on the shared simulated clock, and the test's own Mosquitto
(production config, persistence on, autosave every 60 s: a SIGKILL loses the sessions
and queued commands since the last save, as it would in production). The broker is
killed at chosen seconds around window starts and ends (before, just after, in the
middle), stays down 1-4 s, and comes back on the same port.

Nothing may be lost: every arm/disarm the fleet issued ends applied or superseded, every
window opens, no command is applied twice by a device, and no device is ever armed after
its window's end (sampled from the agents themselves, not from what they report).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from pathlib import Path

import pytest

from broker.launcher import MosquittoProcess
from broker.pki import PkiPaths
from fleet.db import init_db, make_engine
from fleet.models import CommandStatus, Connectivity
from tests.chaos.conftest import Report
from tests.chaos.harness import (
    AgentHerd,
    FleetProc,
    SharedClock,
    Watch,
    devices,
    fleet_values,
    ledger,
    seed_cohorts,
    until,
)
from tests.integration.sim_night import local
from tillsyn_protocol import LockState

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEVICES = int(os.environ.get("TILLSYN_CHAOS_DEVICES", "1000"))
COHORTS = ("22:00", "22:20", "22:40", "23:00")
WINDOW_S = 600
LEAD_S = 3.0  # jump to this many seconds before the next moment; real time does the rest
# (cohort, edge, seconds from the edge, seconds down): around every start and end.
KILLS = [
    (0, "start", -2.0, 3.0),
    (0, "end", -3.0, 4.0),
    (1, "start", 1.0, 2.0),
    (1, "start", 300.0, 2.0),
    (1, "end", 0.5, 1.5),
    (2, "start", -0.5, 1.0),
    (2, "end", -1.0, 2.0),
    (3, "start", 2.0, 3.0),
    (3, "end", -5.0, 2.0),
    (3, "end", 2.0, 1.0),
]


def edge_of(cohort: int, edge: str) -> float:
    start = local(f"2027-02-15 {COHORTS[cohort]}")
    return start if edge == "start" else start + WINDOW_S


@pytest.mark.timeout(900)
async def test_broker_killed_many_times_during_a_night(
    tmp_path: Path, chaos_pki: PkiPaths, broker: MosquittoProcess, chaos_report: Report
) -> None:
    """1000 devices: about 3.5 minutes on 2 busy cores (each of the ten restarts is a
    storm of 1000 TLS handshakes in this one Python process); ``TILLSYN_CHAOS_DEVICES``
    sets another size (500 takes about 1.5 minutes)."""
    t_start = time.monotonic()
    clock = SharedClock(tmp_path / "offset", local("2027-02-15 21:55"))
    values = fleet_values(tmp_path, chaos_pki, broker.port)
    engine = make_engine(values["database_url"])
    init_db(engine)
    ids = [f"dev-bc{i:05d}" for i in range(DEVICES)]
    windows = seed_cohorts(engine, ids, COHORTS, WINDOW_S, lambda c: edge_of(c, "start"))
    fleet = FleetProc(tmp_path, values, clock)
    fleet.start()
    herd = AgentHerd(tmp_path, chaos_pki, clock, fleet.public_key, broker_port=broker.port)
    watch = Watch(windows, clock)
    reconnect_s: list[float] = []
    down_total = 0.0

    async def sample() -> None:
        while True:
            watch.sample(herd.agents.values())
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample())
    try:
        await fleet.wait_leading()
        for device_id in ids:
            herd.add(device_id)

        async def all_online() -> bool:
            online = sum(d.connectivity is Connectivity.ONLINE for d in devices(engine).values())
            return herd.connected() == DEVICES and online == DEVICES

        await until(all_online, timeout=180, what=f"{DEVICES} devices online")
        setup_s = time.monotonic() - t_start

        async def kill(down_s: float) -> None:
            nonlocal down_total
            broker.kill()
            await asyncio.sleep(down_s)
            down_total += down_s
            await asyncio.to_thread(broker.start)
            t0 = time.monotonic()
            await until(
                lambda: _true(herd.connected() == DEVICES), timeout=120, what="agents reconnected"
            )
            reconnect_s.append(time.monotonic() - t0)

        def cohort_ids(cohort: int) -> list[str]:
            return ids[cohort :: len(COHORTS)]

        async def all_in(cohort: int, state: LockState) -> None:
            async def ok() -> bool:
                return all(herd.agents[d].state is state for d in cohort_ids(cohort))

            await until(ok, timeout=120, what=f"cohort {cohort} {state.value}")

        moments = [(edge_of(c, e) + off, "kill", c, down) for c, e, off, down in KILLS]
        for c in range(len(COHORTS)):
            moments.append((edge_of(c, "start") + 2.0, "armed", c, 0.0))
            moments.append((edge_of(c, "end") + 2.0, "locked", c, 0.0))
        for instant, what, cohort, down in sorted(moments):
            # Never jump over a window end: every end has a moment, and we land before it.
            clock.jump_to(instant - LEAD_S)
            while clock() < instant:
                await asyncio.sleep(0.05)
            if what == "kill":
                await kill(down)
            elif what == "armed":
                await all_in(cohort, LockState.ARMED)
            else:
                await all_in(cohort, LockState.LOCKED)

        # Settle: the ledger has nothing pending and the fleet sees every device locked.
        async def settled() -> bool:
            pending = [c for c in ledger(engine) if c.status is CommandStatus.PENDING]
            locked = all(d.reported_state is LockState.LOCKED for d in devices(engine).values())
            return not pending and locked

        clock.jump_to(local("2027-02-15 23:30"))
        await until(settled, timeout=120, what="ledger settled, fleet sees all locked")
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await herd.stop()
        fleet.stop()
    commands = ledger(engine)
    engine.dispose()
    status = Counter(c.status.value for c in commands)
    by_kind = Counter(c.kind.value for c in commands)
    lost = [
        c for c in commands if c.status not in (CommandStatus.APPLIED, CommandStatus.SUPERSEDED)
    ]
    applied_ledger = {c.jti for c in commands if c.status is CommandStatus.APPLIED}
    applied_agents = {j for jtis in herd.applied.values() for j in jtis}
    expected = {(d, w.end) for d, ws in windows.items() for w in ws}
    missed = expected - watch.opened.keys()
    twice = herd.applied_twice()
    duplicates = sum(a.counters["duplicate"] for a in herd.agents.values())
    chaos_report(
        "broker SIGKILLed during a night",
        [
            ("devices", DEVICES),
            ("broker kills", len(reconnect_s)),
            ("broker down total (s)", round(down_total, 1)),
            ("all agents reconnected after restart, max (s)", round(max(reconnect_s), 1)),
            (
                "all agents reconnected after restart, mean (s)",
                round(sum(reconnect_s) / len(reconnect_s), 1),
            ),
            ("arm / disarm issued", f"{by_kind['arm']} / {by_kind['disarm']}"),
            ("ledger status", dict(status)),
            ("commands lost", len(lost)),
            ("commands applied twice", len(twice)),
            ("duplicate deliveries refused as duplicate", duplicates),
            ("token refusals at agents", dict(herd.refused)),
            ("applied by agents, not applied in ledger", len(applied_agents - applied_ledger)),
            ("windows opened", f"{len(expected) - len(missed)} / {len(expected)}"),
            ("windows open past their end", len(watch.past_end)),
            ("armed outside any window", len(watch.outside)),
            ("state samples", watch.samples),
            ("setup (s)", round(setup_s, 1)),
            ("test wall time (s)", round(time.monotonic() - t_start, 1)),
        ],
    )
    assert lost == [], [(c.device_id, c.kind.value, c.status.value) for c in lost[:10]]
    assert twice == []
    assert watch.past_end == [] and watch.outside == []
    assert missed == set(), sorted(missed)[:10]


async def _true(value: bool) -> bool:
    return value
