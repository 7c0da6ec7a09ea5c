"""Visits reach other systems at least once: outbox row in the visit's transaction, a
webhook that fails at first, retries with backoff, the same Idempotency-Key each time."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlmodel import select

from fleet import visits
from fleet.models import Device, VisitCause
from fleet.plan_models import OutboxEvent
from tests.integration.fleet_harness import wait_until

pytestmark = pytest.mark.integration


class Receiver:
    """A local HTTP endpoint that answers 503 to the first ``fail`` posts, then 204."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.posts: list[tuple[str | None, dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.posts.append((self.headers.get("Idempotency-Key"), body))
                self.send_response(503 if len(outer.posts) <= outer.fail else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/visits"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_visit_webhook_retries_until_delivered_with_one_idempotency_key(
    make_harness,
) -> None:
    with Receiver(fail=2) as hook:
        async with make_harness(
            webhook_url=hook.url, webhook_backoff_s=0.3, webhook_backoff_max_s=1.0
        ) as h:
            await h.add_device("dev-hook-1", resident="res-hook")
            ops = h.service.ops
            now = h.service.clock()

            def raise_one(s: Any) -> None:
                device = s.get(Device, "dev-hook-1")
                visits.raise_visit(
                    s,
                    ops.metrics,
                    key="test:hook:1",
                    cause=VisitCause.CAMERA_FAULT,
                    device=device,
                    due_at=now + 600,
                    now=now,
                    evidence={"camera": "fault"},
                )

            await h.service.db(ops.run, raise_one)
            # The row exists as soon as the visit does (same transaction).
            rows = await h.service.db(ops.run, lambda s: s.exec(select(OutboxEvent)).all())
            assert [r.kind for r in rows] == ["visit.raised"]

            async def delivered() -> OutboxEvent | None:
                row = await h.service.db(ops.run, lambda s: s.exec(select(OutboxEvent)).one())
                return row if row.delivered_at else None

            row = await wait_until(delivered, timeout=20, what="webhook delivered")
    assert row.attempts == 3 and len(hook.posts) == 3
    keys = {key for key, _ in hook.posts}
    assert keys == {row.event_id}  # one event, one key, however often it was sent
    body = hook.posts[-1][1]
    assert body["kind"] == "visit.raised"
    assert body["data"]["visit"]["cause"] == "camera_fault"
    assert body["data"]["visit"]["resident_id"] == "res-hook"
