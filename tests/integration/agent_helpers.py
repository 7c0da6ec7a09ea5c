"""Helpers for the device agent's tests (unit and integration).

- :func:`write_agent_config`: an agent TOML file for a device, with overrides;
- :class:`Signer`: the fleet's command signer with its own sequence counter;
- :class:`ManualClock`: a clock the test moves;
- :class:`FleetProbe`: an MQTT client with the ``tillsyn-fleet`` certificate that sends
  commands to one device and collects what the device reports;
- :func:`read_retained`: the retained payload of a topic, from a fresh connection;
- :func:`running`: an in-process Agent running for the body of an ``async with``;
- :func:`spawn_agent`: a real ``python -m firmware_agent run`` process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiomqtt

from broker.pki import PkiPaths
from firmware_agent import Agent
from tests.helpers import make_client_ssl_context
from tillsyn_protocol import Channel, Clock, SigningKey, device_topic, sign, tokens

REPO_ROOT = Path(__file__).resolve().parents[2]
WALL_2027 = 1_800_000_000.0


def unique_device_id(prefix: str = "dev-t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# --- config -----------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def toml_dumps(data: Mapping[str, Any]) -> str:
    """Minimal TOML writer: scalars, lists, and one level of tables."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    for name, table in data.items():
        if isinstance(table, Mapping):
            lines += ["", f"[{name}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def agent_config_data(
    *,
    device_id: str,
    pki: PkiPaths,
    cert: Path,
    key: Path,
    command_keys: list[Path],
    state_dir: Path,
    port: int,
    host: str = "127.0.0.1",
    **overrides: Any,
) -> dict[str, Any]:
    """A valid config as a mapping; ``overrides`` replace top-level keys or tables."""
    data: dict[str, Any] = {
        "device_id": device_id,
        "kind": "camera",
        "firmware_version": "1.2.3-test",
        "state_dir": str(state_dir),
        "command_keys": [str(p) for p in command_keys],
        "heartbeat_interval_s": 1,
        "look_cap_s": 2,
        "broker": {
            "host": host,
            "port": port,
            "keepalive_s": 10,
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 0.5,
            "session_expiry_s": 300,
        },
        "tls": {"ca_file": str(pki.ca_cert), "cert_file": str(cert), "key_file": str(key)},
        "camera": {"type": "simulated", "health_interval_s": 0.1},
    }
    data.update(overrides)
    return data


def write_agent_config(path: Path, data: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml_dumps(data))
    return path


# --- commands ---------------------------------------------------------------------------


@dataclass
class Signer:
    """Signs commands for one device like the fleet does, counting seq itself."""

    device_id: str
    key: SigningKey = field(default_factory=SigningKey.generate)
    seq: int = 0

    def write_public_key(self, path: Path) -> Path:
        path.write_bytes(self.key.public_pem())
        return path

    def _next(self, seq: int | None) -> int:
        if seq is None:
            self.seq += 1
            return self.seq
        self.seq = max(self.seq, seq)
        return seq

    def arm(self, now: float, until: float, *, seq: int | None = None, **kw: Any) -> str:
        claims = tokens.arm(self.device_id, seq=self._next(seq), now=now, until=int(until), **kw)
        return sign(claims, self.key)

    def disarm(self, now: float, *, seq: int | None = None, **kw: Any) -> str:
        return sign(tokens.disarm(self.device_id, seq=self._next(seq), now=now, **kw), self.key)

    def look(
        self,
        now: float,
        *,
        look_id: str = "look1",
        staff: str = "staff-7",
        max_s: int = 2,
        seq: int | None = None,
        **kw: Any,
    ) -> str:
        claims = tokens.look(
            self.device_id,
            seq=self._next(seq),
            now=now,
            staff=staff,
            max_s=max_s,
            look_id=look_id,
            **kw,
        )
        return sign(claims, self.key)


class ManualClock:
    """A clock the test moves: wall and monotonic advance together."""

    def __init__(self, wall: float = WALL_2027, mono: float = 1000.0) -> None:
        self.wall = wall
        self.mono = mono
        self.synced = True

    def now(self) -> Clock:
        return Clock(self.wall, self.mono, self.synced)

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


