"""The agent with a SimulatedCamera and no broker at all.

The privacy guarantees must hold with no network: the agent re-locks at a window's end
and ends a look at its cap on its own. Here the broker address points at a closed port,
so the MQTT task only ever fails to connect.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.launcher import free_port
from broker.pki import PkiPaths
from firmware_agent import Agent, ExecHookCamera, SeqStore, SimulatedCamera, StoreError
from firmware_agent.config import AgentConfig
from firmware_agent.link import backoff_delay
from firmware_agent.reports import OUTBOX_MAX
from tests.integration.agent_helpers import (
    ManualClock,
    Signer,
    agent_config_data,
    running,
    unique_device_id,
    wait_until,
)
from tillsyn_protocol import (
    Ack,
    CameraHealth,
    Channel,
    Event,
    LockState,
    RefusalReason,
    SigningKey,
    decode,
)
from tillsyn_protocol.tokens import TOKEN_TYPE


class Rig:
    """A device id, its signer, and a factory for agents on one state dir."""

    def __init__(
        self, tmp_path: Path, pki: PkiPaths, device_cert: Callable[[str], tuple[Path, Path]]
    ) -> None:
        self.tmp_path = tmp_path
        self.device_id = unique_device_id()
        self.signer = Signer(self.device_id)
        cert, key = device_cert(self.device_id)
        pem = self.signer.write_public_key(tmp_path / "command.pem")
        self.data = agent_config_data(
            device_id=self.device_id,
            pki=pki,
            cert=cert,
            key=key,
            command_keys=[pem],
            state_dir=tmp_path / "state",
            port=free_port(),  # nothing listens there: no network at all
        )

    def config(self, **overrides: Any) -> AgentConfig:
        return AgentConfig.from_mapping({**self.data, **overrides})

    def agent(
        self,
        *,
        clock: ManualClock | None = None,
        camera: Any = None,
        **overrides: Any,
    ) -> Agent:
        return Agent(self.config(**overrides), camera=camera or SimulatedCamera(), clock=clock)


@pytest.fixture
def rig(tmp_path: Path, pki_dir: PkiPaths, device_cert: Callable[[str], tuple[Path, Path]]) -> Rig:
    return Rig(tmp_path, pki_dir, device_cert)


def reports(agent: Agent, channel: Channel) -> list[dict[str, Any]]:
    model = {Channel.ACK: Ack, Channel.EVENT: Event}[channel]
    out = []
    for ch, payload in agent.pending():
        if ch is channel:
            decode(model, payload)  # everything the agent would publish is on-schema
            out.append(json.loads(payload))
    return out


def acks(agent: Agent) -> list[dict[str, Any]]:
    return reports(agent, Channel.ACK)


def events(agent: Agent, kind: str | None = None) -> list[dict[str, Any]]:
    return [e for e in reports(agent, Channel.EVENT) if kind is None or e["kind"] == kind]


def camera_of(agent: Agent) -> SimulatedCamera:
    assert isinstance(agent.camera, SimulatedCamera)
    return agent.camera


# --- direct path, moved clock -----------------------------------------------------------


async def test_arm_look_cap_and_window_end_with_a_moved_clock(rig: Rig) -> None:
    clock = ManualClock()
    agent = rig.agent(clock=clock)
    cam = camera_of(agent)
    t0 = clock.wall
    await agent.handle_command(rig.signer.arm(t0, t0 + 600).encode())
    assert agent.state is LockState.ARMED
    assert cam.armed and not cam.on
    assert SeqStore(rig.data["state_dir"]).load() == 1
    assert acks(agent)[-1] | {"ts": 0} == {
        "v": 1, "ts": 0, "jti": acks(agent)[-1]["jti"], "seq": 1, "cmd": "arm",
        "result": "applied", "state": "ARMED",
    }  # fmt: skip

    await agent.handle_command(rig.signer.look(clock.wall, look_id="L1", max_s=30).encode())
    assert agent.state is LockState.VIEWING
    assert cam.on
    started = events(agent, "look_started")
    assert started == [started[0] | {"look_id": "L1", "staff": "staff-7", "state": "VIEWING"}]

    clock.advance(1.5)  # rig's look_cap_s is 2: the device cap wins over the token's 30
    await agent.tick()
    assert agent.state is LockState.VIEWING
    clock.advance(0.5)
    await agent.tick()
    assert agent.state is LockState.ARMED
    assert not cam.on
    ended = events(agent, "look_ended")[-1]
    assert (ended["look_id"], ended["staff"], ended["reason"]) == ("L1", "staff-7", "look_cap")
    assert ended["duration_s"] == pytest.approx(2.0)

    clock.advance(600)
    await agent.tick()
    assert agent.state is LockState.LOCKED
    assert not cam.armed and not cam.on
    assert events(agent, "state_changed")[-1]["reason"] == "window_end"
    assert agent.counters["applied"] == 2


async def test_disarm(rig: Rig) -> None:
    clock = ManualClock()
    agent = rig.agent(clock=clock)
    await agent.handle_command(rig.signer.arm(clock.wall, clock.wall + 600).encode())
    await agent.handle_command(rig.signer.look(clock.wall).encode())
    await agent.handle_command(rig.signer.disarm(clock.wall).encode())
    assert agent.state is LockState.LOCKED
    cam = camera_of(agent)
    assert not cam.on and not cam.armed
    assert events(agent, "look_ended")[-1]["reason"] == "disarm"


def _foreign_signature(rig: Rig, claims_token: str) -> str:
    """The same claims signed by another key under the pinned key's kid."""
    header = jwt.get_unverified_header(claims_token)
    payload = jwt.decode(claims_token, options={"verify_signature": False})
    other = SigningKey.generate()
    return jwt.encode(payload, other.private_key, algorithm="EdDSA", headers=header)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda r, t: Signer(r.device_id).arm(t, t + 600), RefusalReason.UNKNOWN_KEY),
        (lambda r, t: _foreign_signature(r, r.signer.arm(t, t + 600)), RefusalReason.BAD_SIGNATURE),
        (lambda r, t: r.signer.arm(t - 900, t - 300), RefusalReason.EXPIRED),
        (lambda r, t: r.signer.arm(t + 60, t + 600), RefusalReason.NOT_YET_VALID),
        (lambda r, t: Signer("dev-someone-else", r.signer.key).arm(t, t + 600),
         RefusalReason.WRONG_AUDIENCE),
        (lambda r, t: r.signer.look(t), RefusalReason.WRONG_STATE),
        (lambda r, t: "not a token", RefusalReason.MALFORMED),
    ],
)  # fmt: skip
async def test_refused_tokens_leave_it_locked(
    rig: Rig, make: Callable[[Rig, float], str], reason: RefusalReason
) -> None:
    clock = ManualClock()
    agent = rig.agent(clock=clock)
    await agent.handle_command(make(rig, clock.wall).encode())
    assert agent.state is LockState.LOCKED
    ack = acks(agent)[-1]
    assert (ack["result"], ack["reason"], ack["state"]) == ("refused", reason.value, "LOCKED")
    assert events(agent, "token_refused")[-1]["reason"] == reason.value
    assert agent.counters[f"refused.{reason.value}"] == 1
    assert camera_of(agent).history == []  # never touched
    assert SeqStore(rig.data["state_dir"]).load() == 0


