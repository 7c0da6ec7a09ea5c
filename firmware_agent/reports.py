"""Everything the agent publishes: built from the protocol's schemas, or not at all.

:class:`Reporter` turns machine actions and agent observations into ``Ack``, ``Event``,
``StateReport``, ``Status`` and ``Heartbeat`` payloads; a value that would not validate
is logged and dropped, never published. Events and acks wait in the bounded
:class:`Outbox` until the publisher task can send them (oldest dropped first, counted).
No image, sound or free text ever becomes a payload.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from tillsyn_protocol import (
    Ack,
    AckOut,
    AckResult,
    CameraHealth,
    Channel,
    Event,
    EventKind,
    Heartbeat,
    LockState,
    RefusalReason,
    Snapshot,
    StateReport,
    Status,
    encode,
)

from .clock import ClockSource
from .config import AgentConfig

__all__ = ["OUTBOX_MAX", "Outbox", "Outgoing", "Reporter"]

log = logging.getLogger(__name__)

OUTBOX_MAX = 256  # events and acks kept while offline
_SHORT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MALFORMED = frozenset({RefusalReason.TOO_LARGE, RefusalReason.MALFORMED})


@dataclass(frozen=True, slots=True)
class Outgoing:
    channel: Channel
    payload: bytes
    qos: int = 1


class Outbox:
    """Bounded FIFO of reports waiting for a connection; ``ready`` is set on every put."""

    def __init__(self, counters: Counter[str], maxlen: int = OUTBOX_MAX) -> None:
        self._items: deque[Outgoing] = deque()
        self._counters = counters
        self._maxlen = maxlen
        self.ready = asyncio.Event()

    def put(self, item: Outgoing) -> None:
        if len(self._items) >= self._maxlen:
            self._items.popleft()
            self._counters["outbox_dropped"] += 1
        self._items.append(item)
        self.ready.set()

    def take(self) -> Outgoing:
        return self._items.popleft()

    def put_back(self, item: Outgoing) -> None:
        """Return an item that could not be sent to the front of the queue."""
        if len(self._items) < self._maxlen:
            self._items.appendleft(item)
        else:
            self._counters["outbox_dropped"] += 1

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Outgoing]:
        return iter(list(self._items))


class Reporter:
    """Builds the device's reports; events and acks go to the outbox."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        boot_id: str,
        clock: ClockSource,
        counters: Counter[str],
        outbox: Outbox,
    ) -> None:
        self._config = config
        self._boot_id = boot_id
        self._clock = clock
        self._counters = counters
        self._outbox = outbox
        self._hb_seq = 0

    def ack(self, out: AckOut, *, why: str | None = None) -> None:
        """Report a command result; count it; a refusal is also an event."""
        # peek_ids labels refusals from unverified input; keep only what the schema allows.
        jti = out.jti if out.jti is not None and _SHORT_ID.fullmatch(out.jti) else None
        self._queue(
            Channel.ACK,
            Ack,
            jti=jti,
            seq=out.seq,
            cmd=out.cmd,
            result=out.result,
            reason=out.reason,
            state=out.state,
        )
        cmd = out.cmd.value if out.cmd else "?"
        match out.result:
            case AckResult.APPLIED:
                self._counters["applied"] += 1
                log.info("applied %s seq %s: %s", cmd, out.seq, out.state.value)
            case AckResult.DUPLICATE:
                self._counters["duplicate"] += 1
                log.info("duplicate %s seq %s ignored", cmd, out.seq)
            case AckResult.REFUSED:
                reason = why or (out.reason.value if out.reason else "unknown")
                self._counters["refused"] += 1
                self._counters[f"refused.{reason}"] += 1
                if out.reason in _MALFORMED:
                    self._counters["malformed"] += 1
                log.warning("refused %s seq %s: %s", cmd, out.seq, reason)
                self.event(EventKind.TOKEN_REFUSED, out.state, reason=reason)

    def event(self, kind: EventKind, state: LockState, **fields: Any) -> None:
        self._queue(Channel.EVENT, Event, kind=kind, state=state, **fields)

    def state(self, snap: Snapshot) -> bytes:
        return encode(
            StateReport(
                ts=self._clock.now().wall,
                state=snap.state,
                since=snap.since,
                armed_until=snap.armed_until,
                view_until=snap.view_until,
                look_id=snap.look_id,
                last_seq=snap.last_seq,
            )
        )

    def status(self, status: Literal["online", "offline"]) -> bytes:
        return encode(
            Status(
                ts=self._clock.now().wall,
                status=status,
                boot_id=self._boot_id,
                fw=self._config.firmware_version,
                kind=self._config.kind,
            )
        )

    def heartbeat(self, *, state: LockState, camera: CameraHealth, start_mono: float) -> bytes:
        self._hb_seq += 1
        now = self._clock.now()
        return encode(
            Heartbeat(
                ts=now.wall,
                seq=self._hb_seq,
                uptime_s=max(0.0, now.mono - start_mono),
                state=state,
                camera=camera,
                clock_synced=now.synced,
                fw=self._config.firmware_version,
            )
        )

    def _queue(self, channel: Channel, model: type[Ack | Event], **fields: Any) -> None:
        try:
            message = model(ts=self._clock.now().wall, **fields)
        except ValidationError as exc:  # never publish anything off-schema
            self._counters["report_errors"] += 1
            err = exc.errors(include_url=False, include_input=False)[0]
            log.error("not reporting %s %s: %s", model.__name__, err["loc"], err["msg"])
            return
        self._outbox.put(Outgoing(channel, encode(message)))