async def wait_until(
    predicate: Callable[[], bool], *, timeout: float = 5.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


# --- the fleet side over MQTT -----------------------------------------------------------


@dataclass(frozen=True)
class Received:
    channel: Channel
    payload: bytes
    retain: bool
    at: float  # time.monotonic() when received

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.payload)
        return data


def fleet_client(
    pki: PkiPaths, host: str, port: int, *, identifier: str | None = None
) -> aiomqtt.Client:
    return aiomqtt.Client(
        host,
        port,
        identifier=identifier or f"fleet-test-{uuid.uuid4().hex[:10]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=make_client_ssl_context(pki, pki.fleet_cert, pki.fleet_key),
        timeout=5,
    )


class FleetProbe:
    """Acts as the fleet for one device: sends commands, collects its reports."""

    def __init__(self, pki: PkiPaths, host: str, port: int, device_id: str) -> None:
        self.device_id = device_id
        self.messages: list[Received] = []
        self._client = fleet_client(pki, host, port)
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> FleetProbe:
        await self._client.__aenter__()
        await self._client.subscribe(f"tillsyn/v1/dev/{self.device_id}/+", qos=1)
        self._reader = asyncio.create_task(self._read(), name="fleet-probe-reader")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(exc_type, exc, tb)

    async def _read(self) -> None:
        async for message in self._client.messages:
            channel = Channel(message.topic.value.rsplit("/", 1)[1])
            payload = message.payload
            assert isinstance(payload, bytes)
            self.messages.append(Received(channel, payload, message.retain, time.monotonic()))
            self._changed.set()

    async def send(self, token: str | bytes, *, qos: int = 1) -> None:
        topic = device_topic(self.device_id, Channel.CMD)
        await self._client.publish(topic, token, qos=qos)

    def of(self, channel: Channel) -> list[dict[str, Any]]:
        return [m.json() for m in self.messages if m.channel is channel]

    async def wait_for(
        self,
        channel: Channel,
        match: Callable[[dict[str, Any]], bool] = lambda _: True,
        *,
        timeout: float = 5.0,
        after: int = 0,
    ) -> dict[str, Any]:
        """The first message on ``channel`` (from index ``after``) for which ``match``."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self.messages[after:]:
                if m.channel is channel:
                    data = m.json()
                    if match(data):
                        return data
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = [m.payload[:160] for m in self.messages if m.channel is channel]
                raise AssertionError(f"no matching {channel.value} within {timeout:g} s: {seen}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 0.2)):
                    await self._changed.wait()

    def mark(self) -> int:
        """Index to pass as ``after`` to only look at messages from now on."""
        return len(self.messages)


async def read_retained(
    pki: PkiPaths, host: str, port: int, topic: str, *, timeout: float = 2.0
) -> dict[str, Any] | None:
    """The retained message of ``topic`` as JSON, read from a fresh connection."""
    async with fleet_client(pki, host, port) as client:
        await client.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(timeout):
                async for message in client.messages:
                    if message.retain:
                        payload = message.payload
                        assert isinstance(payload, bytes)
                        data: dict[str, Any] = json.loads(payload)
                        return data
        except TimeoutError:
            return None
    return None


async def wait_retained(
    pki: PkiPaths,
    host: str,
    port: int,
    topic: str,
    match: Callable[[dict[str, Any]], bool],
    *,
    timeout: float = 8.0,
) -> dict[str, Any]:
    """Poll the retained message of ``topic`` until ``match`` holds."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        with contextlib.suppress(aiomqtt.MqttError):
            last = await read_retained(pki, host, port, topic, timeout=0.5)
            if last is not None and match(last):
                return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"retained {topic} never matched within {timeout:g} s; last: {last}")


# --- real agent processes ---------------------------------------------------------------


def spawn_agent(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """``python -m firmware_agent run --config PATH`` from the repository root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "firmware_agent", "run", "--config", str(config_path)],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``agent`` in a task for the body; stop it (bounded) and surface its errors."""
    task = asyncio.create_task(agent.run(), name=f"agent-{agent.device_id}")
    try:
        yield task
    finally:
        await agent.stop()
        async with asyncio.timeout(20):
            await task
