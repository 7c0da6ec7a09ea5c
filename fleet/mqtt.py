"""The fleet's MQTT link: paho-mqtt in its own network thread, feeding asyncio in batches.

Why not aiomqtt: it runs paho inside the event loop and pays per message for an asyncio
queue hop, a Message copy, paho's topic matcher and a write (plus two wake-up syscalls)
per PUBACK; that was about 70 % of the service's time at ingest load (docs/performance.md,
"Ingest ceiling"). Here one thread drives paho with its own ``select`` loop: it reads
every packet that is ready, then writes all pending PUBACKs at once, and hands messages
to the event loop as a batch (one wake-up per batch, not per message). The per-message
dispatch is ours: the subscriptions are per channel and the consumer routes by parsing
the topic, so paho's matcher and callback lock are skipped (:class:`_Client`).

One persistent MQTT 5 session over mutual TLS, reconnecting with jittered exponential
backoff; publishing is best effort while disconnected (the command ledger re-sends what
was not acknowledged). :class:`NetworkThread` is also what ``bench/_bare_subscriber.py``
runs, so the ingest benchmark compares the fleet with the same client used the same way.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from tillsyn_protocol import Channel, paho_tables, subscription

from .config import FleetSettings
from .metrics import FleetMetrics
from .outbound import Publish

log = logging.getLogger(__name__)
paho_tables.install()  # paho's Properties share their tables (6.8 % of a storm's CPU)

INGEST_CHANNELS = (Channel.STATUS, Channel.STATE, Channel.ACK, Channel.EVENT, Channel.HB)
SESSION_EXPIRY_S = 3600
KEEPALIVE_S = 30
CONNECT_TIMEOUT_S = 10.0
PUBLISH_TIMEOUT_S = 10.0
# Reading stops while this many messages wait for the event loop: TCP back-pressure
# then holds the rest at the broker instead of this process's memory growing.
INBOX_LIMIT = 20_000
BATCH_MAX = 1000  # messages per call into the consumer (keeps the loop responsive)
READ_AHEAD = 64 * 1024  # bytes asked of the socket per read (a TLS read returns one record)

# (topic, payload, received at): the time is read by the network thread as the message
# arrives, on the service's clock. A device's message is *received* then, whatever the
# event loop's and the database thread's queues add: an ack's time, a heartbeat's, a Last
# Will's are the device's, not the fleet's backlog's (a window start's 30,000 messages
# waited seconds for the loop).
Inbound = tuple[str, bytes, float]


def client_tls_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class LinkDown(Exception):
    """The session ended (refused, lost, timed out): reconnect after a backoff."""


class _Client(paho.Client):
    """paho's client with its per-message dispatch cut down to one call.

    paho looks every message up in its topic matcher (for ``message_callback_add``) under
    a lock before ``on_message``; we register no such callbacks, so that work is waste.
    ``_handle_on_message`` is private API of the pinned paho-mqtt 2.2.0; the integration
    tests (and the benchmark) fail loudly if an upgrade changes it.
    """

    sink: Callable[[str, bytes], None]
    received = 0
    # Read ahead of paho's parser: paho asks the socket for a packet's first byte, its
    # length bytes and its body separately, and every TLS read releases the GIL. With the
    # database thread busy, each reacquisition waits out the switch interval (5 ms), so
    # reads per packet capped ingest at a few hundred messages per second exactly when
    # the fleet was busiest (docs/performance.md, "Offline detection"). One read takes a
    # whole TLS record (up to 16 KB, about a hundred heartbeats) instead.
    _ahead: bytes = b""
    _at = 0

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._at >= len(self._ahead):
            data = super()._sock_recv(READ_AHEAD)  # BlockingIOError: nothing there
            if not data:
                return data  # closed by the broker
            self._ahead, self._at = data, 0
        start = self._at
        self._at = min(start + bufsize, len(self._ahead))
        return self._ahead[start : self._at]

    def buffered(self) -> int:
        """Bytes read from the socket that paho has not parsed yet."""
        return len(self._ahead) - self._at

    def bytes_waiting(self) -> None:
        """The broker is sending (bytes wait in the socket) while we do not read: paho's
        keepalive must count that as traffic, or a consumer paused for two keepalive
        intervals would drop a healthy connection (private paho 2.2.0 state, as above)."""
        with self._msgtime_mutex:
            self._last_bytes_received = time.monotonic()

    def _handle_on_message(self, message: paho.MQTTMessage) -> None:
        self.received += 1
        try:
            topic = message.topic
        except UnicodeDecodeError:  # a broker never forwards one; nothing to route
            return
        self.sink(topic, bytes(message.payload))  # (bytes already: no copy)


@dataclass(frozen=True, slots=True)
class LinkConfig:
    host: str
    port: int
    client_id: str
    tls: ssl.SSLContext
    subscriptions: tuple[str, ...]
    # Persistent session (clean_start=False, expiry below) or a fresh one per connection.
    persistent: bool = True
    session_expiry_s: int = SESSION_EXPIRY_S
    keepalive_s: int = KEEPALIVE_S


@dataclass(slots=True)
class _Out:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    expiry_s: int | None
    done: Callable[[bool], None]


def _noop(*_: Any) -> None:
    return None


class NetworkThread:
    """One paho client, driven by our own select loop in a dedicated daemon thread.

    ``on_message(topic, payload)`` and ``on_state(up)`` are called in that thread: they must
    be cheap and must not raise. ``publish`` may be called from any thread. ``paused()``
    (optional) stops reading while the consumer is behind.
    """

    def __init__(
        self,
        config: LinkConfig,
        *,
        on_message: Callable[[str, bytes], None],
        on_state: Callable[[bool], None] = _noop,
        paused: Callable[[], bool] = lambda: False,
    ) -> None:
        self.config = config
        self._on_message = on_message
        self._on_state = on_state
        self._paused = paused
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._outbox: collections.deque[_Out] = collections.deque()
        self._pending: dict[int, Callable[[bool], None]] = {}
        self._thread = threading.Thread(target=self._run, name="mqtt-net", daemon=True)
        self.up = False  # connected and subscribed
        # Monotonic time since when data has waited unread (None: caught up). Silence is
        # judged only up to this moment: the fleet's own lag must never read as a device's.
        self._behind_since: float | None = None

    def lag(self) -> float:
        """Seconds the oldest unread message may have waited; 0 when caught up or down."""
        since = self._behind_since
        return 0.0 if since is None or not self.up else max(0.0, time.monotonic() - since)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (the persistent session stays) and end the thread."""
        self._stop.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._wake_r.close()
        self._wake_w.close()

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool = False,
        expiry_s: int | None = None,
        done: Callable[[bool], None] = _noop,
    ) -> None:
        """Queue a publish; ``done(ok)`` is called (in the network thread) on the broker's
        PUBACK, at once for QoS 0, or with False if the link is down or goes down first."""
        self.publish_many([_Out(topic, payload, qos, retain, expiry_s, done)])

    def publish_many(self, items: list[_Out]) -> None:
        """Queue several publishes, one wake-up of the thread for all of them (each wake-up
        is a system call, and a release of the GIL the caller may wait milliseconds to get
        back while the other threads run: 10,000 of them at a window start)."""
        if not self.up:
            for out in items:
                out.done(False)
            return
        self._outbox.extend(items)
        self._wake()

    def _wake(self) -> None:
        # BlockingIOError: already woken; OSError: closed while stopping.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # --- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                self._session()
            except (LinkDown, OSError) as exc:  # ssl.SSLError is an OSError
                log.warning("broker connection lost: %s; retrying", str(exc)[:200])
            if self.up:
                backoff = 0.5  # it worked for a while: start the backoff again
            self._set_up(False)
            self._fail_pending()
            # Full jitter: a fleet of replicas never reconnects in lockstep.
            if self._stop.wait(random.uniform(0, backoff)):
                break
            backoff = min(backoff * 2, 30.0)

    def _set_up(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            self._on_state(up)

    def _fail_pending(self) -> None:
        pending, self._pending = list(self._pending.values()), {}
        while self._outbox:
            pending.append(self._outbox.popleft().done)
        for done in pending:
            done(False)

    def _session(self) -> None:
        cfg = self.config
        self._fail_pending()  # anything queued while the link was down: the ledger resends
        self._behind_since = None  # a new connection: nothing unread yet
        client = _Client(CallbackAPIVersion.VERSION2, client_id=cfg.client_id, protocol=paho.MQTTv5)
        client.sink = self._on_message
        client.tls_set_context(cfg.tls)
        # Writes are ours to schedule: queued packets (PUBACKs above all) go out together
        # once per loop pass instead of one TLS record and syscall each.
        client.on_socket_register_write = _noop
        refused: list[str] = []
        client.on_connect = lambda c, _u, _f, rc, _p: self._connected(c, rc, refused)
        client.on_subscribe = lambda _c, _u, _m, rcs, _p: self._subscribed(rcs, refused)
        client.on_publish = self._published
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = cfg.session_expiry_s if cfg.persistent else 0
        client.connect(
            cfg.host,
            cfg.port,
            keepalive=cfg.keepalive_s,
            clean_start=not cfg.persistent,  # persistent: keep queued acks across a restart
            properties=props,
        )
        # paho's own wake-up pipe costs a syscall per queued packet; we have ours.
        client._reset_sockets(sockpair_only=True)
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        try:
            self._loop(client, refused, deadline)
        finally:
            if client.socket() is not None:
                with contextlib.suppress(OSError):
                    client.disconnect()
                    client.loop_write()  # sends DISCONNECT (no Last Will), closes the socket

    def _connected(self, client: paho.Client, rc: Any, refused: list[str]) -> None:
        if rc.is_failure:
            refused.append(f"CONNACK {rc}")
            return
        opts = SubscribeOptions(qos=1)
        client.subscribe([(f, opts) for f in self.config.subscriptions])

    def _subscribed(self, codes: list[Any], refused: list[str]) -> None:
        bad = [str(rc) for rc in codes if rc.is_failure]
        if bad:
            refused.append(f"SUBACK {','.join(bad)}")
        else:
            self._set_up(True)

    def _published(self, _c: paho.Client, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        done = self._pending.pop(mid, None)
        if done is not None:
            done(not rc.is_failure)

    def _loop(self, client: _Client, refused: list[str], deadline: float) -> None:
        sock = client.socket()
        while not self._stop.is_set():
            if refused:
                raise LinkDown(refused[0])
            if not self.up and time.monotonic() > deadline:
                raise LinkDown("no CONNACK/SUBACK in time")
            if sock is None or client.socket() is not sock:
                raise LinkDown("connection closed")
            self._send_outbox(client)
            reading = not self._paused()
            pending = reading and _unread(client, sock)
            rlist: list[Any] = [self._wake_r, sock] if reading else [self._wake_r]
            wlist: list[Any] = [sock] if client.want_write() else []
            timeout = 0.0 if pending else 1.0 if reading else 0.05  # paused: poll the backlog
            ready, _, _ = select.select(rlist, wlist, [], timeout)
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
            if pending or sock in ready:
                self._behind()
                if self._read(client, sock):
                    self._behind_since = None
            elif reading:
                self._behind_since = None  # nothing was waiting
            else:  # paused: what the broker sends waits in the socket
                self._behind()
                if _readable(sock):
                    client.bytes_waiting()
            if client.want_write():
                _check(client.loop_write(), "write")
            _check(client.loop_misc(), "keepalive")

    def _behind(self) -> None:
        if self._behind_since is None:
            self._behind_since = time.monotonic()

    def _read(self, client: _Client, sock: Any) -> bool:
        """Read every packet that is ready (one select for many messages); True if nothing
        is left. Stopping early is harmless: select (kernel), ``pending()`` (TLS buffer)
        and our read-ahead see what is left."""
        for _ in range(BATCH_MAX):
            before = client.received
            _check(client.loop_read(), "read")
            if client.received == before and not _unread(client, sock):
                # (A PUBACK or PINGRESP counts no message: the kernel may hold more.)
                return not _readable(sock)
        return False

    def _send_outbox(self, client: _Client) -> None:
        while self._outbox:
            out = self._outbox.popleft()
            props = None if out.expiry_s is None else _expiry_properties(out.expiry_s)
            info = client.publish(
                out.topic, out.payload, qos=out.qos, retain=out.retain, properties=props
            )
            if info.rc != paho.MQTT_ERR_SUCCESS:
                out.done(False)
            elif out.qos == 0:
                out.done(True)
            else:
                self._pending[info.mid] = out.done


@functools.lru_cache(maxsize=256)
def _expiry_properties(expiry_s: int) -> Properties:
    """The PUBLISH properties for a message expiry, made once per value: paho only reads
    them to pack the packet, and setting one through ``Properties.__setattr__`` scans its
    tables (a window storm's 10,000 arms share a handful of expiries)."""
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = expiry_s
    return props


def _readable(sock: Any) -> bool:
    """The kernel holds data for this socket (a poll, no wait)."""
    return bool(select.select([sock], [], [], 0)[0])


def _unread(client: _Client, sock: Any) -> bool:
    """Data already read that select cannot see: ours (read ahead) or the TLS layer's."""
    return client.buffered() > 0 or (isinstance(sock, ssl.SSLSocket) and sock.pending() > 0)


def _check(rc: MQTTErrorCode, what: str) -> None:
    if rc != paho.MQTT_ERR_SUCCESS:
        raise LinkDown(f"{what}: {paho.error_string(rc)}")


class MqttLink:
    """The event loop's side: batches in, publishes out, connection state for /readyz."""

    def __init__(
        self,
        settings: FleetSettings,
        metrics: FleetMetrics,
        on_messages: Callable[[list[Inbound]], Awaitable[None]],
        on_connect: Callable[[], Awaitable[None]] | None = None,
        *,
        fast: Callable[[str, bytes], bool] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._metrics = metrics
        self._on_messages = on_messages
        self._on_connect = on_connect
        # Run in the network thread; True: handled there, the event loop never sees it.
        self._fast = fast
        self._net: NetworkThread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: collections.deque[Inbound] = collections.deque()
        self._wake = asyncio.Event()
        self._wake_pending = False
        self._resync = False
        self.connected = asyncio.Event()

    def _config(self) -> LinkConfig:
        s = self._settings
        group = s.shared_group
        return LinkConfig(
            host=s.broker_host,
            port=s.broker_port,
            client_id=s.client_id(),
            tls=client_tls_context(str(s.ca_file), str(s.cert_file), str(s.key_file)),
            subscriptions=tuple(subscription(c, shared_group=group) for c in INGEST_CHANNELS),
            persistent=s.persistent_session(),
        )

    # Called in the network thread.
    def _inbound(self, topic: str, payload: bytes) -> None:
        if self._fast is not None:
            try:
                if self._fast(topic, payload):
                    return
            except Exception:  # a bug there must not cost the connection: the loop decides
                log.exception("ingest fast path failed; handing the message to the loop")
        self._inbox.append((topic, payload, self._clock()))
        if not self._wake_pending:
            self._wake_pending = True
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop closed while the thread stopped
                self._loop.call_soon_threadsafe(self._wake.set)

    def _backlogged(self) -> bool:
        return len(self._inbox) > INBOX_LIMIT

    def _state(self, up: bool) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed while the thread stopped
            self._loop.call_soon_threadsafe(self._state_changed, up)

    # On the event loop.
    def _state_changed(self, up: bool) -> None:
        self._metrics.mqtt_connected.set(1 if up else 0)
        if up:
            self._metrics.mqtt_connects.inc()
            s = self._settings
            log.info("connected to broker %s:%s as %s", s.broker_host, s.broker_port, s.client_id())
            self.connected.set()
            self._resync = True
            self._wake.set()
        else:
            self.connected.clear()

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        net = self._net = NetworkThread(
            self._config(), on_message=self._inbound, on_state=self._state, paused=self._backlogged
        )
        net.start()
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                self._wake_pending = False  # before draining: a later message wakes us again
                if self._resync and self._on_connect is not None:
                    # A (re)connection: resync first, as before any of its messages.
                    self._resync = False
                    await self._on_connect()
                inbox = self._inbox
                while inbox:
                    batch = [inbox.popleft() for _ in range(min(len(inbox), BATCH_MAX))]
                    await self._on_messages(batch)
        finally:
            self._net = None
            self.connected.clear()
            self._metrics.mqtt_connected.set(0)
            await asyncio.to_thread(net.stop)

    def lag(self) -> float:
        """Seconds the fleet's reading is behind the broker (0: caught up, or no link)."""
        net = self._net
        return net.lag() if net is not None else 0.0

    async def publish(self, items: Iterable[Publish]) -> int:
        """Send what can be sent now; returns how many the broker acknowledged (in order)."""
        net, loop = self._net, self._loop
        if net is None or loop is None or not net.up:
            return 0
        batch = list(items)
        if not batch:
            return 0
        tally = _Tally(loop, len(batch))
        net.publish_many(
            [
                _Out(
                    p.topic,
                    p.payload,
                    p.qos,
                    p.retain,
                    p.expiry_s,
                    functools.partial(tally.done, i),
                )
                for i, p in enumerate(batch)
            ]
        )
        # Until all are acknowledged or one failed; given up after PUBLISH_TIMEOUT_S in
        # which not one more was acknowledged.
        seen = -1
        while not tally.future.done() and tally.settled != seen:
            seen = tally.settled
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(tally.future), PUBLISH_TIMEOUT_S)
        sent = tally.acknowledged()
        if sent < len(batch):
            log.warning("publish not acknowledged by the broker")
        return sent


class _Tally:
    """The broker's acknowledgements of one :meth:`MqttLink.publish` call, counted in the
    network thread; the event loop is woken once, when all are in or one has failed (one
    future and one loop wake-up per message cost more than the rest of publishing)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int) -> None:
        self._loop = loop
        self.ok: list[bool | None] = [None] * n
        self.settled = 0
        self.future: asyncio.Future[None] = loop.create_future()
        self._fired = False

    def done(self, index: int, ok: bool) -> None:
        """Called by one thread at a time: the network thread, or the caller's when the link
        is down before anything was queued."""
        self.ok[index] = ok
        self.settled += 1
        if (not ok or self.settled == len(self.ok)) and not self._fired:
            self._fired = True
            self._loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if not self.future.done():
            self.future.set_result(None)

    def acknowledged(self) -> int:
        """How many were acknowledged, in order, before the first that was not."""
        n = 0
        for ok in self.ok:
            if not ok:
                break
            n += 1
        return n
