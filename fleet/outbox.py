"""Durable outbox for other systems: written in the transaction of the change, then
posted to a webhook at least once (retries with backoff, ``Idempotency-Key`` header).

Kinds: ``visit.raised|acknowledged|device_back|closed`` (fleet/visits.py), ``coverage.report``
(fleet/coverage.py), ``incident.opened`` / ``incident.closed`` (fleet/incident.py).

A receiver must treat the ``Idempotency-Key`` (the event id) as the identity of the event:
the sender retries until it gets a 2xx, so a lost answer means the same event again.
Only the scheduler leader sends, so replicas do not race each other for the same rows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from sqlmodel import Session, col, select

from .plan_models import OutboxEvent

log = logging.getLogger(__name__)

BATCH = 50


def enqueue(session: Session, *, kind: str, payload: dict[str, Any], now: float) -> OutboxEvent:
    """Add one event in the caller's transaction (commits, or not, with the change)."""
    event = OutboxEvent(
        event_id=uuid.uuid4().hex,
        kind=kind,
        payload=json.dumps(payload, sort_keys=True, default=str),
        created_at=now,
        next_attempt_at=now,
    )
    session.add(event)
    return event


def due(session: Session, now: float, limit: int = BATCH) -> list[OutboxEvent]:
    stmt = (
        select(OutboxEvent)
        .where(OutboxEvent.delivered_at == None, OutboxEvent.next_attempt_at <= now)  # noqa: E711
        .order_by(col(OutboxEvent.id))
        .limit(limit)
    )
    return list(session.exec(stmt).all())


def mark(
    session: Session,
    event_id: str,
    *,
    ok: bool,
    now: float,
    error: str | None,
    backoff_s: float,
    backoff_max_s: float,
) -> None:
    event = session.exec(select(OutboxEvent).where(OutboxEvent.event_id == event_id)).first()
    if event is None or event.delivered_at is not None:
        return
    event.attempts += 1
    if ok:
        event.delivered_at, event.last_error = now, None
    else:
        delay = min(backoff_max_s, backoff_s * 2 ** (event.attempts - 1))
        event.next_attempt_at = now + delay * random.uniform(0.8, 1.0)
        event.last_error = (error or "?")[:200]
    session.add(event)


def backlog(session: Session) -> tuple[int, float | None]:
    """(undelivered events, created_at of the oldest)."""
    rows = session.exec(
        select(OutboxEvent.created_at)
        .where(OutboxEvent.delivered_at == None)  # noqa: E711
        .order_by(col(OutboxEvent.id))
    ).all()
    return len(rows), (rows[0] if rows else None)


@dataclass(frozen=True, slots=True)
class Delivery:
    event_id: str
    ok: bool
    error: str | None


class WebhookSender:
    """Posts due outbox events to one URL; never raises out of :meth:`run`."""

    def __init__(
        self,
        *,
        url: str,
        db: Callable[..., Any],
        run: Callable[..., Any],
        clock: Callable[[], float],
        timeout_s: float = 10.0,
        backoff_s: float = 2.0,
        backoff_max_s: float = 600.0,
        poll_s: float = 1.0,
        on_result: Callable[[bool], None] | None = None,
    ) -> None:
        self._url = url
        self._db = db  # async: run a function on the database thread
        self._run = run  # FleetOps.run: fn(session) in one transaction
        self._clock = clock
        self._timeout = timeout_s
        self._backoff = backoff_s
        self._backoff_max = backoff_max_s
        self._poll = poll_s
        self._on_result = on_result
        self.wake = asyncio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=self._timeout) as client:
            while True:
                try:
                    sent = await self.send_due(client)
                except Exception as exc:  # a database hiccup must not end the sender
                    log.error("outbox sender: %s", type(exc).__name__)
                    sent = 0
                if sent:
                    continue
                self.wake.clear()
                try:
                    async with asyncio.timeout(self._poll):
                        await self.wake.wait()
                except TimeoutError:
                    pass

    async def send_due(self, client: httpx.AsyncClient) -> int:
        now = self._clock()
        events = await self._db(self._run, lambda s: due(s, now))
        for event in events:
            result = await self._post(client, event)
            if self._on_result is not None:
                self._on_result(result.ok)
            await self._db(
                self._run,
                lambda s, r=result: mark(
                    s,
                    r.event_id,
                    ok=r.ok,
                    now=self._clock(),
                    error=r.error,
                    backoff_s=self._backoff,
                    backoff_max_s=self._backoff_max,
                ),
            )
        return len(events)

    async def _post(self, client: httpx.AsyncClient, event: OutboxEvent) -> Delivery:
        body = {
            "id": event.event_id,
            "kind": event.kind,
            "created_at": event.created_at,
            "data": json.loads(event.payload),
        }
        try:
            resp = await client.post(
                self._url,
                json=body,
                headers={"Idempotency-Key": event.event_id, "X-Tillsyn-Event": event.kind},
            )
        except httpx.HTTPError as exc:
            return Delivery(event.event_id, False, type(exc).__name__)
        if 200 <= resp.status_code < 300:
            return Delivery(event.event_id, True, None)
        return Delivery(event.event_id, False, f"HTTP {resp.status_code}")
