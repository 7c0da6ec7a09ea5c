"""The device agent against a real Mosquitto with the production config and real TLS.

The test plays the fleet: it connects with the ``tillsyn-fleet`` certificate and signs
commands with a key the agent pins. Every device id is unique to its test.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from broker.launcher import MosquittoProcess
from broker.pki import PkiPaths
from firmware_agent import Agent, AgentConfig, SimulatedCamera
from firmware_agent import agent as agent_module
from firmware_agent import link as link_module
from tests.integration.agent_helpers import (
    FleetProbe,
    Received,
    Signer,
    agent_config_data,
    read_retained,
    running,
    spawn_agent,
    unique_device_id,
    wait_retained,
    wait_until,
    write_agent_config,
)
from tillsyn_protocol import (
    Ack,
    Channel,
    Event,
    Heartbeat,
    LockState,
    RefusalReason,
    StateReport,
    Status,
    decode,
    device_topic,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

_SCHEMAS: dict[Channel, Any] = {
    Channel.STATE: StateReport,
    Channel.EVENT: Event,
    Channel.ACK: Ack,
    Channel.HB: Heartbeat,
    Channel.STATUS: Status,
}


def assert_on_schema(messages: list[Received]) -> None:
    """The device never publishes anything but the protocol's message schemas."""
    for m in messages:
        if m.channel is not Channel.CMD:
            decode(_SCHEMAS[m.channel], m.payload)


class Device:
    """One test device: id, certificate, pinned signer, state dir, and its broker."""

    def __init__(
        self,
        tmp_path: Path,
        pki: PkiPaths,
        device_cert: Callable[[str], tuple[Path, Path]],
        broker: MosquittoProcess,
    ) -> None:
        self.tmp_path = tmp_path
        self.pki = pki
        self.broker = broker
        self.id = unique_device_id()
        self.signer = Signer(self.id)
        cert, key = device_cert(self.id)
        pem = self.signer.write_public_key(tmp_path / f"{self.id}.pem")
        self.data = agent_config_data(
            device_id=self.id,
            pki=pki,
            cert=cert,
            key=key,
            command_keys=[pem],
            state_dir=tmp_path / "state",
            port=broker.port,
            host=broker.host,
        )

    def config(self, **overrides: Any) -> AgentConfig:
        return AgentConfig.from_mapping({**self.data, **overrides})

    def agent(self, **overrides: Any) -> Agent:
        return Agent(self.config(**overrides), camera=SimulatedCamera())

    def probe(self) -> FleetProbe:
        return FleetProbe(self.pki, self.broker.host, self.broker.port, self.id)

    def topic(self, channel: Channel) -> str:
        return device_topic(self.id, channel)

    async def retained(self, channel: Channel) -> dict[str, Any] | None:
        return await read_retained(
            self.pki, self.broker.host, self.broker.port, self.topic(channel)
        )

    async def wait_retained(
        self, channel: Channel, match: Callable[[dict[str, Any]], bool], timeout: float = 8.0
    ) -> dict[str, Any]:
        return await wait_retained(
            self.pki,
            self.broker.host,
            self.broker.port,
            self.topic(channel),
            match,
            timeout=timeout,
        )


@pytest.fixture
def device(
    tmp_path: Path,
    pki_dir: PkiPaths,
    device_cert: Callable[[str], tuple[Path, Path]],
    mosquitto: MosquittoProcess,
) -> Device:
    return Device(tmp_path, pki_dir, device_cert, mosquitto)


def camera(agent: Agent) -> SimulatedCamera:
    assert isinstance(agent.camera, SimulatedCamera)
    return agent.camera


async def connected(agent: Agent) -> None:
    await wait_until(lambda: agent.connected, timeout=8, what="agent connected")


def state_is(state: LockState) -> Callable[[dict[str, Any]], bool]:
    return lambda s: s["state"] == state.value


# --- the nightly path -------------------------------------------------------------------


