"""Chaos 2: the fleet service SIGKILLed many times during a simulated night, including
seconds before windows start and end.

A fleet service process on the shared simulated clock (``tests.integration.sim_fleet``),
the test's own broker and in-process agents in three cohorts of 10-minute windows. The
service is SIGKILLed at chosen moments around the edges and started again at once (its
supervisor's job). Asserted: no arm missed (every window opened; late ones are counted
and reported), no device armed past its window's end, the ledger ends with nothing
lost, nothing applied twice. Reported: how long from a restart until the service leads
again, and until every device is in its desired state with nothing pending
("reconciled").
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlmodel import Session, select

from broker.launcher import MosquittoProcess
from broker.pki import PkiPaths
from fleet.db import init_db, make_engine
from fleet.models import CommandStatus, Connectivity, Visit
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

PER_COHORT = 20
COHORTS = ("22:00", "22:30", "23:00")
WINDOW_S = 600
LEAD_S = 3.0
LATE_S = 2.0  # armed more than this after the window start counts as late
# (cohort, edge, seconds from the edge): the fleet is SIGKILLed there and restarted.
KILLS = [
    (0, "start", -20.0),
    (0, "start", 1.0),
    (0, "end", -3.0),
    (1, "start", -2.0),
    (1, "start", 300.0),
    (1, "end", -1.0),
    (2, "start", 0.5),
    (2, "end", -0.5),
    (2, "end", 1.0),
]


def edge_of(cohort: int, edge: str) -> float:
    start = local(f"2027-02-15 {COHORTS[cohort]}")
    return start if edge == "start" else start + WINDOW_S


@pytest.mark.timeout(600)
async def test_fleet_service_killed_many_times_during_a_night(
    tmp_path: Path, chaos_pki: PkiPaths, broker: MosquittoProcess, chaos_report: Report
) -> None:
    t_start = time.monotonic()
    clock = SharedClock(tmp_path / "offset", local("2027-02-15 21:50"))
    values = fleet_values(tmp_path, chaos_pki, broker.port, sweep_interval_s=2.0)
    engine = make_engine(values["database_url"])
    init_db(engine)
    ids = [f"dev-fc{i:04d}" for i in range(PER_COHORT * len(COHORTS))]
    windows = seed_cohorts(engine, ids, COHORTS, WINDOW_S, lambda c: edge_of(c, "start"))
    fleet = FleetProc(tmp_path, values, clock)
    fleet.start()
    herd = AgentHerd(tmp_path, chaos_pki, clock, fleet.public_key, broker_port=broker.port)
    watch = Watch(windows, clock)
    ready_s: list[float] = []
    reconciled_s: list[float] = []

    async def sample() -> None:
        while True:
            watch.sample(herd.agents.values())
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())

    def desired(device_id: str, now: float) -> LockState:
        open_ = any(w.start <= now < w.end for w in windows[device_id])
        return LockState.ARMED if open_ else LockState.LOCKED

    async def reconciled() -> bool:
        """The fleet's view: every device in its desired state, nothing pending."""
        now = clock()
        if any(
            abs(now - w.start) < 1 or abs(now - w.end) < 1 for ws in windows.values() for w in ws
        ):
            return False  # right at an edge the answer is a race; look again
        seen = devices(engine)
        pending = [c for c in ledger(engine) if c.status is CommandStatus.PENDING]
        return not pending and all(seen[d].reported_state is desired(d, now) for d in ids)

    try:
        await fleet.wait_leading()
        for device_id in ids:
            herd.add(device_id)

        async def all_online() -> bool:
            seen = devices(engine).values()
            return sum(d.connectivity is Connectivity.ONLINE for d in seen) == len(ids)

        await until(all_online, timeout=60, what="devices online")

        async def restart() -> None:
            fleet.kill()
            t0 = time.monotonic()
            fleet.start()
            await fleet.wait_leading()
            ready_s.append(time.monotonic() - t0)
            await until(reconciled, timeout=60, what="reconciled after restart")
            reconciled_s.append(time.monotonic() - t0)

        def cohort_ids(cohort: int) -> list[str]:
            return ids[cohort :: len(COHORTS)]

        async def all_in(cohort: int, state: LockState) -> None:
            async def ok() -> bool:
                return all(herd.agents[d].state is state for d in cohort_ids(cohort))

            await until(ok, timeout=60, what=f"cohort {cohort} {state.value}")

        moments = [(edge_of(c, e) + off, "kill", c) for c, e, off in KILLS]
        for c in range(len(COHORTS)):
            moments.append((edge_of(c, "start") + 2.0, "armed", c))
            moments.append((edge_of(c, "end") + 2.0, "locked", c))
        for instant, what, cohort in sorted(moments):
            clock.jump_to(instant - LEAD_S)  # never past an end: each end has a moment
            while clock() < instant:
                await asyncio.sleep(0.05)
            if what == "kill":
                await restart()
            else:
                await all_in(cohort, LockState.ARMED if what == "armed" else LockState.LOCKED)
        clock.jump_to(local("2027-02-15 23:30"))
        await until(reconciled, timeout=60, what="settled at the end of the night")
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await herd.stop()
        fleet.stop()
    commands = ledger(engine)
    with Session(engine) as s:
        visits = Counter(v.cause.value for v in s.exec(select(Visit)).all())
    engine.dispose()
    expected = {(d, w.end): w.start for d, ws in windows.items() for w in ws}
    missed = expected.keys() - watch.opened.keys()
    lateness = [watch.opened[k] - start for k, start in expected.items() if k in watch.opened]
    late = [x for x in lateness if x > LATE_S]
    lost = [
        c for c in commands if c.status not in (CommandStatus.APPLIED, CommandStatus.SUPERSEDED)
    ]
    by_kind = Counter(c.kind.value for c in commands)
    chaos_report(
        "fleet service SIGKILLed during a night",
        [
            ("devices", len(ids)),
            ("fleet kills", len(ready_s)),
            ("restart to leading, max / median (s)", _max_med(ready_s)),
            ("restart to reconciled, max / median (s)", _max_med(reconciled_s)),
            ("arm / disarm issued", f"{by_kind['arm']} / {by_kind['disarm']}"),
            ("ledger status", dict(Counter(c.status.value for c in commands))),
            ("missed arms (window never opened)", len(missed)),
            (f"late arms (> {LATE_S:g} s after start)", len(late)),
            ("arm lateness max (s)", round(max(lateness), 1)),
            ("windows open past their end (missed disarms)", len(watch.past_end)),
            ("commands lost", len(lost)),
            ("commands applied twice", len(herd.applied_twice())),
            ("visits raised", dict(visits)),
            ("test wall time (s)", round(time.monotonic() - t_start, 1)),
        ],
    )
    assert missed == set(), sorted(missed)
    assert watch.past_end == [] and watch.outside == []
    assert lost == [], [(c.device_id, c.kind.value, c.status.value) for c in lost]
    assert herd.applied_twice() == []


def _max_med(values: list[float]) -> str:
    return f"{max(values):.1f} / {statistics.median(values):.1f}"
