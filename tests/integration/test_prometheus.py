"""A real Prometheus (the Debian package) scrapes a running fleet service with real agents,
using the project's scrape config and alert rules; every dashboard panel query and every
alert expression is evaluated through Prometheus's HTTP API.

The scenario makes every panel have data: an armed device (commands, round trips, window
opened), a device killed with a window due in 10 minutes (offline, at risk, a visit), a
registered device never connected, a forged command token (a refusal), a malformed
message and one from a device the fleet does not know (rejections). Exactly two alerts'
expressions must then hold: the offline device with a window due, and the forged token.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
import yaml

from broker.launcher import free_port
from fleet.models import Connectivity
from tests.helpers import make_client_ssl_context
from tests.integration.fleet_harness import wait_until
from tests.monitoring import MONITORING, alert_rules, dashboard_files, for_prometheus
from tillsyn_protocol import SigningKey, sign
from tillsyn_protocol import tokens as tk

pytestmark = pytest.mark.integration

EXPECTED_FIRING = {"TillsynDeviceOfflineWindowDue", "TillsynForgedCommandTokens"}


def prometheus_config(tmp: Path, fleet_port: int) -> Path:
    """The project's monitoring/prometheus.yml, pointed at the test's fleet, fast."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["tillsyn-fleet"]["static_configs"] = [{"targets": [f"127.0.0.1:{fleet_port}"]}]
    config["rule_files"] = [str(MONITORING / name) for name in config["rule_files"]]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("prometheus not found: run scripts/setup.sh --test (Debian package)")
    return path


class Prometheus:
    def __init__(self, binary: str, config: Path, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "prometheus.log"
        self._args = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self._args, stdout=out, stderr=out, stdin=subprocess.DEVNULL
            )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def prometheus_factory(prometheus_binary: str, tmp_path: Path) -> Iterator[Any]:
    started: list[Prometheus] = []

    def make(fleet_port: int) -> Prometheus:
        prom = Prometheus(prometheus_binary, prometheus_config(tmp_path, fleet_port), tmp_path)
        started.append(prom)
        prom.start()
        return prom

    yield make
    for prom in started:
        prom.stop()