async def test_arm_then_the_window_end_relocks_without_disarm(device: Device) -> None:
    agent = device.agent()
    cam = camera(agent)
    async with device.probe() as fleet, running(agent):
        await connected(agent)
        status = await device.wait_retained(Channel.STATUS, lambda s: s["status"] == "online")
        assert (status["boot_id"], status["fw"], status["kind"]) == (
            agent.boot_id,
            "1.2.3-test",
            "camera",
        )
        now = time.time()
        until = int(now) + 3
        await fleet.send(device.signer.arm(now, until))
        ack = await fleet.wait_for(Channel.ACK, lambda a: a["seq"] == 1)
        assert (ack["result"], ack["cmd"], ack["state"]) == ("applied", "arm", "ARMED")
        state = await device.wait_retained(Channel.STATE, state_is(LockState.ARMED))
        assert (state["armed_until"], state["last_seq"]) == (until, 1)
        assert cam.armed and not cam.on

        ended = await fleet.wait_for(
            Channel.EVENT, lambda e: e.get("reason") == "window_end", timeout=6
        )
        assert ended["state"] == "LOCKED"
        assert time.time() >= until - 0.05
        await device.wait_retained(Channel.STATE, state_is(LockState.LOCKED))
        assert not cam.armed and not cam.on
        hb = await fleet.wait_for(Channel.HB)
        assert (hb["camera"], hb["fw"], hb["clock_synced"]) == ("ok", "1.2.3-test", True)
    assert_on_schema(fleet.messages)


async def test_an_arm_that_extends_an_armed_window_is_in_the_retained_state(
    device: Device,
) -> None:
    """No state change, but the window's end and the seq are: the fleet must see them (it
    compares them with the arm it wants, and would arm again otherwise)."""
    agent = device.agent()
    async with device.probe() as fleet, running(agent):
        await connected(agent)
        now = time.time()
        await fleet.send(device.signer.arm(now, int(now) + 20))
        await device.wait_retained(Channel.STATE, state_is(LockState.ARMED))
        longer = int(now) + 40
        await fleet.send(device.signer.arm(time.time(), longer))
        ack = await fleet.wait_for(Channel.ACK, lambda a: a["seq"] == 2)
        assert (ack["result"], ack["state"]) == ("applied", "ARMED")
        state = await device.wait_retained(Channel.STATE, lambda s: s["last_seq"] == 2)
        assert (state["state"], state["armed_until"]) == ("ARMED", longer)
    assert_on_schema(fleet.messages)


async def test_look_is_capped_then_disarm(device: Device) -> None:
    agent = device.agent()  # look_cap_s = 2 in the test config
    cam = camera(agent)
    async with device.probe() as fleet, running(agent):
        await connected(agent)
        now = time.time()
        await fleet.send(device.signer.arm(now, now + 120))
        await fleet.wait_for(Channel.ACK, lambda a: a["seq"] == 1)

        await fleet.send(
            device.signer.look(time.time(), look_id="look-a1", staff="nurse.9", max_s=30)
        )
        ack = await fleet.wait_for(Channel.ACK, lambda a: a["seq"] == 2)
        assert (ack["result"], ack["cmd"], ack["state"]) == ("applied", "look", "VIEWING")
        started = await fleet.wait_for(Channel.EVENT, lambda e: e["kind"] == "look_started")
        assert (started["look_id"], started["staff"]) == ("look-a1", "nurse.9")
        assert cam.on
        viewing = await device.wait_retained(Channel.STATE, state_is(LockState.VIEWING))
        assert viewing["look_id"] == "look-a1"

        ended = await fleet.wait_for(Channel.EVENT, lambda e: e["kind"] == "look_ended", timeout=5)
        assert (ended["look_id"], ended["staff"], ended["reason"]) == (
            "look-a1",
            "nurse.9",
            "look_cap",
        )
        assert ended["duration_s"] == pytest.approx(2.0, abs=0.5)
        assert ended["state"] == "ARMED"
        assert not cam.on
        ((on, off, look_id),) = cam.on_intervals()
        assert look_id == "look-a1"
        assert off is not None
        assert 1.9 <= off - on <= 2.6

        await fleet.send(device.signer.disarm(time.time()))
        ack = await fleet.wait_for(Channel.ACK, lambda a: a["seq"] == 3)
        assert (ack["result"], ack["state"]) == ("applied", "LOCKED")
        await device.wait_retained(Channel.STATE, state_is(LockState.LOCKED))
        assert not cam.armed
    assert_on_schema(fleet.messages)


# --- refusals ---------------------------------------------------------------------------


def _other_key(d: Device, now: float) -> str:
    return Signer(d.id).arm(now, now + 60, seq=10)


