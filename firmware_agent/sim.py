"""The device simulator: thousands of real :class:`~firmware_agent.agent.Agent` instances
in one asyncio loop, each with its own certificate, its own mutual-TLS MQTT connection,
its own state directory, a simulated camera and a clock that can drift.

Nothing about the agent is faked: heartbeats, acks, reports, timers, the persistent session
and the jittered reconnect backoff are the agent's own code. The simulator adds a jittered
start (``ramp_s``), faults on request or at random rates, and a status count:

=========  ===============================================================================
``die``     the connection is dropped with no DISCONNECT (the broker publishes the Last
            Will) and the agent stops, as on a power cut; ``recover`` boots it again
``off``     a clean shutdown: the agent locks, reports ``offline`` and disconnects
``hang``    the agent stops working with its socket left open: no heartbeats, acks or
            pings, so only the broker's keepalive or the fleet's heartbeat silence tell;
            ``recover`` is the watchdog's reboot
``drop``    the network stops both ways without closing anything; the agent keeps running,
            finds the broker silent by its own keepalive and retries (ENETUNREACH) until
            ``recover``
``unplug``  the simulated camera reports ``unplugged`` (the agent raises a camera fault)
``drift``   the device's wall clock is off by seconds and/or drifts (ppm)
=========  ===============================================================================

``hang`` and ``drop`` need the per-device relay of :mod:`firmware_agent.sim_faults`
(the default); ``direct`` connects straight to the broker and supports the other faults.
The control protocol and the multi-process runner are in :mod:`firmware_agent.sim_control`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import resource
import socket
import time
from collections import Counter
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tillsyn_protocol import CameraHealth

from .agent import Agent
from .camera import SimulatedCamera
from .config import AgentConfig
from .sim_faults import DriftClock, Link

__all__ = ["Fault", "SimDevice", "SimSettings", "Simulator", "device_ids", "raise_nofile"]

log = logging.getLogger(__name__)

_HALT_WAIT_S = 10.0


class Fault(StrEnum):
    DIE = "die"
    OFF = "off"
    HANG = "hang"
    DROP = "drop"
    UNPLUG = "unplug"
    DRIFT = "drift"


DOWN = (Fault.DIE, Fault.OFF, Fault.HANG, Fault.DROP)  # off the network until recovered
STOPPED = (Fault.DIE, Fault.OFF, Fault.HANG)  # the agent stops: recovering is a reboot
RELAYED = (Fault.HANG, Fault.DROP)  # need the relay


class SimSettings(BaseModel):
    """Everything one simulator process needs (sent as JSON to worker processes)."""

    model_config = ConfigDict(extra="forbid")

    broker_host: str = "127.0.0.1"
    broker_port: int = 8883
    ca_file: Path
    cert_dir: Path  # {device_id}.crt and {device_id}.key
    command_keys: list[Path]
    state_root: Path  # one state directory per device below it
    device_ids: list[str]
    heartbeat_s: float = 30.0
    keepalive_s: int = 30
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    session_expiry_s: int = 3600
    health_interval_s: float = 5.0
    look_cap_s: float = 60.0
    ramp_s: float = 0.0  # each device boots at a uniformly random moment of [0, ramp_s)
    direct: bool = False  # no relay: hang and drop are unavailable
    fault_rates: dict[Fault, float] = Field(default_factory=dict)  # per device per second
    recover_after_s: float = 120.0  # random faults end after this long (0: never)
    seed: int | None = None
    agent_log_level: str = "ERROR"  # thousands of agents: only their errors by default


def device_ids(count: int, prefix: str = "dev-sim", first: int = 0) -> list[str]:
    """``dev-sim-000000``, ``dev-sim-000001``, ... (valid device ids and certificate CNs)."""
    return [f"{prefix}-{i:06d}" for i in range(first, first + count)]


def raise_nofile() -> int:
    """Raise the soft limit of open descriptors to the hard one; returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def agent_config(settings: SimSettings, device_id: str) -> AgentConfig:
    return AgentConfig.from_mapping(
        {
            "device_id": device_id,
            "state_dir": str(settings.state_root / device_id),
            "command_keys": [str(k) for k in settings.command_keys],
            "heartbeat_interval_s": settings.heartbeat_s,
            "look_cap_s": settings.look_cap_s,
            "broker": {
                "host": settings.broker_host,
                "port": settings.broker_port,
                "keepalive_s": settings.keepalive_s,
                "session_expiry_s": settings.session_expiry_s,
                "reconnect_min_s": settings.reconnect_min_s,
                "reconnect_max_s": settings.reconnect_max_s,
            },
            "tls": {
                "ca_file": str(settings.ca_file),
                "cert_file": str(settings.cert_dir / f"{device_id}.crt"),
                "key_file": str(settings.cert_dir / f"{device_id}.key"),
            },
            "camera": {"type": "simulated", "health_interval_s": settings.health_interval_s},
        }
    )


_STATUS_COUNTERS = ("connects", "disconnects", "connect_failures")


