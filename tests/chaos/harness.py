"""Machinery for the chaos tests: a fleet service *process* on a simulated clock, a
broker of the test's own (SIGKILL-able), and many in-process agents that record what
they really did.

- :class:`SharedClock`: simulated time = real time + an offset that only grows; the
  fleet process reads the offset from a file (``tests.integration.sim_fleet``), the
  agents in this process read it from memory. Between jumps time runs at real speed.
- :class:`FleetProc`: ``python -m tests.integration.sim_fleet``; SIGKILL and start again.
- :class:`AgentHerd`: the in-process agents (``firmware_agent.agent.Agent``), each with
  the jtis it *applied* (read from its own acks, not from the fleet), and a
  :class:`Watch` that samples every agent's lock state against its agreed windows.
- :func:`ledger`: the fleet's command ledger, read from its database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from broker.launcher import free_port
from broker.pki import PkiPaths, issue_device_cert
from firmware_agent.agent import Agent
from firmware_agent.config import load_config
from firmware_agent.provision import write_agent_config
from fleet import signing
from fleet.models import Command, Device
from fleet.models import Window as WindowRow
from tests.integration.fleet_harness import REPO
from tillsyn_protocol import AckOut, AckResult, Clock, CommandKind, LockState

ACTIVE = (LockState.ARMED, LockState.VIEWING)


class SharedClock:
    def __init__(self, path: Path, start: float) -> None:
        self.path = path
        self.offset = start - time.time()
        self._write()

    def __call__(self) -> float:
        return time.time() + self.offset

    def now(self) -> Clock:  # firmware_agent.clock.ClockSource
        return Clock(wall=self(), mono=time.monotonic() + self.offset, synced=True)

    def jump_to(self, instant: float) -> None:
        """Move forward (never back) to ``instant``."""
        self.offset += max(0.0, instant - self())
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(repr(self.offset))
        tmp.replace(self.path)


def fleet_values(tmp: Path, pki: PkiPaths, port: int, **over: Any) -> dict[str, Any]:
    return {
        "database_url": f"sqlite:///{tmp / 'fleet.db'}",
        "broker_port": port,
        "ca_file": pki.ca_cert,
        "cert_file": pki.fleet_cert,
        "key_file": pki.fleet_key,
        "signing_key_file": tmp / "fleet" / "signing-key.pem",
        "totp_key_file": tmp / "fleet" / "totp.key",
        "api_port": free_port(),
        "mqtt_client_id": f"fleet-chaos-{uuid.uuid4().hex[:6]}",
        "offline_after_s": 20.0,
        "liveness_interval_s": 0.5,
        "sweep_interval_s": 5.0,
        "resend_after_s": 2.0,
        "arm_confirm_s": 60.0,
        "visit_horizon_s": 3600.0,
        "scheduler_lock_retry_s": 0.5,
    } | over


class FleetProc:
    """The fleet service as a process on the shared clock: start, SIGKILL, start again."""

    def __init__(self, tmp: Path, values: dict[str, Any], clock: SharedClock) -> None:
        self.values = values
        self.port: int = values["api_port"]
        self.toml = tmp / "fleet.toml"
        lines = [
            f"{k} = {json.dumps(str(v) if isinstance(v, Path) else v)}" for k, v in values.items()
        ]
        self.toml.write_text("\n".join(lines) + "\n")
        self.log = tmp / "fleet.log"
        self.clock = clock
        self.proc: subprocess.Popen[bytes] | None = None
        signing.load_or_create(values["signing_key_file"])

    @property
    def public_key(self) -> Path:
        return signing.public_key_path(self.values["signing_key_file"])

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.integration.sim_fleet",
                    "--config",
                    str(self.toml),
                    "--offset-file",
                    str(self.clock.path),
                ],
                cwd=REPO,
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
            )

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    async def readyz(self) -> dict[str, Any] | None:
        try:
            async with httpx.AsyncClient(timeout=2) as c:
                resp = await c.get(f"http://127.0.0.1:{self.port}/readyz")
        except httpx.HTTPError:
            return None
        body: dict[str, Any] = resp.json()
        return body

    async def wait_leading(self, timeout: float = 60) -> float:
        """Wait until it serves, is connected and leads; returns the real seconds taken."""
        t0 = time.monotonic()

        async def ok() -> bool:
            body = await self.readyz()
            return bool(body and body.get("scheduler_leader") and body["checks"]["broker"])

        await until(ok, timeout=timeout, what="fleet ready, connected and leading")
        return time.monotonic() - t0

    async def metric(self, name: str, **labels: str) -> float:
        async with httpx.AsyncClient(timeout=5) as c:
            text = (await c.get(f"http://127.0.0.1:{self.port}/metrics")).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, rest = head.partition("{")
            if metric != name or not all(f'{k}="{v}"' in rest for k, v in labels.items()):
                continue
            total += float(value)
        return total


async def until(
    check: Callable[[], Awaitable[Any]], *, timeout: float, every: float = 0.2, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


@dataclass
class Window:
    start: float
    end: float


@dataclass
class Watch:
    """Samples every agent's state; records windows really opened and any lock breach."""

    windows: dict[str, list[Window]]
    clock: SharedClock
    grace_s: float = 2.5  # the agent's timer re-reads the clock at least every second
    opened: dict[tuple[str, float], float] = field(default_factory=dict)  # -> first seen
    past_end: list[tuple[str, float, float]] = field(default_factory=list)  # id, end, at
    outside: list[tuple[str, float]] = field(default_factory=list)  # armed with no window
    samples: int = 0

    def sample(self, agents: Iterable[Agent]) -> None:
        now = self.clock()
        self.samples += 1
        for agent in agents:
            if agent.state not in ACTIVE:
                continue
            until_ = agent.machine.snapshot().armed_until or 0.0
            mine = self.windows.get(agent.device_id, [])
            inside = [w for w in mine if w.start - 1.0 <= now <= w.end + self.grace_s]
            if not inside:
                late = [w for w in mine if w.end + self.grace_s < now <= w.end + 3600]
                if late:
                    self.past_end.append((agent.device_id, late[-1].end, now))
                else:
                    self.outside.append((agent.device_id, now))
                continue
            self.opened.setdefault((agent.device_id, until_), now)