def _expired(d: Device, now: float) -> str:
    return d.signer.arm(now - 600, now - 5, seq=10)


def _other_device(d: Device, now: float) -> str:
    return Signer(unique_device_id(), d.signer.key).arm(now, now + 60, seq=10)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_other_key, RefusalReason.UNKNOWN_KEY),
        (_expired, RefusalReason.EXPIRED),
        (_other_device, RefusalReason.WRONG_AUDIENCE),
    ],
)
async def test_refused_tokens_keep_it_locked(
    device: Device, make: Callable[[Device, float], str], reason: RefusalReason
) -> None:
    agent = device.agent()
    async with device.probe() as fleet, running(agent):
        await connected(agent)
        await fleet.send(make(device, time.time()))
        ack = await fleet.wait_for(Channel.ACK)
        assert (ack["result"], ack["reason"], ack["state"], ack["seq"]) == (
            "refused",
            reason.value,
            "LOCKED",
            10,
        )
        refused = await fleet.wait_for(Channel.EVENT, lambda e: e["kind"] == "token_refused")
        assert refused["reason"] == reason.value
        state = await device.wait_retained(Channel.STATE, lambda s: True)
        assert (state["state"], state["last_seq"]) == ("LOCKED", 0)
        assert agent.counters[f"refused.{reason.value}"] == 1
        assert camera(agent).history[-1].event == "lock"
        assert not camera(agent).armed


async def test_a_replayed_token_is_refused(device: Device) -> None:
    agent = device.agent()
    async with device.probe() as fleet, running(agent):
        await connected(agent)
        now = time.time()
        old = device.signer.arm(now, now + 60)
        await fleet.send(old)
        await fleet.wait_for(Channel.ACK, lambda a: a["seq"] == 1)
        await fleet.send(device.signer.disarm(now))
        await fleet.wait_for(Channel.ACK, lambda a: a["seq"] == 2)
        # Captured and replayed with a fresh jti cannot be done (it is signed), so the
        # attacker replays a token of the same key with an older seq:
        mark = fleet.mark()
        await fleet.send(device.signer.arm(now, now + 60, seq=1))
        ack = await fleet.wait_for(Channel.ACK, after=mark)
        assert (ack["result"], ack["reason"], ack["state"]) == ("refused", "replayed", "LOCKED")
        assert agent.state is LockState.LOCKED


async def test_reboot_refuses_the_old_token_as_replayed(device: Device) -> None:
    now = time.time()
    token = device.signer.arm(now, now + 60)
    first = device.agent()
    async with device.probe() as fleet:
        async with running(first):
            await connected(first)
            await fleet.send(token)
            ack = await fleet.wait_for(Channel.ACK)
            assert ack["result"] == "applied"
        # The agent stopped cleanly: status offline, camera locked.
        await device.wait_retained(Channel.STATUS, lambda s: s["status"] == "offline")

        rebooted = device.agent()
        assert rebooted.machine.last_seq == 1
        async with running(rebooted):
            await connected(rebooted)
            await device.wait_retained(Channel.STATUS, lambda s: s["boot_id"] == rebooted.boot_id)
            mark = fleet.mark()
            await fleet.send(token)
            ack = await fleet.wait_for(Channel.ACK, after=mark)
            assert (ack["result"], ack["reason"], ack["state"]) == ("refused", "replayed", "LOCKED")
            assert rebooted.state is LockState.LOCKED


async def test_bad_payloads_on_cmd_are_counted_and_change_nothing(device: Device) -> None:
    payloads = [
        b"",
        b"\xff\xfe\x80 not utf-8",
        b'{"cmd": "arm", "until": 9999999999}',
        b"[1, 2, 3]",
        b"eyJhbGciOiJub25lIn0.e30.",  # alg none
        b"x" * 60_000,  # oversized for a token, still under the broker's packet limit
        "ärm".encode(),
    ]
    agent = device.agent()
    async with device.probe() as fleet, running(agent):
        await connected(agent)
        for payload in payloads:
            await fleet.send(payload)
        await wait_until(lambda: agent.counters["received"] == len(payloads), what="all in")
        assert agent.counters["refused"] == len(payloads)
        assert agent.counters["malformed"] == len(payloads) - 1  # alg none: bad_algorithm
        assert agent.counters["refused.bad_algorithm"] == 1
        assert agent.state is LockState.LOCKED
        await wait_until(lambda: len(fleet.of(Channel.ACK)) == len(payloads), what="acks")
        assert {a["state"] for a in fleet.of(Channel.ACK)} == {"LOCKED"}
        # Still alive and obeying valid commands afterwards.
        now = time.time()
        await fleet.send(device.signer.arm(now, now + 60))
        ack = await fleet.wait_for(Channel.ACK, lambda a: a["result"] == "applied")
        assert ack["state"] == "ARMED"
    assert_on_schema(fleet.messages)