async def query(http: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
    response = await http.get("/api/v1/query", params={"query": expr})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


async def query_range(http: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
    now = time.time()
    response = await http.get(
        "/api/v1/query_range",
        params={"query": expr, "start": now - 20, "end": now, "step": "1s"},
    )
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


async def _publish_as(h: Any, device_cert: Any, device_id: str, channel: str, payload: bytes):
    cert, key = device_cert(device_id)
    ctx = make_client_ssl_context(h.pki, cert, key)
    async with aiomqtt.Client(
        "127.0.0.1", h.broker_port, tls_context=ctx, identifier=f"{device_id}-raw"
    ) as client:
        await client.publish(f"tillsyn/v1/dev/{device_id}/{channel}", payload, qos=1)


async def test_prometheus_evaluates_every_panel_and_alert(
    make_harness, device_cert, prometheus_factory
) -> None:
    async with make_harness(sweep_interval_s=1.0, offline_after_s=3) as h:
        prom = prometheus_factory(h.service.settings.api_port)
        async with httpx.AsyncClient(base_url=prom.url, timeout=5) as http:
            # Counters are seen at 0 before they count, as in production.
            await wait_until(lambda: _ready(http), timeout=20, what="prometheus ready")
            await wait_until(
                lambda: query(http, 'up{job="tillsyn-fleet"} == 1'), timeout=10, what="a scrape"
            )
            await _scenario(h, device_cert)
            await _wait_for_scrapes(http, since=time.time())
            await _every_panel_has_data(http)
            await _exactly_the_expected_alerts(http)


async def _ready(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/-/ready")).status_code == 200
    except httpx.HTTPError:
        return False


async def _scenario(h: Any, device_cert: Any) -> None:
    svc = h.service
    for device_id in ("dev-prom-armed", "dev-prom-dead", "dev-prom-new"):
        await h.add_device(device_id)
    h.agent("dev-prom-armed")
    dead = h.agent("dev-prom-dead")

    async def online(device_id: str) -> bool:
        return (await h.device(device_id)).connectivity is Connectivity.ONLINE

    await wait_until(lambda: online("dev-prom-armed"), timeout=10, what="agent online")
    await wait_until(lambda: online("dev-prom-dead"), timeout=10, what="agent online")
    await h.add_window("dev-prom-armed", start_in_s=1, duration_s=300)
    await h.add_window("dev-prom-dead", start_in_s=600, duration_s=300)
    await wait_until(lambda: h.state_is("dev-prom-armed", "ARMED"), timeout=8, what="ARMED")
    dead.signal(signal.SIGKILL)
    await wait_until(lambda: h.visits("dev-prom-dead"), timeout=8, what="offline visit")

    # A forged command (refused by the device), a malformed heartbeat, and a message from
    # a device with a valid certificate that the fleet never registered.
    forged = sign(
        tk.arm("dev-prom-armed", seq=10**6, now=time.time(), until=int(time.time()) + 60),
        SigningKey.generate(),
    )
    ctx = make_client_ssl_context(h.pki, h.pki.fleet_cert, h.pki.fleet_key)
    async with aiomqtt.Client(
        "127.0.0.1", h.broker_port, tls_context=ctx, identifier="attacker-prom"
    ) as client:
        await client.publish("tillsyn/v1/dev/dev-prom-armed/cmd", forged, qos=1)
    await _publish_as(h, device_cert, "dev-prom-armed", "hb", b"not json")
    await _publish_as(h, device_cert, "dev-prom-stranger", "hb", b"{}")

    def counted(name: str, **labels: str) -> Any:
        async def check() -> bool:
            return bool(svc.metrics.registry.get_sample_value(name, labels))

        return check

    await wait_until(
        counted("tillsyn_token_refusals_total", reason="unknown_key"),
        timeout=5,
        what="forged token refused",
    )
    await wait_until(
        counted("tillsyn_ingest_rejected_total", channel="hb", why="unknown_device"),
        timeout=5,
        what="stranger rejected",
    )


async def _wait_for_scrapes(http: httpx.AsyncClient, since: float) -> None:
    """Scrapes taken after the scenario, so rate() and increase() see it."""

    async def seen() -> bool:
        result = await query(http, 'timestamp(up{job="tillsyn-fleet"})')
        return bool(result) and float(result[0]["value"][1]) >= since + 3

    await wait_until(seen, timeout=20, what="scrapes after the scenario")
    assert [float(r["value"][1]) for r in await query(http, "up")] == [1.0]


async def _every_panel_has_data(http: httpx.AsyncClient) -> None:
    empty = []
    panels = 0
    for path in dashboard_files():
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                panels += 1
                expr = for_prometheus(target["expr"])
                where = f"{path.name}: {panel['title']}: {expr}"
                if not await query(http, expr):
                    empty.append(where)
                if panel["type"] == "timeseries" and not await query_range(http, expr):
                    empty.append(f"{where} (range)")
    assert panels >= 40
    assert not empty, "panels without data:\n" + "\n".join(empty)


async def _exactly_the_expected_alerts(http: httpx.AsyncClient) -> None:
    holding = {rule["alert"] for rule in alert_rules() if await query(http, rule["expr"])}
    assert holding == EXPECTED_FIRING

    async def rules_evaluated() -> list[dict[str, Any]] | None:
        body = (await http.get("/api/v1/rules")).json()
        found = [r for g in body["data"]["groups"] for r in g["rules"]]
        ok = all(r["health"] == "ok" and r.get("lastEvaluation") for r in found)
        return found if ok and found else None

    loaded = await wait_until(rules_evaluated, timeout=10, what="rules evaluated")
    assert {r["name"] for r in loaded} == {r["alert"] for r in alert_rules()}
    states = {r["name"]: r["state"] for r in loaded}
    # No "for": fires at once. Offline-with-window-due waits 5 minutes: pending.
    assert states["TillsynForgedCommandTokens"] == "firing"
    assert states["TillsynDeviceOfflineWindowDue"] == "pending"
    assert states["TillsynCameraArmedPastWindowEnd"] == "inactive"
