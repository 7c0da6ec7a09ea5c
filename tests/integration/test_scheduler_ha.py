"""Exactly one scheduler, and restarts at any moment: fleet service *processes* (real
SIGKILL), a real Mosquitto and real agents.

- two ``tillsyn fleet serve`` on one database: one leads, the other stands by; every
  window is armed by exactly one of them; kill the leader and the standby takes over;
- a simulated night during which the service is SIGKILLed at chosen moments (before a
  window, just after it opened, in the middle, seconds before its end): every window still
  opens and closes, and no command is applied twice.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session, select

from broker.launcher import free_port
from firmware_agent.agent import Agent
from firmware_agent.config import load_config
from firmware_agent.provision import write_agent_config
from fleet import auth, plans, signing
from fleet.checks import Ctx
from fleet.db import init_db, make_engine
from fleet.metrics import FleetMetrics
from fleet.models import AuditEvent, Command, CommandStatus, Device, Window
from fleet.plan_models import Check
from tests.integration.fleet_harness import REPO, wait_until
from tests.integration.sim_fleet import FileClock
from tests.integration.sim_night import local
from tillsyn_protocol import CommandKind
from tillsyn_protocol.windows import STOCKHOLM

pytestmark = pytest.mark.integration


def write_toml(path: Path, values: dict[str, Any]) -> Path:
    lines = [f"{k} = {json.dumps(str(v) if isinstance(v, Path) else v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def base_values(tmp: Path, pki, port: int, **over: Any) -> dict[str, Any]:
    return {
        "database_url": f"sqlite:///{tmp / 'fleet.db'}",
        "broker_port": port,
        "ca_file": pki.ca_cert,
        "cert_file": pki.fleet_cert,
        "key_file": pki.fleet_key,
        "signing_key_file": tmp / "fleet" / "signing-key.pem",
        "totp_key_file": tmp / "fleet" / "totp.key",
        "offline_after_s": 5.0,
        "liveness_interval_s": 0.25,
        "sweep_interval_s": 1.0,
        "resend_after_s": 1.0,
        "arm_confirm_s": 30.0,
        "scheduler_lock_retry_s": 0.5,
    } | over


class Proc:
    def __init__(self, args: list[str], log: Path) -> None:
        self._log = log.open("ab")
        self.p = subprocess.Popen(args, cwd=REPO, stdout=self._log, stderr=self._log)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait(10)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


async def readyz(port: int) -> dict[str, Any] | None:
    try:
        async with httpx.AsyncClient(timeout=2) as c:
            resp = await c.get(f"http://127.0.0.1:{port}/readyz")
    except httpx.HTTPError:
        return None
    return resp.json() if resp.status_code == 200 else None


def agent_config(tmp: Path, pki, port: int, device_cert, device_id: str, key: Path) -> Path:
    cert, dkey = device_cert(device_id)
    return write_agent_config(
        tmp / "agents" / f"{device_id}.toml",
        device_id=device_id,
        broker_host="127.0.0.1",
        broker_port=port,
        ca_file=pki.ca_cert,
        cert_file=cert,
        key_file=dkey,
        command_keys=[signing.public_key_path(key)],
        state_dir=tmp / "agents" / device_id,
        heartbeat_interval_s=1,
        reconnect_min_s=0.2,
        reconnect_max_s=1,
        keepalive_s=5,
    )


def applied_twice(engine: Any) -> list[str]:
    """Commands a device acknowledged as *applied* more than once (must be none)."""
    with Session(engine) as s:
        acks = s.exec(select(AuditEvent).where(AuditEvent.action == "command.acked")).all()
    applied = Counter(
        json.loads(a.detail)["jti"] for a in acks if json.loads(a.detail)["result"] == "applied"
    )
    return [jti for jti, n in applied.items() if n > 1]


async def test_two_service_processes_one_scheduler_and_failover(
    tmp_path, pki_dir, mosquitto, device_cert, mqtt_sessions
) -> None:
    device_id = "dev-ha-1"
    values = base_values(tmp_path, pki_dir, mosquitto.port, shared_group="fleet")
    key = signing.load_or_create(values["signing_key_file"])  # noqa: F841  (both pin it)
    engine = make_engine(values["database_url"])
    init_db(engine)
    with Session(engine) as s:
        s.add(Device(id=device_id, resident_id="res-ha"))
        s.commit()
    procs: list[Proc] = []
    ports = [free_port(), free_port()]
    try:
        for i, port in enumerate(ports):
            toml = write_toml(
                tmp_path / f"fleet{i}.toml",
                # Persistent sessions in the shared group: ended after the test (the
                # fixture), or they would take a share of the next tests' messages.
                values | {"api_port": port, "mqtt_client_id": mqtt_sessions.new(f"fleet-ha-{i}")},
            )
            procs.append(
                Proc(
                    [
                        sys.executable,
                        "-m",
                        "tillsyn_cli",
                        "-v",
                        "fleet",
                        "serve",
                        "--config",
                        str(toml),
                    ],
                    tmp_path / f"fleet{i}.log",
                )
            )
            await wait_until(lambda p=port: readyz(p), timeout=30, what=f"fleet {i} ready")
        roles = [(await readyz(p) or {}).get("scheduler_leader") for p in ports]
        assert roles == [True, False], roles  # the first holds the lock, the second stands by
        agent = Proc(
            [
                sys.executable,
                "-m",
                "firmware_agent",
                "run",
                "--config",
                str(
                    agent_config(
                        tmp_path,
                        pki_dir,
                        mosquitto.port,
                        device_cert,
                        device_id,
                        values["signing_key_file"],
                    )
                ),
            ],
            tmp_path / "agent.log",
        )
        procs.append(agent)

        def state() -> tuple[str, float | None]:
            with Session(engine) as s:
                d = s.get(Device, device_id)
                assert d is not None
                return d.reported_state.value, d.armed_until

        async def is_(want: str) -> bool:
            return state()[0] == want

        async def window(start_in: float, length: int) -> float:
            at = datetime.now(STOCKHOLM) + timedelta(seconds=start_in)
            at = at.replace(microsecond=0) + timedelta(seconds=1)
            with Session(engine) as s:  # written behind the services' backs: the DB is truth
                s.add(
                    Window(
                        device_id=device_id, start_local=at.strftime("%H:%M:%S"), duration_s=length
                    )
                )
                s.commit()
            return at.timestamp()

        async def online() -> bool:
            with Session(engine) as s:
                d = s.get(Device, device_id)
                return bool(d and d.connectivity.value == "online")

        await wait_until(online, timeout=20, what="agent online")
        first = await window(3, 4)
        await wait_until(lambda: is_("ARMED"), timeout=20, what="armed by the leader")
        await wait_until(lambda: is_("LOCKED"), timeout=20, what="locked at window end")
        procs[0].kill()  # the leader dies without a word
        await wait_until(
            lambda: _leader(ports[1]), timeout=15, what="the standby takes the scheduler over"
        )
        # Its supervisor restarts it: it comes back as the standby (the lock is taken), and
        # takes the messages the broker queued for its persistent shared-subscription session.
        procs[0].stop()
        procs[0] = Proc(procs[0].p.args, tmp_path / "fleet0.log")  # type: ignore[arg-type]
        await wait_until(lambda: readyz(ports[0]), timeout=30, what="fleet 0 back")
        assert (await readyz(ports[0]) or {}).get("scheduler_leader") is False
        second = await window(3, 4)
        await wait_until(lambda: is_("ARMED"), timeout=20, what="armed by the new leader")
        assert state()[1] == int(second + 4)
        await wait_until(lambda: is_("LOCKED"), timeout=20, what="locked again")
        with Session(engine) as s:
            arms = s.exec(select(Command).where(Command.kind == CommandKind.ARM)).all()
        assert sorted(c.until for c in arms) == [int(first + 4), int(second + 4)]  # once each
        assert all(c.status is CommandStatus.APPLIED for c in arms)
        assert applied_twice(engine) == []
    finally:
        for p in procs:
            p.stop()
        engine.dispose()


async def _leader(port: int) -> bool:
    body = await readyz(port)
    return bool(body and body.get("scheduler_leader"))


async def test_service_killed_at_any_moment_of_a_simulated_night(
    tmp_path, pki_dir, mosquitto, device_cert, mqtt_sessions
) -> None:
    device_id = "dev-restart"
    api_port = free_port()
    values = base_values(
        tmp_path,
        pki_dir,
        mosquitto.port,
        api_port=api_port,
        mqtt_client_id=mqtt_sessions.new("fleet-rs"),
    )
    toml = write_toml(tmp_path / "fleet.toml", values)
    clock = FileClock(tmp_path / "offset")
    clock.set(local("2027-02-15 21:50"))
    signing.load_or_create(values["signing_key_file"])
    engine = make_engine(values["database_url"])
    init_db(engine)
    times = ["22:00", "22:30", "23:00", "23:30", "00:00", "00:30"]
    with Session(engine) as s:
        s.add(Device(id=device_id, resident_id="res-rs"))
        s.add(auth.StaffAccount(id="it", roles="it_admin"))
        s.flush()
        plans.create(
            s,
            Ctx(FleetMetrics()),
            {
                "resident_id": "res-rs",
                "device_id": device_id,
                "check_times": times,
                "window_s": 600,
                "valid_from": datetime(2027, 2, 1).date(),
                "consent_ref": "DNR-1",
                "consent_date": datetime(2027, 1, 1).date(),
            },
            actor="it",
            reason="test",
            now=clock(),
            activate=True,
        )
        s.commit()
    # Where each window gets a SIGKILL of the service (seconds relative to its start);
    # the order is shuffled by a seed so that runs differ but stay reproducible.
    kill_points = [-20.0, 1.0, 300.0, 597.0, 599.0, None]
    rng = random.Random(int(time.time()) // 3600)
    rng.shuffle(kill_points)

    def start() -> Proc:
        return Proc(
            [
                sys.executable,
                "-m",
                "tests.integration.sim_fleet",
                "--config",
                str(toml),
                "--offset-file",
                str(tmp_path / "offset"),
            ],
            tmp_path / "fleet.log",
        )

    fleet = start()
    agent = Agent(
        load_config(
            agent_config(
                tmp_path,
                pki_dir,
                mosquitto.port,
                device_cert,
                device_id,
                values["signing_key_file"],
            )
        ),
        clock=clock,
    )
    agent_task = asyncio.create_task(agent.run())
    armed_windows: list[float] = []
    try:
        await wait_until(lambda: readyz(api_port), timeout=30, what="fleet ready")
        with Session(engine) as s:
            starts = sorted(
                c.start_at
                for c in s.exec(select(Check))
                if c.agreed in times and c.night == datetime(2027, 2, 15).date()
            )
        assert len(starts) == 6

        async def restart_at(instant: float) -> None:
            nonlocal fleet
            clock.set(instant)
            fleet.kill()  # no clean-up of any kind
            fleet.stop()
            fleet = start()
            await wait_until(lambda: _leader(api_port), timeout=30, what="fleet back")

        for begin, kill in zip(starts, kill_points, strict=True):
            if kill is not None and kill < 0:
                await restart_at(begin + kill)
            clock.set(max(clock(), begin - 1))
            await wait_until(lambda: _armed(agent), timeout=25, what=f"armed at {begin}")
            armed_windows.append(agent.machine.snapshot().armed_until or 0)
            if kill is not None and kill >= 0:
                await restart_at(begin + kill)
                if kill < 500:  # the device kept its window through the fleet's death
                    await wait_until(lambda: _armed(agent), timeout=25, what="still armed")
            clock.set(max(clock(), begin + 598))
            await wait_until(lambda: _locked(agent), timeout=25, what=f"locked after {begin}")
            assert clock() >= begin + 600 - 1, "locked before the window closed"
        assert armed_windows == [b + 600 for b in starts]  # every window opened, on time
        with Session(engine) as s:
            arms = s.exec(select(Command).where(Command.kind == CommandKind.ARM)).all()
            checks = s.exec(select(Check)).all()
        # One arm per window, however often the service died, and none applied twice.
        assert Counter(c.until for c in arms) == Counter(b + 600 for b in starts)
        assert applied_twice(engine) == []
        assert len({c.key for c in checks}) == len(checks)
    finally:
        await agent.stop()
        agent_task.cancel()
        fleet.stop()
        engine.dispose()


async def _armed(agent: Agent) -> bool:
    return agent.state.value == "ARMED"


async def _locked(agent: Agent) -> bool:
    return agent.state.value == "LOCKED"
