"""/healthz, /readyz and /metrics of a running fleet service (real Mosquitto, SQLite)."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.fleet_harness import wait_until

pytestmark = pytest.mark.integration


async def test_health_readiness_and_metrics_endpoints(make_harness, device_cert) -> None:
    device_cert("dev-health-cert")  # the PKI holds at least one device certificate
    async with make_harness() as h:
        svc = h.service
        base = f"http://127.0.0.1:{svc.settings.api_port}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:

            async def serving() -> bool:
                try:
                    return (await http.get("/healthz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_until(serving, timeout=10, what="API up")
            assert (await http.get("/healthz")).json() == {"status": "alive"}

            ready = await http.get("/readyz")
            assert ready.status_code == 200
            body = ready.json()
            assert body["ready"] is True
            assert {k: body["checks"][k] for k in ("database", "broker", "scheduler")} == {
                "database": True,
                "broker": True,
                "scheduler": True,
            }

            # Let the sweep refresh the gauges once, then every catalogued family is there.
            await wait_until(
                lambda: _value(svc, "tillsyn_gauges_refresh_timestamp_seconds"),
                timeout=10,
                what="gauges refreshed",
            )
            # The certificate gauges come after the database ones in the same round: wait
            # for them too, or a loaded machine scrapes in between.
            await wait_until(
                lambda: _value(
                    svc, "tillsyn_certificate_soonest_expiry_timestamp_seconds", kind="device"
                ),
                timeout=10,
                what="certificate gauges refreshed",
            )
            scrape = await http.get("/metrics")
            assert scrape.status_code == 200
            assert scrape.headers["content-type"].startswith("text/plain")
            families = {f.name: f for f in text_string_to_metric_families(scrape.text)}
            for info in svc.metrics.catalogue:
                family = info.name.removesuffix("_total")
                assert family in families, info.name
            samples = {s.name: s.value for f in families.values() for s in f.samples}
            assert samples["tillsyn_mqtt_connected"] == 1
            assert samples["tillsyn_scheduler_running"] == 1
            assert samples["tillsyn_mqtt_connects_total"] >= 1
            # Certificates of the session PKI the harness runs with.
            cert_kinds = {
                s.labels["kind"]
                for s in families["tillsyn_certificate_soonest_expiry_timestamp_seconds"].samples
            }
            assert cert_kinds == {"ca", "fleet", "device"}

            # The scheduler stops: not ready, and the metric says so.
            svc.scheduler.shutdown()
            not_ready = await http.get("/readyz")
            assert not_ready.status_code == 503
            assert not_ready.json()["checks"]["scheduler"] is False
            assert not_ready.json()["ready"] is False
            assert _sample(svc, "tillsyn_scheduler_running") == 0
            assert (await http.get("/healthz")).status_code == 200


def _sample(svc, name: str, **labels: str) -> float | None:
    return svc.metrics.registry.get_sample_value(name, labels or None)


async def _value(svc, name: str, **labels: str) -> bool:
    return bool(_sample(svc, name, **labels))