async def test_replay_and_duplicate(rig: Rig) -> None:
    clock = ManualClock()
    agent = rig.agent(clock=clock)
    first = rig.signer.arm(clock.wall, clock.wall + 600, seq=5)
    await agent.handle_command(first.encode())
    await agent.handle_command(rig.signer.disarm(clock.wall, seq=6).encode())
    await agent.handle_command(first.encode())  # same token: its ack may have been lost
    assert acks(agent)[-1]["result"] == "duplicate"
    await agent.handle_command(rig.signer.arm(clock.wall, clock.wall + 600, seq=4).encode())
    assert acks(agent)[-1]["reason"] == "replayed"
    assert agent.state is LockState.LOCKED


async def test_reboot_keeps_replay_protection(rig: Rig) -> None:
    clock = ManualClock()
    token = rig.signer.arm(clock.wall, clock.wall + 600)
    first = rig.agent(clock=clock)
    await first.handle_command(token.encode())
    assert first.state is LockState.ARMED
    rebooted = rig.agent(clock=clock)
    assert rebooted.state is LockState.LOCKED
    assert rebooted.machine.last_seq == 1
    await rebooted.handle_command(token.encode())
    assert acks(rebooted)[-1]["reason"] == "replayed"
    assert rebooted.state is LockState.LOCKED


async def test_corrupt_store_refuses_to_start(rig: Rig) -> None:
    state = Path(rig.data["state_dir"])
    state.mkdir()
    (state / "seq.json").write_text('{"v": 1, "seq": "lots"}')
    with pytest.raises(StoreError, match="corrupt"):
        rig.agent()


