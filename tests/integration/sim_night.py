"""A controlled clock for whole simulated nights: the fleet service and real agents (in this
process, real MQTT over mutual TLS to a real Mosquitto) read the same simulated time.

Simulated time = real time + an offset that only grows: between jumps time runs at real
speed (so a look of 2 s lasts 2 s and a heartbeat every 1 s arrives every 1 s), and the
test jumps over the quiet hours. The service notices the jump on its next liveness tick
and re-plans every edge (``FleetService._liveness``); agents re-read the clock at least
every second while armed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from sqlmodel import Session, select

from broker.launcher import free_port
from broker.pki import PkiPaths
from firmware_agent.agent import Agent
from firmware_agent.config import load_config
from firmware_agent.provision import write_agent_config
from fleet import auth, signing
from fleet.config import FleetSettings
from fleet.models import Command, Device, Visit
from fleet.plan_models import Check
from fleet.plan_rules import night_at
from fleet.service import FleetService
from tests.integration.fleet_harness import wait_until
from tillsyn_protocol import Clock
from tillsyn_protocol.windows import STOCKHOLM


def local(text: str) -> float:
    """'2027-02-08 22:00' (Stockholm wall time; fold=0 for an ambiguous one) -> epoch."""
    return datetime.fromisoformat(text).replace(tzinfo=STOCKHOLM).timestamp()


class SimClock:
    def __init__(self, start: float) -> None:
        self.offset = start - time.time()

    def __call__(self) -> float:
        return time.time() + self.offset

    def jump_to(self, instant: float) -> None:
        """Move forward (never back) to ``instant``."""
        self.offset += max(0.0, instant - self())

    def now(self) -> Clock:  # firmware_agent.clock.ClockSource
        return Clock(wall=self(), mono=time.monotonic() + self.offset, synced=True)


@dataclass
class SimAgent:
    agent: Agent
    task: asyncio.Task[None]

    async def die(self) -> None:
        """Power cut: no goodbye, no offline status; the fleet must notice the silence."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self.task, 10)
        assert self.task.done() and not self.agent.connected


@dataclass
class Night:
    service: FleetService
    clock: SimClock
    api: httpx.AsyncClient
    tokens: dict[str, str]
    tmp: Path
    pki: PkiPaths
    broker_port: int
    device_cert: Callable[[str], tuple[Path, Path]]
    agents: dict[str, SimAgent] = field(default_factory=dict)

    # --- setup -------------------------------------------------------------------------

    async def device(self, device_id: str, resident: str, team: str = "north") -> None:
        await self.service.register_device(Device(id=device_id, resident_id=resident, team=team))

    async def start_agent(self, device_id: str, look_cap_s: float = 60) -> SimAgent:
        cert, key = self.device_cert(device_id)
        pub = signing.public_key_path(self.service.settings.signing_key_file)
        path = write_agent_config(
            self.tmp / "agents" / f"{device_id}.toml",
            device_id=device_id,
            broker_host="127.0.0.1",
            broker_port=self.broker_port,
            ca_file=self.pki.ca_cert,
            cert_file=cert,
            key_file=key,
            command_keys=[pub],
            state_dir=self.tmp / "agents" / device_id,
            heartbeat_interval_s=1,
            look_cap_s=look_cap_s,
            reconnect_min_s=0.2,
            reconnect_max_s=2,
            keepalive_s=5,
        )
        agent = Agent(load_config(path), clock=self.clock)
        sim = SimAgent(agent, asyncio.create_task(agent.run(), name=f"agent-{device_id}"))
        self.agents[device_id] = sim
        return sim

    async def call(self, who: str, method: str, path: str, **kw: Any) -> Any:
        resp = await self.api.request(
            method, path, headers={"Authorization": f"Bearer {self.tokens[who]}"}, **kw
        )
        assert resp.status_code < 400, f"{method} {path}: {resp.status_code} {resp.text[:300]}"
        return resp.json()

    # --- reading -----------------------------------------------------------------------

    async def q(self, fn: Callable[[Session], Any]) -> Any:
        return await self.service.db(self.service.ops.run, fn)

    async def dev(self, device_id: str) -> Device:
        found = await self.q(lambda s: s.get(Device, device_id))
        assert found is not None
        return found

    async def checks(self, device_id: str | None = None) -> list[Check]:
        def fn(s: Session) -> list[Check]:
            stmt = select(Check).order_by(Check.start_at, Check.id)
            if device_id:
                stmt = stmt.where(Check.device_id == device_id)
            return list(s.exec(stmt).all())

        return await self.q(fn)

    def tonight(self) -> date:
        return night_at(datetime.fromtimestamp(self.clock(), UTC), STOCKHOLM)

    async def check(
        self, device_id: str, agreed: str, kind: str = "scheduled", night: date | None = None
    ) -> Check:
        the_night = night or self.tonight()
        rows = [
            c
            for c in await self.checks(device_id)
            if c.agreed == agreed and c.kind == kind and c.night == the_night
        ]
        assert len(rows) == 1, f"{device_id} {agreed} {kind}: {rows}"
        return rows[0]

    async def visits(self) -> list[Visit]:
        return await self.q(lambda s: list(s.exec(select(Visit).order_by(Visit.id)).all()))

    async def commands(self, device_id: str) -> list[Command]:
        return await self.q(
            lambda s: list(
                s.exec(
                    select(Command).where(Command.device_id == device_id).order_by(Command.id)
                ).all()
            )
        )

    async def wait_state(self, device_id: str, state: str, timeout: float = 20) -> None:
        async def ok() -> bool:
            return (await self.dev(device_id)).reported_state.value == state

        await wait_until(ok, timeout=timeout, what=f"{device_id} {state}")

    async def sweeps_after_now(self, n: int = 2, timeout: float = 20) -> None:
        """Wait until the scheduler's sweep has run ``n`` more times (a positive signal
        that the service looked at the new time, instead of sleeping and hoping)."""
        reg = self.service.metrics.registry

        def runs() -> float:
            return sum(
                sample.value
                for family in reg.collect()
                for sample in family.samples
                if sample.name == "tillsyn_scheduler_jobs_run_total"
                and "sweep" in sample.labels.values()
            )

        start = runs()

        async def done() -> bool:
            return runs() >= start + n

        await wait_until(done, timeout=timeout, what=f"{n} sweeps")

    async def look_and_record(
        self,
        device_id: str,
        agreed: str,
        outcome: str,
        *,
        kind: str = "scheduled",
        who: str = "night",
    ) -> Check:
        """Staff: look (camera on, capped), wait until the device reported the look
        ended, then record the outcome, as the staff member behind ``who``'s token."""
        check = await self.check(device_id, agreed, kind)
        look = await self.call(who, "POST", f"/api/checks/{check.id}/look")

        async def ended() -> bool:
            from fleet.models import Look

            row = await self.q(lambda s: s.get(Look, look["id"]))
            return bool(row and row.ended_at)

        await wait_until(ended, timeout=20, what=f"look on {device_id} ended")
        await self.call(who, "POST", f"/api/checks/{check.id}/outcome", json={"outcome": outcome})
        return check


