"""Helpers and fixtures for the pairing tests: a fleet with pairing on, fresh agents.

``pairing_env`` runs the fleet service in-process with the session Mosquitto and PKI,
the HTTPS enrollment listener on a free port, and the broker's pid file so the fleet can
make it reload the CRL. ``env.fresh_agent(serial)`` starts a real ``python -m
firmware_agent run`` process with an ``[enroll]`` config and no certificate.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlmodel import Session, select

from broker.launcher import MosquittoProcess, free_port
from broker.pki import PkiPaths
from firmware_agent.provision import write_enroll_config
from fleet import accounts, auth
from fleet.inventory import CommissioningRun, DeviceRecord, Enrollment
from fleet.models import AuditEvent
from tests.integration.fleet_harness import REPO, AgentProc, Harness, wait_until

__all__ = ["EnrollingAgent", "PairingEnv", "pairing_overrides", "run_pairing_env"]


def pairing_overrides(
    tmp: Path, pki: PkiPaths, mosquitto: MosquittoProcess, api_port: int, **pairing: Any
) -> dict[str, Any]:
    pid_file = tmp / "broker.pid"
    pid_file.write_text(f"{mosquitto.pid}\n")
    values: dict[str, Any] = {
        "pki_dir": pki.directory,
        "enroll_port": free_port(),
        "broker_pid_file": pid_file,
        "verification_uri": f"http://127.0.0.1:{api_port}/pair",
        "code_ttl_s": 300,
        "poll_interval_s": 1,
        "cert_lifetime_s": 3600,
        "renew_min_interval_s": 0,
        "commissioning_connect_s": 60,
        "commissioning_step_s": 20,
        "commissioning_look_s": 2,
    }
    values.update(pairing)
    return {"api_port": api_port, "pairing": values}


@dataclass
class EnrollingAgent:
    serial: str
    state_dir: Path
    proc: AgentProc

    @property
    def pairing_file(self) -> Path:
        return self.state_dir / "identity" / "pairing.json"

    @property
    def identity_file(self) -> Path:
        return self.state_dir / "identity" / "identity.json"

    async def user_code(self, timeout: float = 20) -> str:
        async def shown() -> str | None:
            try:
                return str(json.loads(self.pairing_file.read_text())["user_code"])
            except (OSError, ValueError, KeyError):
                return None

        return await wait_until(shown, timeout=timeout, what=f"pairing code of {self.serial}")

    def identity(self) -> dict[str, Any]:
        return dict(json.loads(self.identity_file.read_text()))

    def log(self) -> str:
        return self.proc.log.read_text(errors="replace") if self.proc.log.exists() else ""


@dataclass
class PairingEnv:
    h: Harness
    tmp: Path
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def service(self) -> Any:
        return self.h.service

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.service.settings.api_port}"

    @property
    def enroll_url(self) -> str:
        return f"https://127.0.0.1:{self.service.pairing.enroll_port}"

    async def token(
        self,
        staff_id: str,
        role: auth.Role = auth.Role.TECHNICIAN,
        teams: tuple[str, ...] = ("team-north",),
    ) -> str:
        key = f"{staff_id}:{role.value}"
        if key not in self.tokens:

            def make(session: Session) -> str:
                accounts.set_roles(
                    session, staff_id, [role], list(teams), now=time.time(), actor="test"
                )
                return auth.issue_token(session, staff_id, role)

            self.tokens[key] = await self.service.db(self.service.ops.run, make)
        return self.tokens[key]

    async def call(
        self, method: str, path: str, *, token: str | None = None, **kw: Any
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(base_url=self.api, timeout=30) as client:
            return await client.request(method, path, headers=headers, **kw)

    def fresh_agent(
        self, serial: str | None = None, *, kind: str = "camera", start: bool = True, **kw: Any
    ) -> EnrollingAgent:
        serial = serial or f"SN-{uuid.uuid4().hex[:8].upper()}"
        state = self.tmp / "devices" / serial
        config = write_enroll_config(
            self.tmp / "devices" / f"{serial}.toml",
            enroll_url=self.enroll_url,
            ca_file=self.h.pki.ca_cert,
            serial=serial,
            state_dir=state,
            kind=kind,
            heartbeat_interval_s=1,
            keepalive_s=5,
            reconnect_min_s=0.2,
            reconnect_max_s=2,
            **kw,
        )
        proc = AgentProc(serial, config, self.tmp / "logs" / f"{serial}.log")
        self.h.agents.append(proc)
        if start:
            proc.start()
        return EnrollingAgent(serial, state, proc)

    async def db(self, fn: Callable[[Session], Any]) -> Any:
        return await self.service.db(self.service.ops.run, fn)

    async def record(self, device_id: str) -> DeviceRecord | None:
        return await self.db(lambda s: s.get(DeviceRecord, device_id))

    async def audits(self, action: str) -> list[AuditEvent]:
        return await self.db(
            lambda s: list(s.exec(select(AuditEvent).where(AuditEvent.action == action)).all())
        )

    async def enrollment_for(self, serial: str) -> Enrollment | None:
        return await self.db(
            lambda s: s.exec(select(Enrollment).where(Enrollment.serial == serial)).first()
        )

    async def run_status(self, device_id: str) -> str | None:
        def q(s: Session) -> str | None:
            run = s.exec(
                select(CommissioningRun)
                .where(CommissioningRun.device_id == device_id)
                .order_by(CommissioningRun.id.desc())  # type: ignore[union-attr]
            ).first()
            return run.status.value if run else None

        return await self.db(q)

    async def pair(
        self, agent: EnrollingAgent, token: str, *, resident: str = "res-pair-1", **body: Any
    ) -> dict[str, Any]:
        code = await agent.user_code()
        resp = await self.call(
            "POST",
            "/api/pairing",
            token=token,
            json={"code": code, "resident_id": resident, "serial": agent.serial, **body},
        )
        assert resp.status_code == 201, resp.text
        return dict(resp.json())

    async def until_live(self, device_id: str, timeout: float = 90) -> DeviceRecord:
        async def live() -> DeviceRecord | None:
            record = await self.record(device_id)
            status = await self.run_status(device_id)
            if status == "failed":
                raise AssertionError(f"commissioning of {device_id} failed")
            return record if record and record.state.value == "live" else None

        return await wait_until(live, timeout=timeout, what=f"{device_id} live")


@asynccontextmanager
async def run_pairing_env(
    make_harness: Callable[..., Any],
    tmp: Path,
    pki: PkiPaths,
    mosquitto: MosquittoProcess,
    **pairing: Any,
) -> AsyncIterator[PairingEnv]:
    api_port = free_port()
    async with make_harness(**pairing_overrides(tmp, pki, mosquitto, api_port, **pairing)) as h:
        env = PairingEnv(h, tmp)
        await wait_until(
            _listening(env), timeout=15, what="enrollment endpoint and certificate link"
        )
        yield env


def _listening(env: PairingEnv) -> Callable[[], Any]:
    async def check() -> bool:
        pairing = env.service.pairing
        if pairing is None or not pairing.renewals.connected.is_set():
            return False
        if not pairing.enroll_listening:
            return False
        try:
            ctx = ssl.create_default_context(cafile=str(env.h.pki.ca_cert))
            async with httpx.AsyncClient(verify=ctx, timeout=2) as client:
                resp = await client.get(f"https://127.0.0.1:{pairing.enroll_port}/healthz")
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    return check


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """``tillsyn ARGS`` as a real process (the console script of this venv)."""
    return subprocess.run(
        [sys.executable, "-m", "tillsyn_cli", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def run_cli_async(*args: str, env: dict[str, str], timeout: float = 180) -> Any:
    return await asyncio.to_thread(run_cli, *args, env=env, timeout=timeout)


async def pair_live(
    env: PairingEnv,
    *,
    serial: str | None = None,
    kind: str = "camera",
    resident: str = "res-pair-1",
    token: str | None = None,
    **agent_kw: Any,
) -> tuple[EnrollingAgent, str]:
    """A fresh agent paired through the API and commissioned: (agent, device id)."""
    token = token or await env.token("tech-default")
    agent = env.fresh_agent(serial, kind=kind, **agent_kw)
    paired = await env.pair(agent, token, resident=resident)
    await env.until_live(paired["device_id"])
    return agent, str(paired["device_id"])
