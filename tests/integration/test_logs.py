"""The fleet service's log lines, for a sample run, are JSON and carry no personal data: no
resident id, no site, no message payload, no command token."""

from __future__ import annotations

import io
import json
import logging
import time

import aiomqtt
import pytest

from fleet.models import Device, VisitCause
from tests.helpers import make_client_ssl_context
from tests.integration.fleet_harness import wait_until
from tillsyn_cli.logs import JsonFormatter

pytestmark = pytest.mark.integration

RESIDENT = "res-LOGSECRET-4711"
SITE = "site-LOGSECRET"
SENTINEL = "PAYLOADSENTINEL"


@pytest.fixture
def json_log() -> io.StringIO:
    """Root logging as ``tillsyn -v`` sets it up when stderr is not a terminal."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def test_service_logs_are_json_without_personal_data(
    make_harness, device_cert, json_log: io.StringIO
) -> None:
    device_id = "dev-log-1"
    async with make_harness(offline_after_s=3) as h:
        await h.service.register_device(Device(id=device_id, resident_id=RESIDENT, site=SITE))
        await h.add_window(device_id, start_in_s=600, duration_s=300)
        cert, key = device_cert(device_id)
        ctx = make_client_ssl_context(h.pki, cert, key)
        now = time.time()
        heartbeat = {
            "v": 1,
            "ts": now,
            "seq": 1,
            "uptime_s": 5,
            "state": "LOCKED",
            "camera": "ok",
            "clock_synced": True,
            "fw": "1.0.0",
        }
        async with aiomqtt.Client(
            "127.0.0.1", h.broker_port, tls_context=ctx, identifier=f"{device_id}-raw"
        ) as client:
            topic = f"tillsyn/v1/dev/{device_id}"
            status = {"v": 1, "ts": now, "status": "online", "boot_id": "boot1", "fw": "1.0.0"}
            await client.publish(f"{topic}/status", json.dumps(status), qos=1)
            await client.publish(f"{topic}/hb", json.dumps(heartbeat), qos=1)
            # Malformed, with the sentinel as a field name, as a value, and as raw bytes.
            bad = heartbeat | {SENTINEL: RESIDENT, "fw": f"{SENTINEL}!{RESIDENT}"}
            await client.publish(f"{topic}/hb", json.dumps(bad), qos=1)
            await client.publish(f"{topic}/event", f"{SENTINEL} {RESIDENT}".encode(), qos=1)
            await client.publish(f"{topic}/status", json.dumps(status | {"status": "offline"}))

        visits = await wait_until(lambda: h.visits(device_id), timeout=8, what="offline visit")
        assert visits[0].cause is VisitCause.DEVICE_OFFLINE
        assert visits[0].resident_id == RESIDENT  # the visit needs it; the log must not have it

    lines = [line for line in json_log.getvalue().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    for entry in entries:
        assert {"ts", "level", "logger", "msg"} <= entry.keys(), entry
    fleet = [e["msg"] for e in entries if e["logger"].startswith("fleet")]
    # The run did log what IT support needs: the offline device, the visit, the rejections.
    assert any("offline" in m and device_id in m for m in fleet), fleet
    assert any("visit raised" in m and "device_offline" in m for m in fleet), fleet
    assert sum("rejected" in m for m in fleet) >= 2, fleet
    text = json_log.getvalue()
    for secret in (RESIDENT, "LOGSECRET", SENTINEL, "eyJ"):
        assert secret not in text, f"{secret!r} leaked into the log"
