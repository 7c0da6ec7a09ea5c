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

from .core import FleetOps
from .errors import NotFound
from .liveness import Liveness
from .metrics import FleetMetrics
from .outbound import Publish

log = logging.getLogger(__name__)

T = TypeVar("T")


class RunDb(Protocol):
    async def __call__(self, fn: Callable[..., T], /, *args: Any) -> T: ...


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
    ) -> None:
        self._ops = ops
        self._live = liveness
        self._m = metrics
        self._db = db
        self._reconcile = reconcile
        self._clock = clock
        self._publish = publish
        self.known: set[str] = set()

    def _reject(self, channel: str, why: str, device_id: str | None, detail: str) -> None:
        self._m.ingest_errors.labels(channel=channel, why=why).inc()
        log.warning("rejected %s message from %s: %s", channel, device_id or "?", detail[:160])

    async def handle(self, topic: str, payload: bytes) -> None:
        try:
            device_id, channel = parse_device_topic(topic)
        except TopicError as exc:
            self._reject("unknown", "bad_topic", None, str(exc))
            return
        self._m.messages.labels(channel=channel.value).inc()
        if device_id not in self.known:
            self._reject(channel.value, "unknown_device", device_id, "device not registered")
            return
        now = self._clock()
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
        ops = self._ops
        match channel:
            case Channel.HB:
                hb = decode(Heartbeat, payload)
                self._m.clock_skew.observe(abs(hb.ts - now))
                if self._live.seen(device_id, now, hb):
                    return await self._db(ops.contact, device_id, now)
                return []
            case Channel.STATUS:
                status = decode(Status, payload)
                if status.status == "online":
                    self._live.seen(device_id, now)
                else:
                    self._live.gone(device_id)
                return await self._db(ops.on_status, device_id, status, now)
            case Channel.STATE:
                report = decode(StateReport, payload)
                touched = await self._contact(device_id, now)
                return touched + await self._db(ops.on_state, device_id, report, now)
            case Channel.ACK:
                ack = decode(Ack, payload)
                touched = await self._contact(device_id, now)
                return touched + await self._db(ops.on_ack, device_id, ack, now)
            case Channel.EVENT:
                event = decode(Event, payload)
                touched = await self._contact(device_id, now)
                touched += await self._db(ops.on_event, device_id, event, now)
                if event.kind is EventKind.CALL_NOT_ANSWERED and event.look_id:
                    pubs = await self._db(ops.call_not_answered, device_id, event.look_id, now)
                    if pubs and self._publish is not None:
                        await self._publish(pubs)
                    touched.append(device_id)
                return touched
            case Channel.CMD:
                self._reject("cmd", "unexpected", device_id, "the fleet does not read commands")
                return []

    async def _contact(self, device_id: str, now: float) -> list[str]:
        if self._live.seen(device_id, now):
            return await self._db(self._ops.contact, device_id, now)
        return []
