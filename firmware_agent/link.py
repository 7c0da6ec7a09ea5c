"""The MQTT side of the agent: TLS context, opening the connection (TCP and TLS on the
event loop), client construction, reconnect backoff.

MQTT 5 over mutual TLS; the client id is the device id and the broker takes the MQTT
username from the client certificate. ``clean_start=False`` plus a session expiry makes
the broker keep the subscription and queue QoS 1 commands while the device is briefly
away. The Last Will is a retained ``status`` "offline".
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import random
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Self

import aiomqtt
import paho.mqtt.client as mqtt
from aiomqtt.client import ProtocolVersion, _set_client_socket_defaults
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tillsyn_protocol import paho_tables

from .config import AgentConfig, TlsConfig
from .errors import ConfigError

__all__ = [
    "CLIENT_TIMEOUT_S",
    "CONNACK_TIMEOUT_S",
    "TCP_CONNECT_TIMEOUT_S",
    "ConnectionCloser",
    "SessionFlag",
    "TcpOpener",
    "backoff_delay",
    "close_connection",
    "connack_timeout",
    "make_client",
    "make_ssl_context",
    "open_tcp",
    "open_tls",
]

# Bound on every broker round trip once connected (SUBACK, PUBACK, DISCONNECT).
CLIENT_TIMEOUT_S = 5.0

# Upper bound on the wait for CONNACK; see connack_timeout().
CONNACK_TIMEOUT_S = 30.0

# Bound on the TCP connect: a dead or unreachable broker is noticed here, quickly. Long
# enough for the kernel's third SYN retransmission (after 1 + 2 + 4 s): a broker whose
# accept queue overflows in a reconnect storm drops SYNs, and at 5 s a few devices in
# 10,000 gave up on connections it then accepted. The TLS handshake that follows waits
# as long as for CONNACK (see connack_timeout).
TCP_CONNECT_TIMEOUT_S = 10.0

# Opens the TCP connection to the broker (non-blocking); the simulator's relay is one.
TcpOpener = Callable[[], Awaitable[socket.socket]]

log = logging.getLogger(__name__)
paho_tables.install()  # paho's Properties share their tables: one per message otherwise
_mqtt_log = logging.getLogger(f"{__name__}.paho")
# paho is chatty at DEBUG; keep it to warnings so packet traces never reach the logs.
_mqtt_log.setLevel(logging.WARNING)


def make_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """One client context: verify the broker against our CA, present the device cert."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("tls.ca_file", f"cannot load CA: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("tls.cert_file", f"cannot load certificate and key: {exc}") from None
    return ctx


async def open_tcp(host: str, port: int, *, limit_s: float) -> socket.socket:
    """A connected, non-blocking TCP socket to ``host:port``, each address in turn (as
    ``socket.create_connection``), on the event loop."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(limit_s):
            return await _connect_any(loop, host, port)
    except TimeoutError:
        raise TimeoutError(f"TCP connect timed out after {limit_s:g} s") from None


async def _connect_any(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """The first address of ``host`` that accepts a connection."""
    try:  # a literal address needs no resolver (asyncio's runs in a thread)
        ip = ipaddress.ip_address(host)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        addrs: list[tuple[socket.AddressFamily, tuple[object, ...]]] = [(family, (host, port))]
    except ValueError:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addrs = [(info[0], info[4]) for info in infos]
    error: OSError = OSError(f"cannot resolve {host}")
    for family, addr in addrs:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, addr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    raise error


async def open_tls(
    tls: ssl.SSLContext, host: str, port: int, *, limit_s: float, tcp: TcpOpener | None = None
) -> ssl.SSLSocket:
    """The connection paho would open (TCP, then the TLS handshake, the broker verified
    by ``tls``), opened on the event loop instead of in paho's blocking connect.

    paho's connect blocks on both handshakes, so aiomqtt runs it in an executor thread.
    A device would not mind; the simulator's thousands of agents did: 32 such threads
    per process, holding and waiting for the GIL, starved its event loop in a reconnect
    storm, which then sent the CONNECTs of finished handshakes seconds late (the broker
    accepted ~450 TCP connections/s but completed ~250 sessions/s for the first 10 s).
    Closed on any failure, cancellation included; raises OSError (ssl.SSLError,
    TimeoutError).
    """
    sock = await (tcp() if tcp is not None else open_tcp(host, port, limit_s=TCP_CONNECT_TIMEOUT_S))
    try:
        conn = tls.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(limit_s):
            while True:
                try:
                    conn.do_handshake()
                    return conn
                except ssl.SSLWantReadError:
                    await _ready(loop, conn.fileno(), write=False)
                except ssl.SSLWantWriteError:
                    await _ready(loop, conn.fileno(), write=True)
    except TimeoutError:
        conn.close()
        raise TimeoutError(f"TLS handshake timed out after {limit_s:g} s") from None
    except BaseException:
        conn.close()
        raise


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool) -> None:
    """Wait until ``fd`` is readable (or writable)."""
    waiter = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await waiter
    finally:
        # Removed before anyone else registers the descriptor (aiomqtt, once paho has it).
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def backoff_delay(
    attempt: int,
    low: float,
    high: float,
    *,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Full jitter over [low, min(high, low * 2**(attempt + 1))].

    Spreading reconnects over the whole interval keeps a broker restart from turning into
    a thundering herd of simultaneous TLS handshakes; ``low`` stays a real minimum so a
    down broker is never hammered in a tight loop, and ``high`` the maximum. The first
    retry (``attempt`` 0) is jittered too, over [low, 2 * low]: after a broker restart
    every device is on its first retry, so a fixed first delay would bring them all back
    in lockstep.
    """
    ceiling = min(high, low * 2 ** (min(attempt, 32) + 1))
    return uniform(low, max(low, ceiling))


