"""Device messages that write (state, ack, event, status, the heartbeat of a device coming
back) applied in batches: one transaction for everything queued by the time the database
thread gets to it.

One transaction per message cost about 1.5 ms on SQLite; 10,000 devices acknowledging
the arms of one window start are then 15 s of the database thread. The queue keeps the
order of arrival (per device, and against every other database job: the service seals the
open batch whenever it submits anything else), and each message runs in its own savepoint,
so one that fails is rejected alone.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sqlmodel import Session

from tillsyn_protocol import Ack, Event, Heartbeat, StateReport, Status

from .outbound import Publish

log = logging.getLogger(__name__)

MAX_BATCH = 5000  # messages per transaction
# How long a batch may wait, from its first message, for more to join it before the
# database thread applies it. A transaction has a fixed cost (begin, the loads, flush,
# audit head, commit): applied one device at a time, an ack and its state report cost
# 1.7 ms, in batches of 10 devices 0.37 ms, of 50 0.19 ms (bench/reconcile_cost.py's
# setup). Without a wait, a database thread that is idle when messages trickle in (a
# window start's acks from slow devices) takes each batch at its first message: with
# the simulated devices at nice 10, a 10,000-device window storm cost the fleet 15.0
# CPU-s, 13.2 with this wait (9.9 at nice 0). 20 ms is nothing next to the offline (2 s)
# and arm-confirmation (60 s) deadlines.
LINGER_S = 0.02


# A heartbeat is queued only as a device's first contact after silence (``contact``).
InboundMessage = StateReport | Ack | Event | Status | Heartbeat


@dataclass(frozen=True, slots=True)
class Inbound:
    device_id: str
    message: InboundMessage
    now: float
    contact: bool = False  # the first message after silence: the device is back first


@dataclass(slots=True)
class Applied:
    touched: list[str] = field(default_factory=list)  # devices to reconcile
    # Devices whose reported state changed; in ``touched`` too unless the change is the
    # applied effect of the fleet's latest command (``fleet.commands.unconfirmed``).
    moved: list[str] = field(default_factory=list)
    publish: list[Publish] = field(default_factory=list)
    rejected: list[tuple[Inbound, str, str]] = field(default_factory=list)  # item, why, detail


def begin(session: Session) -> None:
    """Open the transaction now. pysqlite opens one only before DML, so a first SAVEPOINT
    would be the outermost and its RELEASE a COMMIT: the batch would not be one transaction.
    IMMEDIATE: the batch reads, then writes; a deferred transaction whose snapshot another
    process (a second replica) wrote past fails at its first write with SQLITE_BUSY at once,
    without the busy timeout. Taking the write lock first waits for it instead."""
    conn = session.connection()
    if conn.dialect.name == "sqlite" and not conn.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
        conn.exec_driver_sql("BEGIN IMMEDIATE")


@dataclass(slots=True)
class _Batch:
    items: list[Inbound]
    born: float = field(default_factory=time.monotonic)
    taken: bool = False


Submit = Callable[[Callable[[], Applied]], "asyncio.Future[Applied]"]


class InboundQueue:
    """Called from the event loop; ``apply`` runs on the database thread."""

    def __init__(
        self,
        apply: Callable[[list[Inbound]], Applied],
        *,
        submit: Submit,
        done: Callable[[list[Inbound], Applied], Awaitable[None]],
        max_batch: int = MAX_BATCH,
        linger_s: float = LINGER_S,
    ) -> None:
        self._apply = apply
        self._submit = submit
        self._done = done
        self._max = max_batch
        self._linger = linger_s
        self._lock = threading.Lock()  # the database thread takes what the loop appends to
        self._joined = threading.Condition(self._lock)  # sealed or full: stop lingering
        self._open: _Batch | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_added = -math.inf  # monotonic

    def add(self, item: Inbound) -> None:
        self._last_added = time.monotonic()
        with self._lock:
            batch = self._open
            if batch is not None and not batch.taken and len(batch.items) < self._max:
                batch.items.append(item)
                if len(batch.items) >= self._max:
                    self._joined.notify_all()
                return
            batch = self._open = _Batch([item])
        # Submitted now, so its place among the database thread's jobs is fixed now.
        future = self._submit(lambda: self._run(batch))
        task = asyncio.get_running_loop().create_task(self._finish(batch, future))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def seal(self) -> None:
        """Something else goes to the database thread now: what comes later goes after it."""
        with self._lock:
            self._open = None
            self._joined.notify_all()

    def quiet_for(self) -> float:
        """Seconds since a message was last queued, 0 while any is still to be applied."""
        if self._tasks:
            return 0.0
        return time.monotonic() - self._last_added

    async def drain(self) -> None:
        """Wait until everything queued so far is applied (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _run(self, batch: _Batch) -> Applied:
        with self._joined:
            # Still open and young: the rest of its burst joins it first. Sealed (another
            # job is queued behind it) or full, it goes at once.
            while self._open is batch and len(batch.items) < self._max:
                wait = batch.born + self._linger - time.monotonic()
                if wait <= 0:
                    break
                self._joined.wait(wait)
            batch.taken = True
            items = list(batch.items)
        try:
            return self._apply(items)
        except Exception as exc:
            # The transaction failed as a whole, typically a conflict with another writer
            # (two replicas appending to the audit chain). Once more, here, so nothing
            # queued after this batch is applied before it.
            log.warning("device message batch failed (%s): once more", type(exc).__name__)
            return self._apply(items)

    async def _finish(self, batch: _Batch, future: asyncio.Future[Applied]) -> None:
        try:
            result = await future
        except Exception as exc:  # the transaction failed as a whole (database down...)
            log.error("%d device messages not applied: %s", len(batch.items), type(exc).__name__)
            result = Applied(rejected=[(i, "db_error", type(exc).__name__) for i in batch.items])
        try:
            await self._done(batch.items, result)
        except Exception as exc:  # never lost silently: reconcile's sweep repairs the rest
            log.error("after %d device messages: %s", len(batch.items), type(exc).__name__)
