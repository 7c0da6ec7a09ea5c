"""Fixtures for integration tests of the fleet service (real Mosquitto, SQLite, real agents)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from broker.launcher import MosquittoProcess, free_port
from broker.pki import PkiPaths
from fleet.config import FleetSettings
from fleet.service import FleetService
from tests.helpers import end_mqtt_sessions, make_client_ssl_context, unique_client_id
from tests.integration.fleet_harness import Harness


def fleet_settings(tmp: Path, pki: PkiPaths, port: int, **overrides: object) -> FleetSettings:
    values: dict[str, object] = {
        "database_url": f"sqlite:///{tmp / 'fleet.db'}",
        "broker_port": port,
        "ca_file": pki.ca_cert,
        "cert_file": pki.fleet_cert,
        "key_file": pki.fleet_key,
        "signing_key_file": tmp / "fleet" / "signing-key.pem",
        "api_port": free_port(),
        "mqtt_client_id": f"fleet-{uuid.uuid4().hex[:8]}",
        "offline_after_s": 3.0,
        "liveness_interval_s": 0.25,
        "sweep_interval_s": 2.0,
        "resend_after_s": 1.0,
        "arm_confirm_s": 5.0,
        "visit_horizon_s": 3600.0,
    }
    values.update(overrides)
    return FleetSettings(**values)  # type: ignore[arg-type]


class MqttSessions:
    """The client ids of the persistent MQTT sessions a test starts on the session's broker."""

    def __init__(self) -> None:
        self.client_ids: list[str] = []

    def new(self, prefix: str) -> str:
        """A client id unique to this test, whose session is ended after it."""
        return self.add(unique_client_id(prefix))

    def add(self, client_id: str) -> str:
        if client_id not in self.client_ids:
            self.client_ids.append(client_id)
        return client_id


@pytest.fixture
def mqtt_sessions(mosquitto: MosquittoProcess, pki_dir: PkiPaths) -> Iterator[MqttSessions]:
    """Persistent sessions (a configured ``mqtt_client_id``) outlive their fleet by an hour
    on the broker, which every later test shares: ended after the test, so that none of
    them goes on taking a share of a shared group's messages (``$share/fleet/...``) or
    collecting copies of later tests' device messages. A test that gives a fleet a client
    id of its own gets it from here (``mqtt_sessions.new("fleet-ha")``)."""
    sessions = MqttSessions()
    yield sessions
    tls = make_client_ssl_context(pki_dir, pki_dir.fleet_cert, pki_dir.fleet_key)
    end_mqtt_sessions(mosquitto.host, mosquitto.port, tls, sessions.client_ids)


@pytest.fixture
def make_harness(
    tmp_path: Path,
    pki_dir: PkiPaths,
    mosquitto: MosquittoProcess,
    device_cert: Callable[[str], tuple[Path, Path]],
    mqtt_sessions: MqttSessions,
) -> Callable[..., object]:
    """Factory: ``async with make_harness(**settings) as h`` runs a fleet service in-process."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def run(**overrides: object) -> AsyncIterator[Harness]:
        settings = fleet_settings(tmp_path, pki_dir, mosquitto.port, **overrides)
        if settings.persistent_session():
            mqtt_sessions.add(settings.client_id())
        service = FleetService(settings, registry=CollectorRegistry())
        task = asyncio.create_task(service.run(), name="fleet-under-test")
        harness = Harness(service, pki_dir, mosquitto.port, tmp_path, device_cert)
        try:
            await asyncio.wait_for(service.link.connected.wait(), 10)
            yield harness
        finally:
            harness.close()
            service.stop()
            await asyncio.wait_for(task, 15)

    return run