class SimDevice:
    """One simulated device: its agent (rebuilt on every boot), camera, clock and link."""

    def __init__(self, config: AgentConfig, link: Link | None) -> None:
        self.config = config
        self.id = config.device_id
        self.camera = SimulatedCamera()
        self.clock = DriftClock()
        self.link = link
        self.agent: Agent | None = None
        self.task: asyncio.Task[None] | None = None
        self.down: Fault | None = None  # die, hang or drop
        self.unplugged = False
        self.boots = 0
        self.crashed = False
        self._past_counters: Counter[str] = Counter()  # of the agents of earlier boots

    @property
    def connected(self) -> bool:
        return self.down is None and self.agent is not None and self.agent.connected

    def count(self, key: str) -> int:
        """One of the agents' counters, summed over this device's boots."""
        now = self._past_counters[key]
        return now if self.agent is None else now + self.agent.counters[key]

    def boot(self) -> None:
        """Start a fresh agent, as a device does after power-on (it boots LOCKED)."""
        if self.agent is not None:
            self._past_counters.update(self.agent.counters)
        try:
            self.agent = Agent(
                self.config,
                camera=self.camera,
                clock=self.clock,
                tcp_opener=None if self.link is None else self.link.open,
            )
        except Exception as exc:  # e.g. a corrupt seq store: this device stays off
            self.crashed = True
            log.error("device %s cannot start: %s", self.id, exc)
            return
        self.task = asyncio.create_task(self.agent.run(), name=f"sim:{self.id}")
        self.task.add_done_callback(self._ended)
        self.boots += 1

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.crashed = True
            log.error("device %s agent failed: %r", self.id, task.exception())

    async def halt(self) -> None:
        """Stop the agent's work at once: no goodbye, no clean DISCONNECT reaches the broker
        (the caller has cut or paused the link, or shut the socket, before)."""
        task = self.task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=_HALT_WAIT_S)

    def shutdown_socket(self) -> None:
        """Direct mode: end the TCP connection under paho (no DISCONNECT, no TLS close)."""
        client = self.agent.mqtt_client if self.agent is not None else None
        sock = client._client.socket() if client is not None else None
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    async def stop(self) -> None:
        """A clean stop: the agent locks, says ``offline`` and disconnects."""
        if self.agent is None or self.down is not None:
            await self.halt()
            if self.link is not None:
                await self.link.cut()
            return
        with contextlib.suppress(Exception):
            await self.agent.stop()
        if self.link is not None:
            self.link.resume()