def connack_timeout(keepalive_s: float) -> float:
    """How long to wait for the TLS handshake, then for CONNACK, once TCP is connected.

    The TCP connect is bounded on its own (TCP_CONNECT_TIMEOUT_S), so a dead or
    unreachable broker is noticed there, quickly. A broker that accepted the connection
    and has not finished the TLS handshake or answered CONNECT yet is alive but behind:
    it works through a backlog of handshakes and CONNECTs, and giving up early only adds
    to it (the broker still processes the abandoned CONNECT, then the retry, a session
    takeover each time; in a reconnect storm 56 of 10,000 devices gave up 10 s into their
    TLS handshakes). So wait much longer than one round trip, up to the keepalive
    interval: paho itself drops a connection that has received nothing for that long,
    and the MQTT 5 keepalive is already this device's "how long can the broker be
    silent" setting (config: at least 5 s, the default 30 s).
    """
    return min(CONNACK_TIMEOUT_S, keepalive_s)


def close_connection(client: aiomqtt.Client) -> None:
    """Close the client's TCP/TLS connection now, whatever state it is in (idempotent).

    aiomqtt 2.5.1 leaves the socket open when ``__aenter__`` gives up waiting for
    CONNACK (it only resets its ``_connected`` future), and when a read or write raised
    it only fails the ``_disconnected`` future, after which ``__aexit__`` returns early.
    The connection then stays registered in the event loop: a late CONNACK completes it
    (a session takeover at the broker, a zombie that PUBACKs and drops queued QoS 1
    commands) and paho's keepalive keeps it alive. paho's ``_sock_close`` is what paho
    itself calls on every disconnect: it runs the socket-close callback (with which
    aiomqtt removes the reader and cancels its misc task) and closes the socket; it
    does nothing when there is no socket. Private API, checked against paho-mqtt 2.2.0.
    Call it from the event loop's thread.
    """
    try:
        client._client._sock_close()
    except Exception as exc:  # a failing close callback; paho closes the socket anyway
        log.warning("closing the mqtt connection: %s", str(exc)[:160] or type(exc).__name__)


class ConnectionCloser:
    """Hands one attempt's connection to paho and closes it when the attempt ends,
    cancellation included.

    The TCP and TLS handshakes run on the event loop (open_tls); :meth:`adopt` makes
    paho's connect take that connection instead of opening one. paho's connect then runs
    on the event loop too and registers its socket at once (``_Client``), so nothing of
    the attempt is still on its way to the loop when it ends: closing at once is safe. A
    connection paho never took is closed here. Create it before entering the client.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        self._client = client
        self._unclaimed: socket.socket | None = None

    def adopt(self, sock: ssl.SSLSocket) -> None:
        """paho's connect takes ``sock`` (connected, TLS done) instead of opening one."""
        self._unclaimed = sock

        def take() -> ssl.SSLSocket:  # paho's _create_socket, called by its connect
            if self._unclaimed is None:
                raise OSError("connection attempt abandoned")
            self._unclaimed = None
            return sock

        self._client._client._create_socket = take  # type: ignore[method-assign]

    def close(self) -> None:
        unclaimed, self._unclaimed = self._unclaimed, None
        if unclaimed is not None:
            unclaimed.close()
        close_connection(self._client)


