"""Device messages in: parsed strictly, heartbeats kept in memory, the rest to the database.

Untrusted input never raises out of here: a bad message is one log line and a counter.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from tillsyn_protocol import (
    Ack,
    Channel,
    Event,
    EventKind,
    Heartbeat,
    MessageError,
    StateReport,
    Status,
    TopicError,
    decode,
    parse_device_topic,
)
from tillsyn_protocol.topics import DEVICE_ROOT

from .batch import Applied, Inbound, InboundMessage, InboundQueue, Submit
from .core import FleetOps
from .errors import NotFound
from .liveness import Liveness
from .metrics import FleetMetrics
from .outbound import Publish

log = logging.getLogger(__name__)

_DEVICE_PREFIX = DEVICE_ROOT + "/"
# Events the database has nothing to do with (their state is in the retained state
# report): from a device that is online they are counted and dropped here. At a window
# start they were a third of the storm's device messages.
_NOTHING_TO_APPLY = frozenset({EventKind.BOOT, EventKind.STATE_CHANGED})
_CHANNELS = {c.value: c for c in Channel}
_HB_SUFFIX = "/" + Channel.HB.value

T = TypeVar("T")


class RunDb(Protocol):
    async def __call__(self, fn: Callable[..., T], /, *args: Any) -> T: ...


class KnownDevices:
    """The registered device ids, each string kept once. An id sliced from a topic is
    replaced by the stored one, so what outlives the message (liveness's online and
    dirty sets, queued device messages) holds one string per device, not a new copy per
    heartbeat: about 0.1 KB per connected device at 10,000."""

    def __init__(self) -> None:
        self._ids: dict[str, str] = {}

    def add(self, device_id: str) -> None:
        self._ids.setdefault(device_id, device_id)

    def get(self, device_id: str) -> str | None:
        return self._ids.get(device_id)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)


class Ingest:
    def __init__(
        self,
        ops: FleetOps,
        liveness: Liveness,
        metrics: FleetMetrics,
        *,
        db: RunDb,
        reconcile: Callable[[list[str]], Awaitable[None]],
        clock: Callable[[], float],
        publish: Callable[[list[Publish]], Awaitable[None]] | None = None,
        submit: Submit | None = None,
    ) -> None:
        self._ops = ops
        self._live = liveness
        self._m = metrics
        self._db = db
        self._reconcile = reconcile
        self._clock = clock
        self._publish = publish
        self.known = KnownDevices()
        # State, ack and event messages queued for the database thread (none: one
        # transaction each); ``submit`` puts a job on that thread without waiting.
        self.inbound = (
            InboundQueue(ops.apply_inbound, submit=submit, done=self._applied) if submit else None
        )
        # Resolved once: a labelled child costs a dict lookup and a lock per call.
        self._messages = {c: metrics.messages.labels(channel=c.value) for c in Channel}
        self._hb_messages = self._messages[Channel.HB]
        self._skew = metrics.clock_skew

    def heartbeat_fast(self, topic: str, payload: bytes) -> bool:
        """The path of nearly all traffic, run in the MQTT network thread: a heartbeat of a
        known device that is online is validated (strictly, as on the loop) and recorded in
        memory, with no await and no database. False: not handled here (another channel,
        unknown device, malformed, or a device coming back); the event loop then takes the
        message through :meth:`handle`, which rejects, logs or writes as before.
        """
        found = self._known_topic(topic) if topic.endswith(_HB_SUFFIX) else None
        if found is None:
            return False
        device_id = found[0]
        try:
            hb = decode(Heartbeat, payload)
        except MessageError:
            return False
        now = self._clock()
        if not self._live.seen_if_online(device_id, now, hb):
            return False
        self._hb_messages.inc()
        self._skew.observe(abs(hb.ts - now))
        return True

    async def handle_batch(self, batch: list[tuple[str, bytes, float]]) -> None:
        """What the fast path left, in arrival order, each with the time it was received
        (one by one: a message may await the database, and writes per device keep the
        order of arrival)."""
        for topic, payload, at in batch:
            await self.handle(topic, payload, at)

    def _reject(self, channel: str, why: str, device_id: str | None, detail: str) -> None:
        self._m.ingest_errors.labels(channel=channel, why=why).inc()
        log.warning("rejected %s message from %s: %s", channel, device_id or "?", detail[:160])

    def _known_topic(self, topic: str) -> tuple[str, Channel] | None:
        """``.../dev/{id}/{channel}`` of a registered device, without the strict parser's
        validation (a registered id is a valid one; anything else gets the parser)."""
        if not topic.startswith(_DEVICE_PREFIX):
            return None
        device_id, _, channel = topic[len(_DEVICE_PREFIX) :].rpartition("/")
        known, found = self.known.get(device_id), _CHANNELS.get(channel)
        return None if known is None or found is None else (known, found)

    async def handle(self, topic: str, payload: bytes, at: float | None = None) -> None:
        """One message, received ``at`` (the clock's time: ``None``, now)."""
        found = self._known_topic(topic)
        if found is not None:
            device_id, channel = found
            self._messages[channel].inc()
        else:
            try:
                device_id, channel = parse_device_topic(topic)
            except TopicError as exc:
                self._reject("unknown", "bad_topic", None, str(exc))
                return
            self._messages[channel].inc()
            self._reject(channel.value, "unknown_device", device_id, "device not registered")
            return
        now = self._clock() if at is None else at
        try:
            touched = await self._dispatch(device_id, channel, payload, now)
        except MessageError as exc:
            self._reject(channel.value, "malformed", device_id, exc.why)
            return
        except NotFound:
            self._reject(channel.value, "unknown_device", device_id, "device not in database")
            return
        if touched:
            await self._reconcile(touched)

    async def _dispatch(
        self, device_id: str, channel: Channel, payload: bytes, now: float
    ) -> list[str]:
        match channel:
            case Channel.HB:
                hb = decode(Heartbeat, payload)
                self._m.clock_skew.observe(abs(hb.ts - now))
                if self._live.seen(device_id, now, hb):  # back: a write and a reconcile
                    return await self._queue(device_id, hb, now, contact=True)
                return []
            case Channel.STATUS:
                status = decode(Status, payload)
                if status.status == "online":
                    self._live.seen(device_id, now)
                else:
                    self._live.gone(device_id)
                return await self._queue(device_id, status, now, contact=False)
            case Channel.STATE:
                return await self._queue(device_id, decode(StateReport, payload), now)
            case Channel.ACK:
                return await self._queue(device_id, decode(Ack, payload), now)
            case Channel.EVENT:
                event = decode(Event, payload)
                contact = self._live.seen(device_id, now)
                if not contact and event.kind in _NOTHING_TO_APPLY:
                    return []
                return await self._queue(device_id, event, now, contact=contact)
            case Channel.CMD:
                self._reject("cmd", "unexpected", device_id, "the fleet does not read commands")
                return []

    # --- everything that writes: batched (fleet/batch.py) ----------------------------------

    async def _queue(
        self, device_id: str, message: InboundMessage, now: float, contact: bool | None = None
    ) -> list[str]:
        """Applied with whatever else is queued for the database thread, in one transaction
        and in order; rejections, publishing and the reconcile follow in ``_applied``.
        Batched because they come in storms: 10,000 devices back after a broker restart,
        hundreds of Last Wills at once; one transaction and one reconcile each would keep
        the database thread busy for minutes while every later message waits."""
        if contact is None:
            contact = self._live.seen(device_id, now)
        item = Inbound(device_id, message, now, contact=contact)
        if self.inbound is None:  # no queue: one transaction for this message
            await self._applied([item], await self._db(self._ops.apply_inbound, [item]))
        else:
            self.inbound.add(item)
        return []

    async def _applied(self, items: list[Inbound], result: Applied) -> None:
        for item, why, detail in result.rejected:
            self._reject(_CHANNEL[type(item.message)], why, item.device_id, detail)
            message = item.message
            if item.contact or (isinstance(message, Status) and message.status == "online"):
                # Its coming back was not written (the database failed, or the message):
                # forgotten in memory too, so the device's next message tries again. Else
                # memory says online, the database offline, and heartbeats, handled in the
                # network thread for devices online in memory, never repair it.
                self._live.gone(item.device_id)
            elif isinstance(message, Status) and why != "unknown_device":
                # A Last Will not written: the database still says online. Silence
                # detection takes over (counted from now), so a dead device still gets
                # its visit, one threshold later.
                self._live.seen(item.device_id, item.now)
        if result.publish and self._publish is not None:
            await self._publish(result.publish)
        if result.touched:
            await self._reconcile(sorted(set(result.touched)))


_CHANNEL: dict[type, str] = {
    Heartbeat: Channel.HB.value,
    Status: Channel.STATUS.value,
    StateReport: Channel.STATE.value,
    Ack: Channel.ACK.value,
    Event: Channel.EVENT.value,
}
