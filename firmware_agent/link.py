"""The MQTT side of the agent: TLS context, client construction, reconnect backoff.

MQTT 5 over mutual TLS; the client id is the device id and the broker takes the MQTT
username from the client certificate. ``clean_start=False`` plus a session expiry makes
the broker keep the subscription and queue QoS 1 commands while the device is briefly
away. The Last Will is a retained ``status`` "offline".
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import threading
from collections.abc import Callable

import aiomqtt
from aiomqtt.client import ProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .config import AgentConfig, TlsConfig
from .errors import ConfigError

__all__ = [
    "CLIENT_TIMEOUT_S",
    "CONNACK_TIMEOUT_S",
    "ConnectionCloser",
    "backoff_delay",
    "close_connection",
    "connack_timeout",
    "make_client",
    "make_ssl_context",
]

# Bound on every broker round trip once connected (SUBACK, PUBACK, DISCONNECT).
CLIENT_TIMEOUT_S = 5.0

# Upper bound on the wait for CONNACK; see connack_timeout().
CONNACK_TIMEOUT_S = 30.0

log = logging.getLogger(__name__)
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
    ctx.sslsocket_class = _ClosingSSLSocket
    return ctx


class _ClosingSSLSocket(ssl.SSLSocket):
    """An SSLSocket that closes itself when its handshake fails.

    paho-mqtt 2.2.0 wraps the TCP socket and calls ``do_handshake()`` in a local
    variable of ``_ssl_wrap_socket``; when the handshake fails (a certificate refused, a
    broker that does not speak TLS, a handshake timeout) the exception propagates and the
    connection is only closed whenever the garbage collector gets to the socket, i.e.
    later, or never while the exception's traceback is kept. No one else can close it.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


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
    """How long to wait for CONNACK once the TCP and TLS handshakes are done.

    Those handshakes are bounded on their own (paho's connect timeout, 5 s per blocking
    socket operation), so a dead or unreachable broker is noticed there, quickly. A
    broker that completed TLS and has not answered CONNECT yet is alive but behind: it
    works through a backlog of CONNECTs, and giving up early only adds to it (the broker
    still processes the abandoned CONNECT, then the retry, a session takeover each
    time). So wait much longer than one round trip, up to the keepalive interval: paho
    itself drops a connection that has received nothing for that long, and the MQTT 5
    keepalive is already this device's "how long can the broker be silent" setting
    (config: at least 5 s, the default 30 s).
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
    """Closes one client's connection when its attempt ends, cancellation included.

    aiomqtt runs paho's blocking connect (TCP, TLS handshake, CONNECT) in an executor
    thread; cancelling ``__aenter__`` does not stop that thread, which then opens a
    connection no one owns. Its socket callbacks (add the reader and writer, start the
    misc task) reach the event loop through ``call_soon_threadsafe``, possibly after the
    cancellation, so closing at once could run before them and leave a reader on a
    closed (or reused) file descriptor. After a cancellation the close is therefore
    queued behind them: by the connect thread when it returns, or, if it already has,
    with ``call_soon``. Create it before entering the client, on the event loop.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        self._client = client
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._returned = False
        self._abandoned = False
        connect = client._client_connect

        def connect_then_check() -> None:
            try:
                connect()
            finally:
                with self._lock:
                    self._returned = True
                    if self._abandoned:
                        self._loop.call_soon_threadsafe(close_connection, client)

        client._client_connect = connect_then_check  # type: ignore[method-assign]

    def close(self, *, cancelled: bool) -> None:
        if not cancelled:
            # The connect thread's callbacks already ran: __aenter__ awaited its result.
            close_connection(self._client)
            return
        with self._lock:
            self._abandoned = True
            if not self._returned:
                return  # the connect thread closes when it returns (if it ever runs)
        self._loop.call_soon(close_connection, self._client)


def make_client(
    config: AgentConfig, tls: ssl.SSLContext, *, will_topic: str, will_payload: bytes
) -> aiomqtt.Client:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = config.broker.session_expiry_s
    return aiomqtt.Client(
        config.broker.host,
        config.broker.port,
        identifier=config.device_id,
        protocol=ProtocolVersion.V5,
        clean_start=False,
        properties=props,
        keepalive=config.broker.keepalive_s,
        tls_context=tls,
        will=aiomqtt.Will(will_topic, will_payload, qos=1, retain=True),
        timeout=CLIENT_TIMEOUT_S,
        logger=_mqtt_log,
        max_queued_incoming_messages=1000,
    )
