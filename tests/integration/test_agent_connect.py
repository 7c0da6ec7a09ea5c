"""The agent's connect attempts against a broker that does not answer as it should.

A fake broker on 127.0.0.1 counts the agent's TCP connections that are open (accepted,
not yet closed by the agent). Whatever goes wrong with an attempt (no CONNACK in time, a
refused CONNACK, a failed TLS handshake), its connection must be closed before the next
attempt: an abandoned connection that completes later is a session takeover at a real
broker (the 10,000-device benchmark saw 41,728 in 5 minutes). Every retry delay,
the first included, is jittered.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest

import firmware_agent.agent as agent_module
import firmware_agent.link as link_module
from broker.launcher import MosquittoProcess
from broker.pki import PkiPaths, init_pki
from firmware_agent import Agent, AgentConfig, SimulatedCamera
from tests.integration.agent_helpers import (
    Signer,
    agent_config_data,
    running,
    unique_device_id,
    wait_until,
)
from tillsyn_protocol import Channel, device_topic

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    # A socket the agent left for the garbage collector to close ("unclosed <ssl.SSLSocket")
    # is a leak too, even when it happens to be collected in time.
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
]

CONNACK_WAIT_S = 0.5
RECONNECT_MIN_S = 0.3
RECONNECT_MAX_S = 1.2
SLOW_TLS_S = 1.0
SLOW_SETUP_S = 1.5  # more than a round trip's timeout, less than the CONNACK wait
# MQTT 5 CONNACK: session present 0, reason 0x87 "Not authorized", no properties.
CONNACK_NOT_AUTHORIZED = b"\x20\x03\x00\x87\x00"


@dataclass
class FakeBroker:
    """Accepts TCP; then, by ``mode``:

    - ``silent``: completes the TLS handshake (with the test PKI's broker certificate)
      and never answers CONNECT, like a broker with a backlog of CONNECTs;
    - ``refuse``: completes TLS and answers CONNECT with a refusing CONNACK;
    - ``bad_tls``: answers the TLS ClientHello with bytes that are not TLS;
    - ``slow_tls``: starts the TLS handshake only after ``SLOW_TLS_S``, then as ``silent``;
    - ``slow_setup``: completes TLS, accepts CONNECT at once, then answers the SUBSCRIBE
      only after ``SLOW_SETUP_S`` (a broker busy with a reconnect storm); PUBACKs every
      QoS 1 PUBLISH and answers PINGREQ, like a broker that works.

    It never closes a connection itself: each stays open until the agent closes it.
    """

    mode: str
    tls: ssl.SSLContext
    open_now: int = 0
    max_open: int = 0
    accepted: list[float] = field(default_factory=list)  # monotonic times
    closed: list[float] = field(default_factory=list)
    packets: list[int] = field(default_factory=list)  # slow_setup: types of those answered

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted.append(time.monotonic())
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        try:
            if self.mode == "bad_tls":
                await reader.read(1)  # the ClientHello
                writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            else:
                if self.mode == "slow_tls":
                    await asyncio.sleep(SLOW_TLS_S)
                await writer.start_tls(self.tls)
                if self.mode == "refuse":
                    await reader.read(1)  # the CONNECT
                    writer.write(CONNACK_NOT_AUTHORIZED)
                if self.mode == "slow_setup":
                    await self._serve_slowly(reader, writer)
            while await reader.read(4096):  # until the agent closes its end
                pass
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass  # the agent closed (or reset) the connection
        finally:
            self.open_now -= 1
            self.closed.append(time.monotonic())
            writer.transport.abort()

    async def _serve_slowly(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            kind, body = await read_packet(reader)
            if kind == 0x10:  # CONNECT -> CONNACK: no session present, success
                writer.write(b"\x20\x03\x00\x00\x00")
            elif kind == 0x80:  # SUBSCRIBE -> SUBACK (QoS 1 granted), late
                await asyncio.sleep(SLOW_SETUP_S)
                writer.write(b"\x90\x04" + body[:2] + b"\x00\x01")
            elif kind == 0x30 and body:  # PUBLISH; QoS 1 (flags 0x2) -> PUBACK
                flags = body[-1]
                packet = body[:-1]
                if flags & 0x06:
                    topic_len = int.from_bytes(packet[:2], "big")
                    writer.write(b"\x40\x02" + packet[2 + topic_len : 4 + topic_len])
            elif kind == 0xC0:  # PINGREQ -> PINGRESP
                writer.write(b"\xd0\x00")
            self.packets.append(kind)


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One MQTT packet: (type nibble << 4, body); a PUBLISH's flags are appended to it."""
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    body = await reader.readexactly(length)
    kind = first & 0xF0
    return kind, body + bytes([first & 0x0F]) if kind == 0x30 else body


class _Protocol(asyncio.StreamReaderProtocol):
    """``asyncio.start_server``'s protocol; ``paused``: read nothing until ``start_tls``
    (else the ClientHello would land in the StreamReader, lost to the TLS layer)."""

    def __init__(
        self,
        handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        *,
        paused: bool,
    ) -> None:
        super().__init__(asyncio.StreamReader(), handle)
        self._paused_at_start = paused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._paused_at_start:
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()
        super().connection_made(transport)


@contextlib.asynccontextmanager
async def fake_broker(mode: str, pki: PkiPaths) -> AsyncIterator[tuple[FakeBroker, int]]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(pki.broker_cert), str(pki.broker_key))
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS, as the real broker
    broker = FakeBroker(mode, ctx)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Protocol(broker.handle, paused=mode == "slow_tls"), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    try:
        yield broker, port
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await server.wait_closed()


