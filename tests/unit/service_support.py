"""A ``FleetService`` for unit tests of ingest: SQLite in ``tmp_path``, a fixed clock, no
broker and no scheduler running; its database thread and engine closed afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry

from fleet.config import FleetSettings
from fleet.models import Device
from fleet.service import FleetService
from tillsyn_protocol import CameraHealth, Heartbeat, LockState

NOW = 1_800_000_000.0


def settings(tmp_path: Path) -> FleetSettings:
    return FleetSettings(
        database_url=f"sqlite:///{tmp_path / 'f.db'}", signing_key_file=tmp_path / "key.pem"
    )


@contextlib.contextmanager
def service(tmp_path: Path, now: float = NOW, *devices: Device) -> Iterator[FleetService]:
    """The service, with these devices registered (in the database and known to ingest)."""
    running = FleetService(settings(tmp_path), registry=CollectorRegistry(), clock=lambda: now)
    try:
        if devices:
            with running.ops.session() as s:
                s.add_all(devices)
            for device in devices:
                running.ingest.known.add(device.id)
        yield running
    finally:
        running._executor.shutdown(wait=True)
        running.engine.dispose()


def heartbeat(ts: float = NOW, *, fw: str = "1.0.0", synced: bool = True) -> Heartbeat:
    """A healthy, locked device's heartbeat."""
    return Heartbeat(
        ts=ts,
        seq=1,
        uptime_s=5,
        state=LockState.LOCKED,
        camera=CameraHealth.OK,
        clock_synced=synced,
        fw=fw,
    )
