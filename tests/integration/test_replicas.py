"""Past one machine: two fleet service *processes* on one PostgreSQL database, with the same
config file (``shared_group`` set, no ``mqtt_client_id``), a real Mosquitto and real agents.

- ingest is shared: both replicas count heartbeats, and together exactly the heartbeats an
  independent (non-shared) subscriber saw;
- exactly one replica leads the scheduler (PostgreSQL advisory lock) and a window is armed
  exactly once per device;
- SIGKILL of the leader mid-window: the standby takes the lock within the retry interval
  and carries on (a device that dies gets its visit, the others lock at the window's end),
  and no command is applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import psycopg
import pytest
from sqlmodel import Session, col, select

from broker.launcher import free_port
from fleet import signing
from fleet.db import init_db, make_engine
from fleet.models import AuditEvent, Command, CommandStatus, Device, Visit, VisitCause, Window
from tests.helpers import make_client_ssl_context
from tests.integration.fleet_harness import REPO, AgentProc, wait_until
from tests.integration.test_scheduler_ha import (
    Proc,
    agent_config,
    applied_twice,
    readyz,
    write_toml,
)
from tillsyn_protocol import CommandKind
from tillsyn_protocol.windows import STOCKHOLM

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

log = logging.getLogger(__name__)
PG_ADMIN = os.environ.get("TILLSYN_TEST_PG", "host=127.0.0.1 port=5432 user=postgres")
LOCK_RETRY_S = 0.5
DEVICES = [f"dev-rep-{i}" for i in range(4)]


def _admin(sql: str) -> None:
    with psycopg.connect(PG_ADMIN, dbname="postgres", autocommit=True, connect_timeout=5) as c:
        c.execute(sql)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test, dropped afterwards."""
    name = f"replicas_{uuid.uuid4().hex[:12]}"
    try:
        _admin(f"CREATE DATABASE {name}")
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL unreachable ({PG_ADMIN!r}): {exc}", pytrace=False)
    info = psycopg.conninfo.conninfo_to_dict(PG_ADMIN)
    try:
        yield (
            f"postgresql+psycopg://{info.get('user')}@{info.get('host', '127.0.0.1')}:"
            f"{info.get('port', 5432)}/{name}"
        )
    finally:
        _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class Replica(Proc):
    """``tillsyn fleet serve`` on the shared config file; only the API port differs (from
    the environment), and each replica derives its own MQTT client id (host and pid)."""

    def __init__(self, toml: Path, api_port: int, log: Path) -> None:
        self._log = log.open("ab")
        cmd = [sys.executable, "-m", "tillsyn_cli", "-v", "fleet", "serve", "--config", str(toml)]
        env = {**os.environ, "TILLSYN_API_PORT": str(api_port)}
        self.p = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=self._log, env=env)


async def _hb_count(port: int) -> float | None:
    try:
        async with httpx.AsyncClient(timeout=3) as c:
            text = (await c.get(f"http://127.0.0.1:{port}/metrics")).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith('tillsyn_ingest_messages_total{channel="hb"}'):
            return float(line.split()[-1])
    return 0.0


async def _leader(port: int) -> bool:
    return bool((await readyz(port) or {}).get("scheduler_leader"))


