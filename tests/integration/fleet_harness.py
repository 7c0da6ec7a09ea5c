"""Helpers for tests that run the fleet service against a real Mosquitto and real agents."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlmodel import Session, select

from broker.pki import PkiPaths
from firmware_agent.provision import write_agent_config
from fleet import accounts, auth, signing
from fleet.db import init_db, make_engine
from fleet.models import Device, Visit, Window
from fleet.service import FleetService
from tillsyn_protocol.windows import STOCKHOLM

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]


async def wait_until(
    check: Callable[[], Awaitable[T]], *, timeout: float, every: float = 0.1, what: str = ""
) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def staff_token(
    database_url: str,
    staff_id: str = "it-admin-test",
    role: auth.Role = auth.Role.IT_ADMIN,
    teams: tuple[str, ...] = (),
) -> str:
    """Create (or update) a staff account in the fleet's database and issue it an API token."""
    engine = make_engine(database_url)
    init_db(engine)
    try:
        with Session(engine) as session:
            accounts.set_roles(
                session, staff_id, [role], list(teams), now=time.time(), actor="test"
            )
            token = auth.issue_token(session, staff_id, role)
            session.commit()
    finally:
        engine.dispose()
    return token


def local_hms(seconds_from_now: float) -> tuple[str, float]:
    """A Stockholm local time-of-day string this many seconds ahead, and its epoch."""
    at = datetime.now(STOCKHOLM) + timedelta(seconds=seconds_from_now)
    at = at.replace(microsecond=0) + timedelta(seconds=1)
    return at.strftime("%H:%M:%S"), at.timestamp()


@dataclass
class AgentProc:
    device_id: str
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "firmware_agent", "run", "--config", str(self.config)],
                cwd=REPO,
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
            )
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@dataclass
class Harness:
    service: FleetService
    pki: PkiPaths
    broker_port: int
    tmp: Path
    device_cert: Callable[[str], tuple[Path, Path]]
    agents: list[AgentProc] = field(default_factory=list)

    async def add_device(self, device_id: str, resident: str | None = "res-0001") -> Device:
        return await self.service.register_device(Device(id=device_id, resident_id=resident))

    async def add_window(self, device_id: str, start_in_s: float, duration_s: int) -> float:
        """Add a window starting about ``start_in_s`` from now; returns its start (epoch)."""
        hms, at = local_hms(start_in_s)
        await self.service.add_window(
            Window(device_id=device_id, start_local=hms, duration_s=duration_s)
        )
        return at

    def agent(
        self,
        device_id: str,
        *,
        heartbeat_s: float = 1,
        keepalive_s: int = 5,
        look_cap_s: float = 60,
        start: bool = True,
    ) -> AgentProc:
        cert, key = self.device_cert(device_id)
        pub = signing.public_key_path(self.service.settings.signing_key_file)
        config = write_agent_config(
            self.tmp / "agents" / f"{device_id}.toml",
            device_id=device_id,
            broker_host="127.0.0.1",
            broker_port=self.broker_port,
            ca_file=self.pki.ca_cert,
            cert_file=cert,
            key_file=key,
            command_keys=[pub],
            state_dir=self.tmp / "agents" / device_id,
            heartbeat_interval_s=heartbeat_s,
            look_cap_s=look_cap_s,
            reconnect_min_s=0.2,
            reconnect_max_s=2,
            keepalive_s=keepalive_s,
        )
        agent = AgentProc(device_id, config, self.tmp / "logs" / f"{device_id}.log")
        self.agents.append(agent)
        return agent.start() if start else agent

    async def device(self, device_id: str) -> Device:
        found = await self.service.db(self.service.ops.run, lambda s: s.get(Device, device_id))
        assert found is not None
        return found

    async def visits(self, device_id: str | None = None) -> list[Visit]:
        def q(s: Any) -> list[Visit]:
            stmt = select(Visit)
            if device_id:
                stmt = stmt.where(Visit.device_id == device_id)
            return list(s.exec(stmt).all())

        return await self.service.db(self.service.ops.run, q)

    async def state_is(self, device_id: str, state: str) -> bool:
        return (await self.device(device_id)).reported_state.value == state

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