def night_settings(tmp: Path, pki: PkiPaths, port: int, **over: Any) -> FleetSettings:
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp / 'fleet.db'}",
        "broker_port": port,
        "ca_file": pki.ca_cert,
        "cert_file": pki.fleet_cert,
        "key_file": pki.fleet_key,
        "signing_key_file": tmp / "fleet" / "signing-key.pem",
        "totp_key_file": tmp / "fleet" / "totp.key",
        "api_port": free_port(),
        "mqtt_client_id": f"fleet-{uuid.uuid4().hex[:8]}",
        "offline_after_s": 3.0,
        "liveness_interval_s": 0.25,
        "sweep_interval_s": 1.0,
        "resend_after_s": 1.0,
        "arm_confirm_s": 30.0,
        "visit_horizon_s": 3600.0,
        "preflight_s": 1800.0,
    }
    values.update(over)
    return FleetSettings(**values)


STAFF = {"it": auth.Role.IT_ADMIN, "night": auth.Role.NIGHT_STAFF, "night2": auth.Role.NIGHT_STAFF}


@contextlib.asynccontextmanager
async def simulated_night(
    start: float,
    tmp: Path,
    pki: PkiPaths,
    broker_port: int,
    device_cert: Callable[[str], tuple[Path, Path]],
    **settings: Any,
) -> AsyncIterator[Night]:
    clock = SimClock(start)
    service = FleetService(
        night_settings(tmp, pki, broker_port, **settings), clock=clock, registry=CollectorRegistry()
    )
    tokens: dict[str, str] = {}
    with Session(service.engine) as s:
        for name, role in STAFF.items():
            s.add(auth.StaffAccount(id=name, roles=role.value, teams="north"))
            s.flush()
            tokens[name] = auth.issue_token(s, name, role)
        s.commit()
    task = asyncio.create_task(service.run(), name="fleet-under-test")
    base = f"http://127.0.0.1:{service.settings.api_port}"
    night: Night | None = None
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as api:

            async def ready() -> bool:
                try:
                    resp = await api.get("/readyz")
                except httpx.HTTPError:
                    return False
                return resp.status_code == 200 and resp.json()["scheduler_leader"] is True

            await wait_until(ready, timeout=20, what="fleet ready and leading")
            night = Night(service, clock, api, tokens, tmp, pki, broker_port, device_cert)
            yield night
    finally:
        if night is not None:
            for sim in night.agents.values():
                if not sim.task.done():
                    with contextlib.suppress(Exception):
                        await sim.agent.stop()
        service.stop()
        await asyncio.wait_for(task, 20)