# --- offline behaviour ------------------------------------------------------------------


async def test_a_command_queued_while_briefly_offline_is_delivered(device: Device) -> None:
    first = device.agent()
    async with running(first):
        await connected(first)  # creates the persistent session and its subscription
    async with device.probe() as fleet:
        now = time.time()
        await fleet.send(device.signer.arm(now, now + 60))  # nobody connected: queued
        second = device.agent()
        async with running(second):
            ack = await fleet.wait_for(Channel.ACK, timeout=8)
            assert (ack["result"], ack["state"]) == ("applied", "ARMED")
            assert second.state is LockState.ARMED


@pytest.fixture
def own_broker(pki_dir: PkiPaths, tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A Mosquitto only this test kills and restarts."""
    proc = MosquittoProcess(pki=pki_dir, workdir=tmp_path / "own-broker")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


async def test_broker_killed_while_armed_relocks_on_its_own_and_reports_later(
    tmp_path: Path,
    pki_dir: PkiPaths,
    device_cert: Callable[[str], tuple[Path, Path]],
    own_broker: MosquittoProcess,
) -> None:
    device = Device(tmp_path, pki_dir, device_cert, own_broker)
    # Reconnect no sooner than 1.5 s so the test's subscriber is back first.
    broker_cfg = {**device.data["broker"], "reconnect_min_s": 1.5, "reconnect_max_s": 2.0}
    agent = device.agent(broker=broker_cfg)
    cam = camera(agent)
    async with running(agent):
        await connected(agent)
        async with device.probe() as fleet:
            now = time.time()
            until = int(now) + 3
            await fleet.send(device.signer.arm(now, until))
            await fleet.wait_for(Channel.ACK)
        await device.wait_retained(Channel.STATE, state_is(LockState.ARMED))

        own_broker.kill()
        await wait_until(lambda: not agent.connected, timeout=5, what="agent notices")
        await wait_until(lambda: agent.state is LockState.LOCKED, timeout=5, what="re-lock")
        assert time.time() >= until - 0.05
        assert not cam.armed and not cam.on
        assert agent.counters["connect_failures"] >= 1 or agent.counters["disconnects"] >= 1

        await asyncio.to_thread(own_broker.restart)
        async with device.probe() as fleet:
            await wait_until(lambda: agent.connected, timeout=8, what="agent reconnects")
            state = await device.wait_retained(Channel.STATE, state_is(LockState.LOCKED))
            assert state["last_seq"] == 1
            ended = await fleet.wait_for(
                Channel.EVENT, lambda e: e.get("reason") == "window_end", timeout=5
            )
            assert ended["state"] == "LOCKED"
            status = await device.retained(Channel.STATUS)
            assert status is not None
            assert (status["status"], status["boot_id"]) == ("online", agent.boot_id)
        assert agent.counters["connects"] == 2


async def _an_arm_is_applied(device: Device) -> None:
    async with device.probe() as fleet:
        now = time.time()
        await fleet.send(device.signer.arm(now, now + 60))
        ack = await fleet.wait_for(Channel.ACK, timeout=8)
        assert (ack["result"], ack["state"]) == ("applied", "ARMED")


async def _restart_and_arm(
    device: Device, agent: Agent, broker: MosquittoProcess, *, keep_sessions: bool
) -> None:
    """Restart the broker under the connected ``agent`` (SIGTERM saves its sessions;
    SIGKILL before any autosave loses them), wait for the reconnect, then check that a
    command sent afterwards still reaches the device."""
    async with running(agent):
        await connected(agent)
        if keep_sessions:
            await asyncio.to_thread(broker.restart)
        else:
            broker.kill()
            await asyncio.to_thread(broker.start)
        await wait_until(lambda: agent.counters["connects"] == 2, timeout=10, what="reconnect")
        await _an_arm_is_applied(device)


async def test_a_resumed_session_is_not_subscribed_again_and_still_gets_commands(
    tmp_path: Path,
    pki_dir: PkiPaths,
    device_cert: Callable[[str], tuple[Path, Path]],
    own_broker: MosquittoProcess,
) -> None:
    """After a broker restart that kept the sessions, CONNACK says "session present" and
    the agent skips the SUBSCRIBE (one round trip per device in a reconnect storm)."""
    device = Device(tmp_path, pki_dir, device_cert, own_broker)
    agent = device.agent()
    await _restart_and_arm(device, agent, own_broker, keep_sessions=True)
    assert agent.counters["sessions_resumed"] == 1
    assert agent.counters["resubscribed"] == 0  # not yet: that waits for the storm to pass


async def test_a_session_the_broker_lost_is_subscribed_again(
    tmp_path: Path,
    pki_dir: PkiPaths,
    device_cert: Callable[[str], tuple[Path, Path]],
    own_broker: MosquittoProcess,
) -> None:
    """A broker killed before it saved the session answers the reconnect with no session:
    the agent subscribes again at once, or it would never see a command again."""
    device = Device(tmp_path, pki_dir, device_cert, own_broker)
    agent = device.agent()
    await _restart_and_arm(device, agent, own_broker, keep_sessions=False)
    assert agent.counters["sessions_resumed"] == 0


async def test_a_resumed_session_is_subscribed_again_later(
    tmp_path: Path,
    pki_dir: PkiPaths,
    device_cert: Callable[[str], tuple[Path, Path]],
    own_broker: MosquittoProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Belt and braces: a resumed session is asked for its subscription again once the
    storm is likely over (here after 0.2-0.3 s), without losing a command."""
    monkeypatch.setattr(agent_module, "RESUBSCRIBE_AFTER_S", (0.2, 0.3))
    device = Device(tmp_path, pki_dir, device_cert, own_broker)
    agent = device.agent()
    async with running(agent):
        await connected(agent)
        await asyncio.to_thread(own_broker.restart)
        await wait_until(lambda: agent.counters["resubscribed"] == 1, timeout=10, what="again")
        assert agent.counters["sessions_resumed"] == 1
        await _an_arm_is_applied(device)


async def test_the_agent_stops_when_aiomqtt_replaces_the_cancellation(
    device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injected: aiomqtt's ``__aexit__`` raises its own error ("Operation timed out":
    its DISCONNECT did not go out within the round-trip timeout) in place of the
    cancellation that ends the session. The agent still stops, and does not reconnect."""
    original = link_module._Client.__aexit__

    async def aexit(self: aiomqtt.Client, exc_type: Any, exc: Any, tb: Any) -> None:
        await original(self, exc_type, exc, tb)
        if exc_type is asyncio.CancelledError:
            raise aiomqtt.MqttError("Operation timed out")

    monkeypatch.setattr(link_module._Client, "__aexit__", aexit)
    agent = device.agent()
    async with running(agent):  # stop() raises AgentError if it does not stop in time
        await connected(agent)
    assert not agent.connected
    assert agent.counters["connects"] == 1


async def test_sigkilled_agent_process_leaves_offline_via_last_will(device: Device) -> None:
    config = write_agent_config(device.tmp_path / "agent.toml", device.data)
    proc = spawn_agent(config, device.tmp_path / "agent.log")
    try:
        online = await device.wait_retained(
            Channel.STATUS, lambda s: s["status"] == "online", timeout=10
        )
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 5)
        offline = await device.wait_retained(
            Channel.STATUS, lambda s: s["status"] == "offline", timeout=5
        )
        assert offline["boot_id"] == online["boot_id"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    log = (device.tmp_path / "agent.log").read_text()
    assert "connected to" in log


async def test_agent_process_stops_cleanly_on_sigterm(device: Device) -> None:
    config = write_agent_config(device.tmp_path / "agent.toml", device.data)
    proc = spawn_agent(config, device.tmp_path / "agent.log")
    try:
        await device.wait_retained(Channel.STATUS, lambda s: s["status"] == "online", timeout=10)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 10)
        assert code == 0
        assert time.monotonic() - started < 8
        offline = await device.retained(Channel.STATUS)
        assert offline is not None
        assert offline["status"] == "offline"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    log = (device.tmp_path / "agent.log").read_text()
    assert "Traceback" not in log, log