async def test_store_failure_never_turns_the_camera_on(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock()
    agent = rig.agent(clock=clock)
    cam = camera_of(agent)
    await agent.handle_command(rig.signer.arm(clock.wall, clock.wall + 600).encode())
    assert agent.state is LockState.ARMED

    def broken(self: SeqStore, seq: int) -> None:
        raise StoreError(self.path, "cannot write: No space left on device")

    monkeypatch.setattr(SeqStore, "save", broken)
    await agent.handle_command(rig.signer.look(clock.wall, look_id="L9").encode())
    assert agent.state is LockState.LOCKED
    assert not cam.on and not cam.armed
    assert all(r.event != "look-start" for r in cam.history)
    ack = acks(agent)[-1]
    assert (ack["result"], ack["state"], ack["seq"]) == ("refused", "LOCKED", 2)
    assert events(agent, "state_changed")[-1]["reason"] == "store_failed"
    assert agent.counters["store_failed"] == 1
    # In memory the seq stays used: the same look cannot be replayed in this process.
    monkeypatch.undo()
    await agent.handle_command(rig.signer.arm(clock.wall, clock.wall + 600, seq=2).encode())
    assert acks(agent)[-1]["reason"] == "replayed"


async def test_store_failure_during_a_look_ends_it(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock()
    agent = rig.agent(clock=clock)
    cam = camera_of(agent)
    await agent.handle_command(rig.signer.arm(clock.wall, clock.wall + 600).encode())
    await agent.handle_command(rig.signer.look(clock.wall, look_id="L1").encode())
    assert cam.on

    def broken(self: SeqStore, seq: int) -> None:
        raise StoreError(self.path, "I/O error")

    monkeypatch.setattr(SeqStore, "save", broken)
    clock.advance(1)
    await agent.handle_command(rig.signer.arm(clock.wall, clock.wall + 900).encode())
    assert agent.state is LockState.LOCKED
    assert not cam.on
    ended = events(agent, "look_ended")[-1]
    assert (ended["look_id"], ended["reason"], ended["state"]) == ("L1", "store_failed", "LOCKED")
    assert ended["duration_s"] == pytest.approx(1.0)


async def test_unsynced_clock_refuses_and_relocks(rig: Rig) -> None:
    clock = ManualClock()
    agent = rig.agent(clock=clock)
    await agent.handle_command(rig.signer.arm(clock.wall, clock.wall + 600).encode())
    clock.synced = False
    await agent.tick()
    assert agent.state is LockState.LOCKED
    await agent.handle_command(rig.signer.arm(clock.wall, clock.wall + 600).encode())
    assert acks(agent)[-1]["reason"] == "clock_unsynced"


async def test_failed_look_start_is_a_camera_fault(rig: Rig) -> None:
    clock = ManualClock()
    agent = rig.agent(clock=clock)
    cam = camera_of(agent)
    await agent.handle_command(rig.signer.arm(clock.wall, clock.wall + 600).encode())
    cam.set_health(CameraHealth.FAULT)  # before the health poll has noticed
    await agent.handle_command(rig.signer.look(clock.wall, look_id="L2").encode())
    assert agent.state is LockState.ARMED
    assert not cam.on
    assert agent.camera_health is CameraHealth.FAULT
    assert events(agent, "camera_fault")[-1]["reason"] == "driver_error"
    ended = events(agent, "look_ended")[-1]
    assert (ended["look_id"], ended["reason"]) == ("L2", "camera_fault")
    assert events(agent, "look_started") == []
    await agent.handle_command(rig.signer.look(clock.wall, look_id="L3").encode())
    assert acks(agent)[-1]["reason"] == "camera_fault"


async def test_failing_exec_hook_look_start_ends_the_look(rig: Rig) -> None:
    hook = rig.tmp_path / "hook.sh"
    calls = rig.tmp_path / "calls"
    hook.write_text(f'#!/bin/sh\necho "$1" >> "{calls}"\n[ "$1" = look-start ] && exit 1\nexit 0\n')
    hook.chmod(0o755)
    clock = ManualClock()
    config = rig.config(camera={"type": "exec", "program": str(hook), "timeout_s": 2})
    agent = Agent(config, clock=clock)
    assert isinstance(agent.camera, ExecHookCamera)
    await agent.handle_command(rig.signer.arm(clock.wall, clock.wall + 600).encode())
    await agent.handle_command(rig.signer.look(clock.wall, look_id="L4").encode())
    assert agent.state is LockState.ARMED
    assert calls.read_text().split() == ["unlock", "look-start", "look-end"]
    assert events(agent, "camera_fault")[-1]["reason"] == "driver_error"
    assert events(agent, "look_ended")[-1]["reason"] == "camera_fault"


# --- bad input --------------------------------------------------------------------------


async def test_unhashable_claims_from_a_forger_cost_one_command_only(rig: Rig) -> None:
    """Unhashable claims in a forged token are a plain refusal, not an internal error."""
    clock = ManualClock()
    agent = rig.agent(clock=clock)
    await agent.handle_command(rig.signer.arm(clock.wall, clock.wall + 600).encode())
    forger = SigningKey.generate()
    for cmd in ([], {}):
        token = jwt.encode(
            {"cmd": cmd, "jti": "x", "seq": 99},
            forger.private_key,
            algorithm="EdDSA",
            headers={"kid": rig.signer.key.kid, "typ": TOKEN_TYPE},
        )
        await agent.handle_command(token.encode())
        assert acks(agent)[-1]["result"] == "refused"
        assert acks(agent)[-1]["reason"] == "bad_signature"
    assert agent.state is LockState.ARMED  # unchanged, not unlocked further, not crashed
    assert agent.counters["internal_error"] == 0


async def test_non_ascii_jti_is_not_echoed_off_schema(rig: Rig) -> None:
    clock = ManualClock()
    agent = rig.agent(clock=clock)
    token = jwt.encode(
        {"cmd": "arm", "jti": "é", "seq": 3},
        SigningKey.generate().private_key,
        algorithm="EdDSA",
        headers={"kid": "nope", "typ": TOKEN_TYPE},
    )
    await agent.handle_command(token.encode())
    ack = acks(agent)[-1]
    assert (ack.get("jti"), ack["seq"], ack["reason"]) == (None, 3, "unknown_key")
    assert agent.counters["report_errors"] == 0


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff\xfe\xfd",
        b"{}",
        b'{"cmd": "arm"}',
        b"null",
        b"42",
        b"a.b.c",
        b"x" * 70_000,
        "ärm".encode(),
    ],
)
async def test_malformed_payloads_are_counted_and_change_nothing(rig: Rig, payload: bytes) -> None:
    agent = rig.agent(clock=ManualClock())
    await agent.handle_command(payload)
    assert agent.state is LockState.LOCKED
    assert agent.counters["malformed"] == 1
    assert acks(agent)[-1]["reason"] in {"malformed", "too_large"}


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=st.one_of(
        st.binary(max_size=3000),
        st.text(max_size=600).map(str.encode),
        st.lists(st.text(alphabet="abcAB-_=.", max_size=80), min_size=3, max_size=3).map(
            lambda parts: ".".join(parts).encode()
        ),
    )
)
def test_no_payload_crashes_the_agent_or_unlocks(rig: Rig, payload: bytes) -> None:
    agent = rig.__dict__.setdefault("_fuzz_agent", rig.agent(clock=ManualClock()))
    asyncio.run(agent.handle_command(payload))
    assert agent.state is LockState.LOCKED
    assert camera_of(agent).history == []