class SessionFlag:
    """CONNACK's session-present flag for one client (aiomqtt 2.5 does not pass it on):
    whether the broker still held this device's session, subscriptions included. Set
    before ``async with client`` returns."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.present = False
        paho = client._client
        inner = paho.on_connect

        def on_connect(*args: Any) -> None:  # (client, userdata, flags, reason, properties)
            self.present = bool(args[2].session_present)
            if inner is not None:
                inner(*args)

        paho.on_connect = on_connect


class _Client(aiomqtt.Client):
    """aiomqtt's client, entered without its executor thread.

    aiomqtt 2.5.1 runs paho's connect in the loop's executor because it blocks on the TCP
    and TLS handshakes. The agent opens the connection itself (open_tls) and hands it
    over (ConnectionCloser.adopt), so paho's connect only sets the socket up and queues
    CONNECT: run here, on the event loop, it saves a thread hop per attempt (in the
    simulator's reconnect storm ~10 % of its event loops' time went into waking executor
    threads). The rest is aiomqtt's ``__aenter__`` as it is.
    """

    async def __aenter__(self) -> Self:
        if "_create_socket" not in vars(self._client):
            raise RuntimeError("no connection adopted: open it with open_tls first")
        if self._lock.locked():
            raise aiomqtt.MqttReentrantError("the client is already entered")
        await self._lock.acquire()
        try:
            self._client_connect()
            _set_client_socket_defaults(self._client.socket(), self._socket_options)
        except OSError as exc:
            self._lock.release()
            raise aiomqtt.MqttError(str(exc)) from None
        try:
            await self._wait_for(self._connected, timeout=None)
        except aiomqtt.MqttError:
            self._lock.release()
            self._connected = asyncio.get_running_loop().create_future()
            raise
        if self._disconnected.done():
            self._disconnected = asyncio.get_running_loop().create_future()
        return self

    # paho calls these on the event loop here (its connect too, see above). aiomqtt defers
    # the registrations through call_soon_threadsafe with the descriptor's number, for its
    # executor thread; by the time they ran, a connection lost meanwhile had closed the
    # descriptor (asyncio logged "Bad file descriptor", 17-71 times per reconnect storm)
    # or another connection of the process had been given the same number, whose reader
    # or writer (its TCP connect's, say) it then replaced. Registered at once instead.

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        def readable() -> None:
            try:
                while True:
                    client.loop_read()
                    # loop_read does not always consume what an SSLSocket has decoded
                    pending = getattr(client._sock, "pending", None)
                    if pending is None or pending() == 0:
                        break
            except Exception as exc:  # a broken connection: aiomqtt's __aexit__ sees it
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        self._loop.add_reader(sock.fileno(), readable)
        self._misc_task = self._loop.create_task(self._misc_loop())

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        def writable() -> None:
            try:
                client.loop_write()
            except Exception as exc:
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        self._loop.add_writer(sock.fileno(), writable)


def make_client(
    config: AgentConfig, tls: ssl.SSLContext, *, will_topic: str, will_payload: bytes
) -> aiomqtt.Client:
    return _Client(
        config.broker.host,
        config.broker.port,
        identifier=config.device_id,
        protocol=ProtocolVersion.V5,
        clean_start=False,
        properties=_connect_properties(config.broker.session_expiry_s),
        keepalive=config.broker.keepalive_s,
        tls_context=tls,
        will=aiomqtt.Will(will_topic, will_payload, qos=1, retain=True),
        timeout=CLIENT_TIMEOUT_S,
        logger=_mqtt_log,
        max_queued_incoming_messages=1000,
    )


@functools.cache
def _connect_properties(session_expiry_s: int) -> Properties:
    """CONNECT's properties (paho only reads them): built once, not per attempt."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = session_expiry_s
    return props
