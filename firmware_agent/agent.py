"""The device agent: the I/O shell that drives :class:`tillsyn_protocol.DeviceMachine`.

One :class:`asyncio.TaskGroup` with named tasks::

    {id}:timer          waits for machine.next_deadline() and calls machine.tick();
                        needs no network: this is what re-locks at a window's end and
                        ends a look at its cap when the broker is gone
    {id}:mqtt-session   connect (mutual TLS, MQTT 5, persistent session), subscribe to
                        ``cmd``, feed each command to the machine; reconnect with backoff
    {id}:mqtt-publisher drains the outbox (retained state, events, acks) while connected
    {id}:heartbeat      a Heartbeat every ``heartbeat_interval_s`` while connected
    {id}:camera-health  polls the driver; a fault ends any look and blocks new ones
    {id}:cert-renewal   (paired devices) renews the certificate over MQTT (renewal.py)

Every machine input (command, tick, camera fault) runs under one lock together with the
execution of its actions, so the camera is always switched in the order the machine
decided. Actions are executed in order: ``PersistSeq`` reaches the disk before any camera
action; if it cannot, the camera is not switched on and the device locks.

What is produced while offline is reported after reconnecting: the retained state is
republished from the machine's snapshot on every connect, and events and acks wait in a
bounded in-memory outbox (the oldest are dropped first, and counted).

Nothing but the schemas of :mod:`tillsyn_protocol.messages` is ever published.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

import aiomqtt

from tillsyn_protocol import (
    AckOut,
    AckResult,
    Action,
    CameraHealth,
    CameraOff,
    CameraOn,
    Channel,
    Clock,
    DeviceKind,
    DeviceMachine,
    EventKind,
    LockState,
    PersistSeq,
    RefusalReason,
    StateChanged,
    device_topic,
)

from .camera import CameraDriver, build_camera, driver_timeout
from .clock import ClockSource, SystemClock
from .config import AgentConfig
from .errors import AgentError, CameraError, StoreError
from .link import (
    ConnectionCloser,
    SessionFlag,
    TcpOpener,
    backoff_delay,
    connack_timeout,
    make_client,
    make_ssl_context,
    open_tls,
)
from .renewal import Renewer
from .reports import Outbox, Reporter
from .store import SeqStore

__all__ = ["Agent"]

log = logging.getLogger(__name__)

TIMER_POLL_S = 1.0  # while ARMED, re-read the clock at least this often (sync loss, steps)
STOP_TIMEOUT_S = 5.0  # bound on the clean-up when stopping
PUBLISH_TIMEOUT_S = 5.0
RING_TIMEOUT_S = 30.0  # video phone: how long a look rings before "not answered"
_WHY_CHARS = 160
# A resumed session's subscriptions are asked for again this long after the connect,
# jittered: off the reconnect storm's critical path (see _resubscribe_later).
RESUBSCRIBE_AFTER_S = (60.0, 600.0)


class Agent:
    """One device agent. Construct it (which loads and checks its state), then ``run()``.

    An agent runs once: after ``stop()`` make a new one, as a rebooted device would.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        camera: CameraDriver | None = None,
        clock: ClockSource | None = None,
        tcp_opener: TcpOpener | None = None,
    ) -> None:
        self.config = config
        # The simulator (firmware_agent/sim.py) routes the TCP connection through its
        # fault-injecting relay.
        self._open_tcp = tcp_opener
        self._clock: ClockSource = clock or SystemClock(
            require_ntp_sync=config.clock.require_ntp_sync
        )
        self._camera: CameraDriver = camera or build_camera(config)
        self._driver_timeout = driver_timeout(config)
        self._keys = config.command_keyring()
        self._tls = make_ssl_context(config.tls)
        self._store = SeqStore(config.state_dir)
        self._store.remove_stale_temporaries()
        last_seq = self._store.load()  # StoreError: refuse to start (see store.py)
        now = self._clock.now()
        self._start_mono = now.mono
        self._machine = self._new_machine(last_seq, now)
        self.counters: Counter[str] = Counter()
        self._topics = {ch: device_topic(config.device_id, ch) for ch in Channel}
        self._outbox = Outbox(self.counters)
        self._reports = Reporter(
            config=config,
            boot_id=self._store.boot_id,
            clock=self._clock,
            counters=self.counters,
            outbox=self._outbox,
        )
        self._state_dirty = True
        self._camera_health = CameraHealth.OK
        self._camera_look: tuple[str, float, str] | None = None  # (look_id, mono, staff)
        self._client: aiomqtt.Client | None = None
        # This agent's subscriptions are in the broker's session for this device: made
        # (and granted) since the broker last answered a CONNECT without that session.
        self._subscribed = False
        self._resubscribe: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._deadline_changed = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        self._running = False
        # Paired through [enroll]: renew the certificate before it expires (renewal.py).
        self._reconnect_now = False
        self._renewer = Renewer.for_agent(self)
        self._calls: set[asyncio.Task[None]] = set()  # video phone: waiting for an answer

    # --- reading -------------------------------------------------------------------------

    @property
    def machine(self) -> DeviceMachine:
        return self._machine

    @property
    def state(self) -> LockState:
        return self._machine.state

    @property
    def device_id(self) -> str:
        return self.config.device_id

    @property
    def boot_id(self) -> str:
        return self._store.boot_id

    @property
    def camera(self) -> CameraDriver:
        return self._camera

    @property
    def camera_health(self) -> CameraHealth:
        return self._camera_health

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def running(self) -> bool:
        return self._running

    @property
    def mqtt_client(self) -> aiomqtt.Client | None:
        return self._client

    @property
    def renewer(self) -> Renewer | None:
        return self._renewer

    def restart_session(self, tls: ssl.SSLContext) -> None:
        """Reconnect now with ``tls`` (a renewed certificate). A clean DISCONNECT: the
        broker keeps the session and sends no Last Will; the lock state is untouched."""
        self._tls = tls
        self._reconnect_now = True
        client = self._client
        if client is not None:
            client._client.disconnect()  # aiomqtt has no public "reconnect"

    def topic(self, channel: Channel) -> str:
        return self._topics[channel]

    def pending(self) -> list[tuple[Channel, bytes]]:
        """Events and acks waiting to be published (oldest first)."""
        return [(item.channel, item.payload) for item in self._outbox]

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        """Boot LOCKED, then run every task until :meth:`stop`."""
        if self._running or self._stopped.is_set():
            raise AgentError("an Agent runs once; create a new one")
        self._running = True
        cid = self.config.device_id
        log.info(
            "agent %s starting: fw %s, boot %s, last seq %d",
            cid,
            self.config.firmware_version,
            self.boot_id,
            self._machine.last_seq,
        )
        try:
            async with self._lock:  # fail closed before touching any network
                now = self._clock.now()
                await self._execute(self._machine.boot_actions(), now)
            async with asyncio.TaskGroup() as tg:
                timer = tg.create_task(self._timer_loop(), name=f"{cid}:timer")
                session = tg.create_task(self._session_loop(), name=f"{cid}:mqtt-session")
                helpers = [
                    tg.create_task(self._publisher_loop(), name=f"{cid}:mqtt-publisher"),
                    tg.create_task(self._heartbeat_loop(), name=f"{cid}:heartbeat"),
                    tg.create_task(self._health_loop(), name=f"{cid}:camera-health"),
                ]
                if self._renewer is not None:
                    helpers.append(tg.create_task(self._renewer.run(), name=f"{cid}:cert-renewal"))
                await self._stop_requested.wait()
                for task in helpers:
                    task.cancel()
                await asyncio.wait(helpers)
                await self._say_goodbye()
                timer.cancel()
                session.cancel()
        finally:
            for call in list(self._calls):
                call.cancel()
            with contextlib.suppress(Exception):
                await self._camera_off()
            self._client = None
            self._running = False
            self._stopped.set()
            log.info("agent %s stopped", cid)

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop (safe from a signal handler); see :meth:`stop`."""
        self._stop_requested.set()

    async def stop(self, *, grace_s: float = 3 * STOP_TIMEOUT_S) -> None:
        """Lock the camera, say goodbye to the broker (bounded) and end :meth:`run`."""
        self._stop_requested.set()
        if not self._running:
            return
        try:
            async with asyncio.timeout(grace_s):
                await self._stopped.wait()
        except TimeoutError:
            raise AgentError(f"agent did not stop within {grace_s:g} s") from None

    # --- inputs --------------------------------------------------------------------------

    async def handle_command(self, payload: bytes) -> None:
        """Verify and apply one command token, exactly as if it arrived on ``cmd``."""
        self.counters["received"] += 1
        async with self._lock:
            now = self._clock.now()
            # Local timers first and on their own: their actions then run even if
            # something below fails.
            await self._execute(self._machine.tick(now), now)
            try:
                actions = self._machine.handle(payload, now)
            except Exception as exc:  # a bug below must cost one command, never the agent
                self.counters["internal_error"] += 1
                log.error("command dropped: %s in the state machine", type(exc).__name__)
                state = self._machine.state
                actions = [
                    AckOut(None, None, None, AckResult.REFUSED, state, RefusalReason.MALFORMED)
                ]
            await self._execute(actions, now)
        self._deadline_changed.set()

    async def tick(self) -> None:
        """Apply the local timers now (the timer task does this on its own)."""
        async with self._lock:
            now = self._clock.now()
            await self._execute(self._machine.tick(now), now)
        self._deadline_changed.set()

    # --- executing actions ---------------------------------------------------------------

    async def _execute(
        self, actions: Sequence[Action], now: Clock, *, in_fault: bool = False
    ) -> None:
        """Carry out the machine's actions in order. Caller holds ``self._lock``."""
        camera_failed = False
        for index, action in enumerate(actions):
            match action:
                case PersistSeq(seq=seq):
                    try:
                        await asyncio.to_thread(self._store.save, seq)
                    except StoreError as exc:
                        await self._store_failed(exc, now, actions[index + 1 :])
                        return
                case CameraOn(look_id=look_id, staff=staff):
                    if await self._drive("look-start", lambda: self._camera.look_start(look_id)):
                        self._camera_look = (look_id, now.mono, staff)
                        self._reports.event(
                            EventKind.LOOK_STARTED, LockState.VIEWING, look_id=look_id, staff=staff
                        )
                        self._watch_call(look_id, staff, now)
                    else:
                        camera_failed = True
                case CameraOff(look_id=None):
                    camera_failed |= not await self._drive("lock", self._camera.lock)
                case CameraOff(reason=reason, look_id=str(look_id), duration_s=d, staff=staff):
                    camera_failed |= not await self._drive(
                        "look-end", lambda: self._camera.look_end(look_id)
                    )
                    self._camera_look = None
                    self._reports.event(
                        EventKind.LOOK_ENDED,
                        self._machine.state,
                        look_id=look_id,
                        staff=staff,
                        reason=reason,
                        duration_s=d,
                    )
                case StateChanged(old=old, new=new, reason=reason):
                    if old is not None and new is LockState.LOCKED:
                        camera_failed |= not await self._drive("lock", self._camera.lock)
                    elif old is LockState.LOCKED and new is LockState.ARMED:
                        camera_failed |= not await self._drive("unlock", self._camera.unlock)
                    self._state_dirty = True
                    kind = EventKind.BOOT if old is None else EventKind.STATE_CHANGED
                    self._reports.event(kind, new, reason=reason)
                    log.info("state %s -> %s (%s)", old and old.value, new.value, reason)
                case AckOut():
                    if action.result is AckResult.APPLIED:
                        # Its seq, and an arm's end, are in the retained state even when
                        # the state itself did not change (an arm extending an armed one).
                        self._state_dirty = True
                    self._reports.ack(action)
        if camera_failed and not in_fault:
            await self._camera_failed()

    async def _drive(self, op: str, call: Callable[[], Awaitable[None]]) -> bool:
        """One bounded driver call; a failure is logged and reported as False."""
        try:
            async with asyncio.timeout(self._driver_timeout):
                await call()
        except CameraError as exc:
            why = exc.why
        except TimeoutError:
            why = f"no answer within {self._driver_timeout:g} s"
        except Exception as exc:  # a broken driver is a camera fault, not an agent crash
            why = type(exc).__name__
        else:
            return True
        self.counters["camera_errors"] += 1
        off = op in {"lock", "look-end"}
        log.error(
            "camera %s failed: %s%s",
            op,
            why[:_WHY_CHARS],
            " (the camera may still be on)" if off else "",
        )
        return False

    def _watch_call(self, look_id: str, staff: str, now: Clock) -> None:
        """Video phone: the look rang the resident; report whether they answered."""
        waiter = getattr(self._camera, "call_answered", None)
        if self.config.kind is not DeviceKind.VIDEO_PHONE or waiter is None:
            return
        view_until = self._machine.snapshot().view_until or now.wall
        within = min(RING_TIMEOUT_S, max(0.5, view_until - now.wall))

        async def watch() -> None:
            try:
                async with asyncio.timeout(within + self._driver_timeout):
                    answered = bool(await waiter(look_id, within))
            except Exception:  # a broken driver: the call did not connect
                answered = False
            kind = EventKind.CALL_ANSWERED if answered else EventKind.CALL_NOT_ANSWERED
            self._reports.event(kind, self._machine.state, look_id=look_id, staff=staff)
            log.info("call for look %s %s", look_id, "answered" if answered else "not answered")

        task = asyncio.create_task(watch(), name=f"{self.device_id}:call-{look_id}")
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _camera_failed(self) -> None:
        """A driver call failed: treat it as a camera fault (ends any look, blocks new)."""
        now = self._clock.now()
        if self._camera_health is CameraHealth.OK:
            self._camera_health = CameraHealth.FAULT
            self.counters["camera_fault"] += 1
            self._reports.event(EventKind.CAMERA_FAULT, self._machine.state, reason="driver_error")
        await self._execute(self._machine.camera_fault(now), now, in_fault=True)

    async def _store_failed(self, exc: StoreError, now: Clock, rest: Sequence[Action]) -> None:
        """The seq could not be persisted: skip the camera actions, lock, report."""
        self.counters["store_failed"] += 1
        log.error("cannot persist the command sequence (%s): locking", exc.why[:_WHY_CHARS])
        await self._force_lock(now, "store_failed")
        for action in rest:
            if isinstance(action, AckOut):
                refused = dataclasses.replace(
                    action,
                    result=AckResult.REFUSED,
                    state=LockState.LOCKED,
                    reason=RefusalReason.STORE_FAILED,
                )
                self._reports.ack(refused, why="store_failed")

    async def _force_lock(self, now: Clock, reason: str) -> None:
        """Lock outside the token rules: camera off, the machine LOCKED (keeping its seq)."""
        old = self._machine.state
        if self._camera_look is not None:
            look_id, started, staff = self._camera_look
            await self._drive("look-end", lambda: self._camera.look_end(look_id))
            self._camera_look = None
            self._reports.event(
                EventKind.LOOK_ENDED,
                LockState.LOCKED,
                look_id=look_id,
                staff=staff,
                reason=reason,
                duration_s=round(max(0.0, now.mono - started), 3),
            )
        await self._drive("lock", self._camera.lock)
        # The machine's own actions are not executed: the camera is already handled above.
        self._machine.lock(now, reason)
        if old is not LockState.LOCKED:
            self._state_dirty = True
            self._reports.event(EventKind.STATE_CHANGED, LockState.LOCKED, reason=reason)
            log.warning("state %s -> LOCKED (%s)", old.value, reason)
        self._deadline_changed.set()

    async def _camera_off(self) -> None:
        """Whatever happens next, the camera is off (used when the agent ends)."""
        if self._camera_look is not None:
            look_id = self._camera_look[0]
            await self._drive("look-end", lambda: self._camera.look_end(look_id))
            self._camera_look = None
        await self._drive("lock", self._camera.lock)

    def _new_machine(self, last_seq: int, now: Clock) -> DeviceMachine:
        return DeviceMachine(
            device_id=self.config.device_id,
            keys=self._keys,
            last_seq=last_seq,
            now=now,
            look_cap_s=self.config.look_cap_s,
        )

    # --- tasks ---------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            self._deadline_changed.clear()
            deadline = self._machine.next_deadline()
            if deadline is None:
                await self._deadline_changed.wait()
                continue
            delay = min(deadline - self._clock.now().mono, TIMER_POLL_S)
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._deadline_changed.wait()
            async with self._lock:
                now = self._clock.now()
                actions = self._machine.tick(now)
                await self._execute(actions, now)
            if not actions and delay <= 0:
                await asyncio.sleep(0.01)  # never spin, whatever the clock does

    async def _session_loop(self) -> None:
        attempt = 0
        broker = self.config.broker
        while True:
            client = make_client(
                self.config,
                self._tls,
                will_topic=self._topics[Channel.STATUS],
                will_payload=self._reports.status("offline"),
            )
            closer = ConnectionCloser(client)
            session = SessionFlag(client)
            connected = False
            # The session set-up (TLS handshake, CONNACK, then the SUBACK and the PUBACK of
            # "online") gets its own, longer bound (see link.connack_timeout): a broker that
            # has just restarted answers each of them late, and giving up on the SUBACK throws
            # away a handshake it has already paid for. Later round trips keep the client's.
            round_trip_timeout = client.timeout
            setup_timeout = connack_timeout(broker.keepalive_s)
            client.timeout = setup_timeout
            try:
                conn = await open_tls(
                    self._tls, broker.host, broker.port, limit_s=setup_timeout, tcp=self._open_tcp
                )
                closer.adopt(conn)
                async with client:
                    connected, attempt = True, 0
                    await self._on_connect(client, setup_timeout, resumed=session.present)
                    client.timeout = round_trip_timeout
                    async for message in client.messages:
                        await self._on_message(message)
                why = "connection closed"
            except (aiomqtt.MqttError, OSError) as exc:  # OSError: TCP or TLS (open_tls)
                if _being_cancelled():
                    # aiomqtt's __aexit__ waits (bounded) for its DISCONNECT to go out and
                    # raises its own "timed out" in place of the cancellation: swallowed,
                    # this loop would reconnect and the agent never stop.
                    raise asyncio.CancelledError from exc
                why = str(exc) or type(exc).__name__
            finally:
                self._client = None
                if self._resubscribe is not None:
                    self._resubscribe.cancel()
                    self._resubscribe = None
                # Whatever ended this attempt (no CONNACK in time, a refused CONNACK, a TLS
                # or socket error, a lost connection, cancellation), its connection is closed
                # before the next attempt: aiomqtt leaves it open in some of these cases, and
                # a connection left behind completes later as a session takeover.
                closer.close()
            self.counters["disconnects" if connected else "connect_failures"] += 1
            delay = backoff_delay(attempt, broker.reconnect_min_s, broker.reconnect_max_s)
            if self._reconnect_now:  # a planned reconnect (new certificate): no backoff
                self._reconnect_now, delay, attempt = False, 0.0, -1
            attempt += 1
            log.warning(
                "mqtt %s %s:%d: %s; retrying in %.1f s",
                "connection lost to" if connected else "cannot connect to",
                broker.host,
                broker.port,
                why[:_WHY_CHARS],
                delay,
            )
            await asyncio.sleep(delay)

    async def _on_connect(
        self, client: aiomqtt.Client, setup_timeout: float, *, resumed: bool
    ) -> None:
        # A resumed session still holds the subscriptions this agent made in it: asking
        # again costs a round trip per device, 10,000 of them after a broker restart.
        subscribe = not (resumed and self._subscribed)
        if subscribe:
            self._subscribed = False
            if not await self._subscribe_cmd(client, setup_timeout):
                raise aiomqtt.MqttError("broker refused the subscription to cmd")
        else:
            self.counters["sessions_resumed"] += 1
            self._resubscribe = asyncio.create_task(
                self._resubscribe_later(client), name=f"{self.config.device_id}:resubscribe"
            )
        await client.publish(
            self._topics[Channel.STATUS],
            self._reports.status("online"),
            qos=1,
            retain=True,
            timeout=setup_timeout,
        )
        self._client = client
        self._state_dirty = True
        self._outbox.ready.set()
        self.counters["connects"] += 1
        if self._renewer is not None:
            await self._renewer.on_connect(client, subscribe=subscribe)
        self._subscribed = True
        log.info("connected to %s:%d", self.config.broker.host, self.config.broker.port)

    async def _subscribe_cmd(self, client: aiomqtt.Client, limit_s: float | None) -> bool:
        """Subscribe to this device's commands (QoS 1); whether the broker granted it."""
        granted = await client.subscribe(self._topics[Channel.CMD], qos=1, timeout=limit_s)
        return all(_granted(code) for code in granted)

    async def _resubscribe_later(self, client: aiomqtt.Client) -> None:
        """Ask a resumed session for its subscriptions again, once a storm is likely over.

        Belt and braces: a broker that crashed can restore a session saved between the
        CONNACK and the SUBACK that created it (a Mosquitto autosave in that window), so
        "session present" without the subscription is possible, if unlikely; without
        this the device would never see a command again. MQTT 5 replaces an identical
        subscription without losing messages.
        """
        await asyncio.sleep(random.uniform(*RESUBSCRIBE_AFTER_S))
        try:
            granted = await self._subscribe_cmd(client, None)
            if self._renewer is not None:
                await self._renewer.subscribe(client)
        except aiomqtt.MqttError as exc:  # the session loop sees the connection's end
            log.debug("resubscribe failed: %s", str(exc)[:_WHY_CHARS])
            return
        if granted:
            self.counters["resubscribed"] += 1
        else:
            self.counters["resubscribe_refused"] += 1
            log.warning("broker refused the subscription to cmd on a resumed session")

    async def _on_message(self, message: aiomqtt.Message) -> None:
        if self._stop_requested.is_set():
            # Stopping: the camera is being locked for good; the fleet's reconciliation
            # re-sends whatever this device does not report as applied.
            self.counters["ignored_stopping"] += 1
            return
        if self._renewer is not None and self._renewer.owns(message.topic.value):
            await self._renewer.on_message(bytes(message.payload))
            return
        if message.topic.value != self._topics[Channel.CMD]:
            self.counters["unexpected_topic"] += 1
            return
        await self.handle_command(bytes(message.payload))

    async def _publisher_loop(self) -> None:
        while True:
            await self._outbox.ready.wait()
            self._outbox.ready.clear()
            client = self._client
            if client is None:
                continue  # _on_connect sets the event again
            try:
                await self._flush(client)
            except aiomqtt.MqttError as exc:
                log.debug("publish failed: %s", str(exc)[:_WHY_CHARS])
                await asyncio.sleep(0.5)
                self._outbox.ready.set()

    async def _flush(self, client: aiomqtt.Client) -> None:
        """Publish the retained state if it changed, then the outbox, oldest first.

        The state goes before any event queued after it changed, so the fleet never sees
        an event about a state the retained ``state`` does not show yet.
        """
        while True:
            if self._state_dirty:
                self._state_dirty = False
                try:
                    await client.publish(
                        self._topics[Channel.STATE],
                        self._reports.state(self._machine.snapshot()),
                        qos=1,
                        retain=True,
                        timeout=PUBLISH_TIMEOUT_S,
                    )
                except BaseException:
                    self._state_dirty = True
                    raise
            if not self._outbox or self._client is not client:
                return
            item = self._outbox.take()
            try:
                await client.publish(
                    self._topics[item.channel],
                    item.payload,
                    qos=item.qos,
                    timeout=PUBLISH_TIMEOUT_S,
                )
            except BaseException:
                self._outbox.put_back(item)
                raise

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            client = self._client
            if client is None:
                continue
            try:
                await client.publish(
                    self._topics[Channel.HB],
                    self._reports.heartbeat(
                        state=self._machine.state,
                        camera=self._camera_health,
                        start_mono=self._start_mono,
                    ),
                    qos=0,
                )
            except aiomqtt.MqttError as exc:
                log.debug("heartbeat not sent: %s", str(exc)[:_WHY_CHARS])

    async def _health_loop(self) -> None:
        while True:
            health = await self._read_health()
            if health is not self._camera_health:
                await self._health_changed(health)
            await asyncio.sleep(self.config.camera.health_interval_s)

    async def _read_health(self) -> CameraHealth:
        try:
            async with asyncio.timeout(self._driver_timeout):
                return await self._camera.health()
        except Exception as exc:  # an unanswerable camera is a faulty one
            log.warning("camera health unknown: %s", type(exc).__name__)
            return CameraHealth.FAULT

    async def _health_changed(self, health: CameraHealth) -> None:
        async with self._lock:
            if health is self._camera_health:
                return
            now = self._clock.now()
            self._camera_health = health
            if health is CameraHealth.OK:
                self._machine.camera_restored()
                self._reports.event(EventKind.CAMERA_RESTORED, self._machine.state)
                log.info("camera restored")
            else:
                self.counters["camera_fault"] += 1
                self._reports.event(
                    EventKind.CAMERA_FAULT, self._machine.state, reason=health.value
                )
                log.warning("camera %s", health.value)
                await self._execute(self._machine.camera_fault(now), now, in_fault=True)
        self._deadline_changed.set()

    async def _say_goodbye(self) -> None:
        """Bounded clean stop: lock, report it, publish ``offline`` while still connected."""
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                async with self._lock:
                    await self._force_lock(self._clock.now(), "shutdown")
                client = self._client
                if client is not None:
                    await self._flush(client)
                    await client.publish(
                        self._topics[Channel.STATUS],
                        self._reports.status("offline"),
                        qos=1,
                        retain=True,
                        timeout=PUBLISH_TIMEOUT_S,
                    )
        except (TimeoutError, aiomqtt.MqttError) as exc:
            log.warning("clean stop incomplete: %s", str(exc)[:_WHY_CHARS] or "timed out")


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _granted(code: object) -> bool:
    """Whether one SUBACK entry (MQTT 5 reason code or 3.1.1 granted QoS) is a success."""
    if isinstance(code, int):
        return code < 0x80
    return not bool(getattr(code, "is_failure", True))