@pytest.fixture
def delays(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, float]]:
    """Short timeouts for the test, and every (attempt, delay) the agent's backoff chose."""
    monkeypatch.setattr(link_module, "CONNACK_TIMEOUT_S", CONNACK_WAIT_S, raising=False)
    monkeypatch.setattr(link_module, "CLIENT_TIMEOUT_S", CONNACK_WAIT_S)
    chosen: list[tuple[int, float]] = []
    real = link_module.backoff_delay

    def spy(attempt: int, low: float, high: float) -> float:
        delay = real(attempt, low, high)
        chosen.append((attempt, delay))
        return delay

    monkeypatch.setattr(agent_module, "backoff_delay", spy)
    return chosen


def agent_for(
    tmp_path: Path, pki: PkiPaths, device_cert: Callable[[str], tuple[Path, Path]], port: int
) -> Agent:
    device_id = unique_device_id()
    cert, key = device_cert(device_id)
    data = agent_config_data(
        device_id=device_id,
        pki=pki,
        cert=cert,
        key=key,
        command_keys=[Signer(device_id).write_public_key(tmp_path / "cmd.pem")],
        state_dir=tmp_path / "state",
        port=port,
        broker={
            "host": "127.0.0.1",
            "port": port,
            "keepalive_s": 5,  # paho itself drops a silent connection after this long
            "reconnect_min_s": RECONNECT_MIN_S,
            "reconnect_max_s": RECONNECT_MAX_S,
            "session_expiry_s": 300,
        },
    )
    return Agent(AgentConfig.from_mapping(data), camera=SimulatedCamera())


@pytest.mark.parametrize("mode", ["silent", "refuse", "bad_tls"])
async def test_failed_attempts_leave_no_connection_open(
    mode: str,
    tmp_path: Path,
    pki_dir: PkiPaths,
    device_cert: Callable[[str], tuple[Path, Path]],
    delays: list[tuple[int, float]],
) -> None:
    attempts = 4
    async with fake_broker(mode, pki_dir) as (broker, port):
        agent = agent_for(tmp_path, pki_dir, device_cert, port)
        async with running(agent):
            await wait_until(
                lambda: len(broker.closed) >= attempts,
                timeout=20,
                what=f"{attempts} failed connect attempts",
            )
            # At any moment at most one connection from this agent was open.
            assert broker.max_open == 1, (broker.max_open, len(broker.accepted))
            assert not agent.connected
            assert agent.counters["connect_failures"] >= attempts - 1
        # Stopping the agent leaves nothing open either.
        await wait_until(lambda: broker.open_now == 0, timeout=3, what="no open connection")
        assert broker.max_open == 1

    # Every retry waited a jittered delay within [min, max], the first one included.
    assert len(delays) >= attempts - 1
    assert all(RECONNECT_MIN_S <= d <= RECONNECT_MAX_S for _, d in delays)
    assert delays[0][0] == 0  # no connect ever succeeded: attempts count up from 0
    first = delays[0][1]
    assert first != RECONNECT_MIN_S  # was exactly the minimum: a fleet in lockstep
    assert first <= 2 * RECONNECT_MIN_S
    assert len({d for _, d in delays}) == len(delays)
    # ... and the agent really waited them: the next connection came after the delay.
    for i, (_, delay) in enumerate(delays[: len(broker.accepted) - 1]):
        gap = broker.accepted[i + 1] - broker.closed[i]
        assert gap >= delay - 0.05, (i, gap, delay)