async def test_outbox_is_bounded_while_offline(rig: Rig) -> None:
    agent = rig.agent(clock=ManualClock())
    for _ in range(OUTBOX_MAX):
        await agent.handle_command(b"junk")
    assert len(agent.pending()) == OUTBOX_MAX
    assert agent.counters["outbox_dropped"] == OUTBOX_MAX  # ack + event per refusal


# --- running, real time, no network -----------------------------------------------------


async def test_boot_locks_the_camera_before_connecting(rig: Rig) -> None:
    agent = rig.agent()
    cam = camera_of(agent)
    async with running(agent):
        await wait_until(lambda: agent.counters["connect_failures"] >= 1, what="a failed connect")
        assert cam.history[0].event == "lock"
        assert agent.state is LockState.LOCKED
        assert not agent.connected
        assert events(agent, "boot")[0]["state"] == "LOCKED"


async def test_timer_relocks_at_window_end_with_no_network(rig: Rig) -> None:
    agent = rig.agent()
    cam = camera_of(agent)
    async with running(agent):
        now = time.time()
        until = int(now) + 2
        await agent.handle_command(rig.signer.arm(now, until).encode())
        assert agent.state is LockState.ARMED
        await wait_until(lambda: agent.state is LockState.LOCKED, timeout=4, what="re-lock")
        assert time.time() >= until - 0.05
        assert time.time() - until < 1.0
        assert not cam.armed
        assert events(agent, "state_changed")[-1]["reason"] == "window_end"
        assert agent.counters["connect_failures"] >= 1
        assert agent.counters["connects"] == 0