class AgentHerd:
    """Many in-process agents on the shared clock, each recording what it applied."""

    def __init__(
        self,
        tmp: Path,
        pki: PkiPaths,
        clock: SharedClock,
        public_key: Path,
        *,
        broker_port: int,
        heartbeat_s: float = 5,
        keepalive_s: int = 10,
        reconnect_max_s: float = 3,
    ) -> None:
        self.tmp, self.pki, self.clock, self.public_key = tmp, pki, clock, public_key
        self.broker_port = broker_port
        self.heartbeat_s, self.keepalive_s, self.reconnect_max_s = (
            heartbeat_s,
            keepalive_s,
            reconnect_max_s,
        )
        self.agents: dict[str, Agent] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.applied: dict[str, list[str]] = defaultdict(list)  # device -> jtis it applied
        self.refused: Counter[str] = Counter()

    def cert(self, device_id: str) -> tuple[Path, Path]:
        cert, key = self.pki.device_cert(device_id), self.pki.device_key(device_id)
        if not cert.exists():
            cert, key = issue_device_cert(self.pki.directory, device_id)
        return cert, key

    def add(self, device_id: str, *, port: int | None = None, start: bool = True) -> Agent:
        cert, key = self.cert(device_id)
        path = write_agent_config(
            self.tmp / "agents" / f"{device_id}.toml",
            device_id=device_id,
            broker_host="127.0.0.1",
            broker_port=port or self.broker_port,
            ca_file=self.pki.ca_cert,
            cert_file=cert,
            key_file=key,
            command_keys=[self.public_key],
            state_dir=self.tmp / "agents" / device_id,
            heartbeat_interval_s=self.heartbeat_s,
            reconnect_min_s=0.3,
            reconnect_max_s=self.reconnect_max_s,
            keepalive_s=self.keepalive_s,
        )
        agent = Agent(load_config(path), clock=self.clock)
        self._record_acks(agent)
        self.agents[device_id] = agent
        if start:
            self.start(device_id)
        return agent

    def _record_acks(self, agent: Agent) -> None:
        reports = agent._reports  # test instrumentation: what the device itself applied
        original = reports.ack

        def ack(out: AckOut, *, why: str | None = None) -> None:
            if out.result is AckResult.APPLIED and out.jti is not None:
                self.applied[agent.device_id].append(out.jti)
            elif out.result is AckResult.REFUSED:
                self.refused[out.reason.value if out.reason else "?"] += 1
            original(out, why=why)

        reports.ack = ack  # type: ignore[method-assign]

    def start(self, device_id: str) -> None:
        agent = self.agents[device_id]
        self.tasks[device_id] = asyncio.create_task(agent.run(), name=f"agent-{device_id}")

    async def power_cut(self, device_id: str) -> None:
        """No goodbye, no Last Will from the agent itself: the task just ends."""
        task = self.tasks.pop(device_id)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 10)

    def connected(self) -> int:
        return sum(1 for a in self.agents.values() if a.connected)

    async def stop(self) -> None:
        agents = [a for d, a in self.agents.items() if d in self.tasks]
        await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    def applied_twice(self) -> list[str]:
        return [jti for jtis in self.applied.values() for jti, n in Counter(jtis).items() if n > 1]


def ledger(
    engine: Engine, kinds: tuple[CommandKind, ...] = (CommandKind.ARM, CommandKind.DISARM)
) -> list[Command]:
    with Session(engine) as s:
        rows = s.exec(select(Command).where(col(Command.kind).in_(kinds))).all()
        return list(rows)


def devices(engine: Engine) -> dict[str, Device]:
    with Session(engine) as s:
        return {d.id: d for d in s.exec(select(Device)).all()}


def table(title: str, rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join([title, *(f"  {k.ljust(width)}  {v}" for k, v in rows)])


def seed_cohorts(
    engine: Engine,
    ids: list[str],
    cohorts: tuple[str, ...],
    window_s: int,
    start_of: Callable[[int], float],
) -> dict[str, list[Window]]:
    """Register ``ids`` with one legacy window each, device i in cohort i % len(cohorts)
    (local start ``cohorts[c]``, opening at ``start_of(c)``): the windows the Watch checks."""
    windows: dict[str, list[Window]] = {}
    with Session(engine) as s:
        for i, device_id in enumerate(ids):
            cohort = i % len(cohorts)
            s.add(Device(id=device_id, resident_id=f"res-{device_id.removeprefix('dev-')}"))
            s.add(
                WindowRow(
                    device_id=device_id, start_local=f"{cohorts[cohort]}:00", duration_s=window_s
                )
            )
            start = start_of(cohort)
            windows[device_id] = [Window(start, start + window_s)]
        s.commit()
    return windows