async def test_stop_during_the_tls_handshake_leaves_no_connection(
    tmp_path: Path,
    pki_dir: PkiPaths,
    device_cert: Callable[[str], tuple[Path, Path]],
    delays: list[tuple[int, float]],
) -> None:
    """Stopping the agent cancels its connect while the TLS handshake is still under way:
    the connection is closed at once, not completed later and left to send CONNECT and
    live on until its keepalive (5 s here)."""
    async with fake_broker("slow_tls", pki_dir) as (broker, port):
        agent = agent_for(tmp_path, pki_dir, device_cert, port)
        async with running(agent):
            await wait_until(lambda: len(broker.accepted) == 1, timeout=5, what="connect")
        assert time.monotonic() - broker.accepted[0] < SLOW_TLS_S  # stopped mid-handshake
        await wait_until(
            lambda: broker.open_now == 0, timeout=SLOW_TLS_S + 1.5, what="no open connection"
        )
        assert len(broker.accepted) == 1


async def test_connack_wait_is_longer_than_a_round_trip() -> None:
    """The CONNACK wait scales with the keepalive, capped; never beyond it (paho drops a
    connection that received nothing for a keepalive interval)."""
    assert link_module.connack_timeout(5) == 5
    assert link_module.connack_timeout(30) == link_module.CONNACK_TIMEOUT_S == 30
    assert link_module.connack_timeout(600) == 30
    assert link_module.connack_timeout(30) > link_module.CLIENT_TIMEOUT_S