async def test_two_replicas_share_ingest_and_fail_over(
    tmp_path, pki_dir, mosquitto, device_cert, pg_url
) -> None:
    engine = make_engine(pg_url)
    init_db(engine)
    with Session(engine) as s:
        s.add_all(Device(id=d, resident_id=f"res-{d}") for d in DEVICES)
        s.commit()
    key_file = tmp_path / "fleet" / "signing-key.pem"
    signing.load_or_create(key_file)  # both replicas sign with it; the agents pin it
    toml = write_toml(
        tmp_path / "fleet.toml",
        {
            "database_url": pg_url,
            "broker_port": mosquitto.port,
            "ca_file": pki_dir.ca_cert,
            "cert_file": pki_dir.fleet_cert,
            "key_file": pki_dir.fleet_key,
            "signing_key_file": key_file,
            "totp_key_file": tmp_path / "fleet" / "totp.key",
            "shared_group": "fleet",
            "offline_after_s": 6.0,
            "liveness_interval_s": 0.25,
            "sweep_interval_s": 1.0,
            "resend_after_s": 1.0,
            "arm_confirm_s": 30.0,
            "scheduler_lock_retry_s": LOCK_RETRY_S,
        },
    )
    ports = [free_port(), free_port()]
    replicas: list[Replica] = []
    agents: dict[str, AgentProc] = {}
    observer: asyncio.Task[None] | None = None
    try:
        for i, port in enumerate(ports):
            replicas.append(Replica(toml, port, tmp_path / f"fleet{i}.log"))
            await wait_until(lambda p=port: readyz(p), timeout=60, what=f"replica {i} ready")
        await wait_until(
            lambda: _leader(ports[0]), timeout=20, what="the first replica takes the lock"
        )
        assert [await _leader(p) for p in ports] == [True, False]  # exactly one leader

        for device_id in DEVICES:
            config = agent_config(
                tmp_path, pki_dir, mosquitto.port, device_cert, device_id, key_file
            )
            agents[device_id] = AgentProc(
                device_id, config, tmp_path / "logs" / f"{device_id}.log"
            ).start()

        async def all_online() -> bool:
            with Session(engine) as s:
                rows = s.exec(select(Device)).all()
            return all(d.connectivity.value == "online" for d in rows)

        await wait_until(all_online, timeout=30, what="agents online")

        # --- ingest is shared: per-replica counts add up to what the broker delivered ----
        seen = 0

        async def observe() -> None:
            nonlocal seen
            ctx = make_client_ssl_context(pki_dir, pki_dir.fleet_cert, pki_dir.fleet_key)
            async with aiomqtt.Client(
                "127.0.0.1",
                mosquitto.port,
                tls_context=ctx,
                identifier=f"observer-{uuid.uuid4().hex[:6]}",
                protocol=aiomqtt.ProtocolVersion.V5,
            ) as client:
                await client.subscribe("tillsyn/v1/dev/+/hb", qos=1)
                async for _ in client.messages:
                    seen += 1

        observer = asyncio.create_task(observe())
        await asyncio.sleep(1.0)  # subscribed

        def pause(sig: int) -> None:
            for agent in agents.values():
                agent.signal(sig)

        async def quiet_counts() -> tuple[list[float], int]:
            # Agents stopped: wait until nothing is in flight, then read all three counts.
            await asyncio.sleep(1.5)
            counts = [await _hb_count(p) or 0.0 for p in ports]
            return counts, seen

        pause(signal.SIGSTOP)
        before, seen0 = await quiet_counts()
        pause(signal.SIGCONT)
        await asyncio.sleep(4.0)
        pause(signal.SIGSTOP)
        after, seen1 = await quiet_counts()
        pause(signal.SIGCONT)
        shares = [b - a for a, b in zip(before, after, strict=True)]
        assert all(share > 0 for share in shares), shares  # both replicas take heartbeats
        assert sum(shares) == seen1 - seen0 > 0, (shares, seen1 - seen0)  # each exactly once

        # --- a window is armed exactly once, by the leader ---------------------------------
        length = 25
        at = datetime.now(STOCKHOLM).replace(microsecond=0) + timedelta(seconds=4)
        with Session(engine) as s:  # written behind the replicas' backs: the DB is the truth
            s.add_all(
                Window(device_id=d, start_local=at.strftime("%H:%M:%S"), duration_s=length)
                for d in DEVICES
            )
            s.commit()
        until = int(at.timestamp()) + length

        def states() -> dict[str, str]:
            with Session(engine) as s:
                return {d.id: d.reported_state.value for d in s.exec(select(Device)).all()}

        async def all_are(want: str, devices: list[str]) -> bool:
            now = states()
            return all(now[d] == want for d in devices)

        await wait_until(lambda: all_are("ARMED", DEVICES), timeout=20, what="all armed")

        # Each replica hears only a share of every device's heartbeats, yet no live device
        # was ever taken for silent (the leader judges silence on what all replicas heard).
        assert _offline_events(engine, DEVICES) == Counter(), _offline_events(engine, DEVICES)

        # --- the leader dies; the standby takes over and carries on ------------------------
        replicas[0].kill()
        killed_at = time.monotonic()
        await wait_until(lambda: _leader(ports[1]), timeout=15, what="the standby leads")
        takeover_s = time.monotonic() - killed_at
        # The lock goes with the dead leader's database session (closed by the kernel), so
        # the standby's next retry gets it.
        assert takeover_s < LOCK_RETRY_S + 5, takeover_s
        # Ingest goes on: the dead replica's session ended with it (no client id was
        # configured, so no persistent session keeps taking a share of the messages).
        alone = await _hb_count(ports[1]) or 0.0
        await wait_until(
            lambda: _grew(ports[1], alone), timeout=10, what="survivor takes all heartbeats"
        )

        dead = DEVICES[-1]
        agents[dead].proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]

        async def dead_visit() -> list[Visit]:
            with Session(engine) as s:
                return list(s.exec(select(Visit).where(Visit.device_id == dead)).all())

        visits = await wait_until(dead_visit, timeout=20, what="a visit for the dead device")
        assert {v.cause for v in visits} == {VisitCause.DEVICE_OFFLINE}

        alive = DEVICES[:-1]
        await asyncio.sleep(max(0.0, until - time.time()))
        await wait_until(lambda: all_are("LOCKED", alive), timeout=20, what="locked at the end")

        with Session(engine) as s:
            commands = s.exec(select(Command)).all()
        arms = Counter(c.device_id for c in commands if c.kind is CommandKind.ARM)
        assert arms == Counter(DEVICES), arms  # one arm per device, none from the new leader
        assert all(
            c.status is CommandStatus.APPLIED
            for c in commands
            if c.kind is CommandKind.ARM and c.device_id in alive
        )
        disarms = Counter(c.device_id for c in commands if c.kind is CommandKind.DISARM)
        assert all(n == 1 for n in disarms.values()), disarms  # at most one per edge
        assert applied_twice(engine) == []
        assert _offline_events(engine, alive) == Counter()
        with Session(engine) as s:
            assert not s.exec(select(Visit).where(col(Visit.device_id).in_(alive))).all()
        log.info("takeover %.2f s; heartbeat shares %s", takeover_s, shares)
    finally:
        if observer is not None:
            observer.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await observer
        for agent in agents.values():
            with contextlib.suppress(OSError):
                agent.signal(signal.SIGCONT)
            agent.stop()
        for proc in replicas:
            proc.stop()
        engine.dispose()


def _offline_events(engine: Any, devices: list[str]) -> Counter[str]:
    with Session(engine) as s:
        rows = s.exec(
            select(AuditEvent).where(
                AuditEvent.action == "device.offline", col(AuditEvent.subject).in_(devices)
            )
        ).all()
    return Counter(r.subject for r in rows)


async def _grew(port: int, since: float) -> bool:
    return (await _hb_count(port) or 0.0) > since + 2