class Simulator:
    """Runs the devices of one process; faults via :meth:`fault`, counts via :meth:`status`."""

    def __init__(self, settings: SimSettings, *, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.rng = rng or random.Random(settings.seed)
        self.devices: dict[str, SimDevice] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._boots: list[asyncio.TimerHandle] = []
        self._started = 0.0
        logging.getLogger("firmware_agent").setLevel(settings.agent_log_level)
        log.setLevel(logging.INFO)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Build every device and schedule its boot (jittered over ``ramp_s``)."""
        loop = asyncio.get_running_loop()
        s = self.settings
        for device_id in s.device_ids:
            link = None if s.direct else Link(loop, s.broker_host, s.broker_port)
            self.devices[device_id] = SimDevice(agent_config(s, device_id), link)
        self._started = time.monotonic()
        for device in self.devices.values():
            delay = self.rng.uniform(0, s.ramp_s) if s.ramp_s > 0 else 0.0
            self._boots.append(loop.call_later(delay, self._boot_if_up, device))
        if s.fault_rates:
            self._spawn(self._random_faults())
        log.info(
            "simulating %d devices (%s), booting over %.1f s",
            len(self.devices),
            "direct" if s.direct else "relayed",
            s.ramp_s,
        )

    def _boot_if_up(self, device: SimDevice) -> None:
        if device.agent is None and device.down is None:
            device.boot()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Stop every device cleanly (bounded), then the simulator's own tasks."""
        for handle in self._boots:
            handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(d.stop() for d in self.devices.values()), return_exceptions=True)

    async def wait_connected(self, *, within_s: float, share: float = 1.0) -> int:
        """Wait until ``share`` of the devices that are up are connected; returns the count."""
        deadline = time.monotonic() + within_s
        while True:
            up = [d for d in self.devices.values() if d.down is None and not d.crashed]
            connected = sum(d.connected for d in up)
            if up and connected >= share * len(up):
                return connected
            if time.monotonic() > deadline:
                raise TimeoutError(f"{connected} of {len(up)} devices connected")
            await asyncio.sleep(0.1)

    # --- reading -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        devices = self.devices.values()
        down = Counter(d.down.value for d in devices if d.down is not None)
        # Only the counters reported: a benchmark polls this several times a second during
        # a storm, and merging every agent's whole Counter took 8 ms per 2,500 devices.
        counters = {k: sum(d.count(k) for d in devices) for k in _STATUS_COUNTERS}
        return {
            "devices": len(self.devices),
            "booted": sum(d.boots > 0 for d in devices),
            "connected": sum(d.connected for d in devices),
            "crashed": sum(d.crashed for d in devices),
            "die": down["die"],
            "off": down["off"],
            "hang": down["hang"],
            "drop": down["drop"],
            "unplugged": sum(d.unplugged for d in devices),
            "drifting": sum(d.clock.drifting for d in devices),
            "connects": counters["connects"],
            "disconnects": counters["disconnects"],
            "connect_failures": counters["connect_failures"],
            "uptime_s": round(time.monotonic() - self._started, 1),
        }

    def listing(self) -> dict[str, dict[str, Any]]:
        return {
            d.id: {
                "connected": d.connected,
                "down": d.down.value if d.down else None,
                "unplugged": d.unplugged,
                "drift_s": d.clock.offset_s,
                "boots": d.boots,
            }
            for d in self.devices.values()
        }

    def pick(self, kind: Fault | None, count: int) -> list[str]:
        """``count`` random devices a fault of ``kind`` can hit (None: faulty ones)."""
        if kind is None:
            ok = [d.id for d in self.devices.values() if d.down or d.unplugged or d.clock.drifting]
        elif kind in DOWN:
            ok = [d.id for d in self.devices.values() if d.down is None]
            if kind in RELAYED and self.settings.direct:
                ok = []
        elif kind is Fault.UNPLUG:
            ok = [d.id for d in self.devices.values() if not d.unplugged]
        else:
            ok = list(self.devices)
        return self.rng.sample(ok, min(count, len(ok)))

    # --- faults --------------------------------------------------------------------------

    async def fault(
        self, kind: Fault, ids: list[str], *, offset_s: float = 0.0, rate_ppm: float = 0.0
    ) -> dict[str, float]:
        """Apply ``kind`` to the named devices; returns ``{id: epoch applied}`` for those it
        changed (a device already down is not hit again)."""
        applied: dict[str, float] = {}
        halts: list[SimDevice] = []
        offs: list[Agent] = []
        for device_id in ids:
            device = self.devices.get(device_id)
            if device is None:
                continue
            at = await self._apply(device, kind, offset_s, rate_ppm)
            if at is not None:
                applied[device_id] = at
                if kind in (Fault.DIE, Fault.HANG):
                    halts.append(device)
                elif kind is Fault.OFF and device.agent is not None:
                    offs.append(device.agent)
        # The agents are stopped after every device was hit, so the times stay close.
        stops = (a.stop() for a in offs)
        await asyncio.gather(*(d.halt() for d in halts), *stops, return_exceptions=True)
        return applied

    async def _apply(
        self, device: SimDevice, kind: Fault, offset_s: float, rate_ppm: float
    ) -> float | None:
        link = device.link
        if kind in DOWN and device.down is not None:
            return None
        if kind in RELAYED and link is None:
            return None
        match kind:
            case Fault.DIE:
                if link is not None:
                    link.down = True
                    await link.cut()
                else:
                    device.shutdown_socket()
            case Fault.HANG:
                assert link is not None
                link.pause()  # first: the halted agent's DISCONNECT must never cross
            case Fault.DROP:
                assert link is not None
                link.down = True
                link.pause()
            case Fault.UNPLUG:
                device.camera.set_health(CameraHealth.UNPLUGGED)
                device.unplugged = True
            case Fault.DRIFT:
                device.clock.set(offset_s, rate_ppm)
        if kind in DOWN:
            device.down = kind
        return time.time()

    async def recover(self, ids: list[str]) -> dict[str, float]:
        """Undo every fault of the named devices: reboot the dead and hung ones, restore
        the network, plug the camera back in, set the clock right."""
        applied: dict[str, float] = {}
        for device_id in ids:
            device = self.devices.get(device_id)
            if device is None:
                continue
            changed = device.unplugged or device.clock.drifting or device.down is not None
            link = device.link
            if device.down in STOPPED:
                if link is not None:
                    await link.cut()  # a rebooted device starts with no connection
                    link.down = False
                    link.resume()
                device.down = None
                device.boot()
            elif device.down is Fault.DROP and link is not None:
                link.down = False
                link.resume()
                device.down = None
            device.camera.set_health(CameraHealth.OK)
            device.unplugged = False
            device.clock.set(0.0)
            if changed:
                applied[device_id] = time.time()
        return applied

    async def _random_faults(self) -> None:
        """Faults as Poisson processes at the configured per-device rates."""
        rates = self.settings.fault_rates
        total = sum(rates.values()) * len(self.devices)
        if total <= 0:
            return
        kinds, weights = list(rates), list(rates.values())
        while True:
            await asyncio.sleep(self.rng.expovariate(total))
            kind = self.rng.choices(kinds, weights)[0]
            ids = self.pick(kind, 1)
            if not ids:
                continue
            offset = self.rng.uniform(-300, 300) if kind is Fault.DRIFT else 0.0
            hit = await self.fault(kind, ids, offset_s=offset)
            log.info("random fault %s on %s", kind.value, ", ".join(hit) or "nothing")
            if hit and self.settings.recover_after_s > 0:
                self._spawn(self._recover_later(list(hit)))

    async def _recover_later(self, ids: list[str]) -> None:
        await asyncio.sleep(self.settings.recover_after_s)
        await self.recover(ids)