async def test_a_slow_suback_after_connack_does_not_throw_the_session_away(
    tmp_path: Path,
    pki_dir: PkiPaths,
    device_cert: Callable[[str], tuple[Path, Path]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a broker restart it CONNACKs, then answers the SUBSCRIBE late: the session
    set-up waits as long as for the CONNACK, not a round trip's timeout. Giving up there
    threw away handshakes the broker had already paid for (4,586 of 10,000 sessions in a
    reconnect storm), each followed by a new attempt adding to the storm."""
    monkeypatch.setattr(link_module, "CONNACK_TIMEOUT_S", 3 * SLOW_SETUP_S)
    monkeypatch.setattr(link_module, "CLIENT_TIMEOUT_S", CONNACK_WAIT_S)
    async with fake_broker("slow_setup", pki_dir) as (broker, port):
        agent = agent_for(tmp_path, pki_dir, device_cert, port)
        async with running(agent):
            await wait_until(lambda: agent.connected, timeout=10, what="session set up")
            assert len(broker.accepted) == 1  # the first connection, kept
            assert agent.counters["disconnects"] == agent.counters["connect_failures"] == 0
            assert 0x80 in broker.packets


# --- open_tls: the TCP and TLS handshakes on the event loop --------------------------------


@contextlib.asynccontextmanager
async def tls_server(pki: PkiPaths, host: str) -> AsyncIterator[tuple[int, list[int]]]:
    """A TLS server presenting ``pki``'s broker certificate; yields (port, open count)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(pki.broker_cert), str(pki.broker_key))
    open_now = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_now[0] += 1
        try:
            while await reader.read(4096):
                pass
        except (OSError, ssl.SSLError):
            pass
        finally:
            open_now[0] -= 1
            writer.transport.abort()

    server = await asyncio.start_server(handle, host, 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1], open_now
    finally:
        server.close()


def client_context(
    pki: PkiPaths, device_cert: Callable[[str], tuple[Path, Path]]
) -> ssl.SSLContext:
    cert, key = device_cert(unique_device_id())
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def test_open_tls_connects_by_name_and_by_address(
    pki_dir: PkiPaths, device_cert: Callable[[str], tuple[Path, Path]]
) -> None:
    tls = client_context(pki_dir, device_cert)
    async with tls_server(pki_dir, "127.0.0.1") as (port, open_now):
        for host in ("localhost", "127.0.0.1"):  # the resolver, then a literal address
            conn = await link_module.open_tls(tls, host, port, limit_s=5)
            assert conn.version() is not None and conn.getblocking() is False
            conn.close()
        await wait_until(lambda: open_now[0] == 0, timeout=3, what="closed")


@pytest.mark.parametrize("case", ["foreign_ca", "wrong_host"])
async def test_open_tls_refuses_a_broker_it_cannot_verify_and_closes(
    case: str,
    tmp_path: Path,
    pki_dir: PkiPaths,
    device_cert: Callable[[str], tuple[Path, Path]],
) -> None:
    """A broker certificate from another CA, or one not issued for the host dialled
    (127.0.0.2 is loopback too, but not in the certificate): refused, nothing left open."""
    server_pki = init_pki(tmp_path / "other") if case == "foreign_ca" else pki_dir
    host = "127.0.0.1" if case == "foreign_ca" else "127.0.0.2"
    tls = client_context(pki_dir, device_cert)
    async with tls_server(server_pki, host) as (port, open_now):
        with pytest.raises(ssl.SSLCertVerificationError):
            await link_module.open_tls(tls, host, port, limit_s=5)
        await wait_until(lambda: open_now[0] == 0, timeout=3, what="closed")


async def test_open_tls_gives_up_on_a_silent_server_and_closes() -> None:
    """TCP accepted, no TLS answer: a TimeoutError naming the limit, the socket closed."""
    closed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client closes
        closed.set()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        tls = ssl.create_default_context()
        with pytest.raises(TimeoutError, match=r"TLS handshake timed out after 0\.3 s"):
            await link_module.open_tls(tls, "127.0.0.1", port, limit_s=0.3)
        async with asyncio.timeout(3):
            await closed.wait()
    finally:
        server.close()


async def test_the_agents_client_never_opens_a_blocking_connection_itself(
    tmp_path: Path, pki_dir: PkiPaths, device_cert: Callable[[str], tuple[Path, Path]]
) -> None:
    """paho's connect runs on the event loop: without a connection handed over it would
    block the loop in its own TCP and TLS handshakes, so it refuses."""
    config = agent_for(tmp_path, pki_dir, device_cert, 1).config
    client = link_module.make_client(
        config, ssl.create_default_context(), will_topic="t", will_payload=b""
    )
    with pytest.raises(RuntimeError, match="open_tls"):
        async with client:
            pass


async def test_a_connection_lost_with_a_write_queued_leaves_nothing_registered(
    tmp_path: Path,
    pki_dir: PkiPaths,
    device_cert: Callable[[str], tuple[Path, Path]],
    mosquitto: MosquittoProcess,
) -> None:
    """paho asks for a writer when it queues a packet. aiomqtt registered it later, by
    descriptor number: after a connection closed meanwhile it hit a closed descriptor
    (or another connection's, reusing the number). The agent's client registers at once,
    so closing right after leaves nothing behind on the event loop."""
    config = agent_for(tmp_path, pki_dir, device_cert, mosquitto.port).config
    tls = link_module.make_ssl_context(config.tls)
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        client = link_module.make_client(config, tls, will_topic="t", will_payload=b"")
        closer = link_module.ConnectionCloser(client)
        closer.adopt(await link_module.open_tls(tls, "127.0.0.1", mosquitto.port, limit_s=5))
        with contextlib.suppress(aiomqtt.MqttError):  # leaving a lost connection
            async with client:
                sock = client._client.socket()
                assert sock is not None
                fd = sock.fileno()
                topic = device_topic(config.device_id, Channel.EVENT)
                client._client.publish(topic, b"{}", qos=0)  # queued: paho asks for a writer
                link_module.close_connection(client)  # the connection is lost right after
                await asyncio.sleep(0.05)  # anything deferred has run by now
                assert errors == []
                assert fd not in loop._selector.get_map()  # type: ignore[attr-defined]
    finally:
        loop.set_exception_handler(None)