async def test_look_cap_ends_the_look_with_no_network(rig: Rig) -> None:
    agent = rig.agent(look_cap_s=1)
    cam = camera_of(agent)
    async with running(agent):
        now = time.time()
        await agent.handle_command(rig.signer.arm(now, now + 60).encode())
        await agent.handle_command(rig.signer.look(now, look_id="L5", max_s=5).encode())
        assert cam.on
        await wait_until(lambda: not cam.on, timeout=3, what="look cap")
        assert agent.state is LockState.ARMED
    (on, off, look_id), *_ = cam.on_intervals()
    assert look_id == "L5"
    assert off is not None
    assert 0.95 <= off - on < 1.6


async def test_camera_fault_during_a_look_is_noticed_by_the_health_poll(rig: Rig) -> None:
    agent = rig.agent()
    cam = camera_of(agent)
    async with running(agent):
        now = time.time()
        await agent.handle_command(rig.signer.arm(now, now + 60).encode())
        await agent.handle_command(rig.signer.look(now, look_id="L6", max_s=60).encode())
        cam.set_health(CameraHealth.UNPLUGGED)
        await wait_until(lambda: not cam.on, timeout=2, what="look ended by the fault")
        assert agent.state is LockState.ARMED
        assert events(agent, "camera_fault")[-1]["reason"] == "unplugged"
        await agent.handle_command(rig.signer.look(time.time(), look_id="L7").encode())
        assert acks(agent)[-1]["reason"] == "camera_fault"
        cam.set_health(CameraHealth.OK)
        await wait_until(lambda: agent.camera_health is CameraHealth.OK, what="restored")
        assert events(agent, "camera_restored")
        await agent.handle_command(rig.signer.look(time.time(), look_id="L8").encode())
        assert cam.on


async def test_stop_is_bounded_and_leaves_the_camera_off(rig: Rig) -> None:
    agent = rig.agent(look_cap_s=600)
    cam = camera_of(agent)
    task = asyncio.create_task(agent.run())
    await wait_until(lambda: agent.running)
    now = time.time()
    await agent.handle_command(rig.signer.arm(now, now + 600).encode())
    await agent.handle_command(rig.signer.look(now, max_s=600).encode())
    assert cam.on
    started = time.monotonic()
    await agent.stop()
    await task
    assert time.monotonic() - started < 3
    assert not cam.on and not cam.armed
    assert agent.state is LockState.LOCKED
    assert events(agent, "state_changed")[-1]["reason"] == "shutdown"
    with pytest.raises(Exception, match="runs once"):
        await agent.run()


def test_backoff_is_jittered_exponential_and_capped() -> None:
    # The first retry (attempt 0) is jittered too, over [1, 2] s: it used to be exactly
    # the minimum, which brought a whole fleet back in lockstep after a broker restart.
    highs = [backoff_delay(n, 1.0, 60.0, uniform=lambda lo, hi: hi) for n in range(10)]
    assert highs == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0, 60.0, 60.0]
    firsts = [backoff_delay(0, 1.0, 60.0) for _ in range(200)]
    assert all(1.0 <= s <= 2.0 for s in firsts)
    assert len({round(s, 3) for s in firsts}) > 50
    lows = {backoff_delay(n, 1.0, 60.0, uniform=lambda lo, hi: lo) for n in range(10)}
    assert lows == {1.0}
    assert backoff_delay(10_000, 1.0, 60.0, uniform=lambda lo, hi: hi) == 60.0
    samples = [backoff_delay(4, 1.0, 60.0) for _ in range(200)]
    assert all(1.0 <= s <= 32.0 for s in samples)
    assert len({round(s, 3) for s in samples}) > 50  # spread out, not synchronised


def test_public_names_match_all() -> None:
    import inspect

    import firmware_agent

    assert all(hasattr(firmware_agent, name) for name in firmware_agent.__all__)
    public = {
        n
        for n, v in vars(firmware_agent).items()
        if not n.startswith("_") and not inspect.ismodule(v) and n != "annotations"
    }
    assert public == set(firmware_agent.__all__) - {"__version__"}
