"""Device ids sliced from topics are replaced by the one stored string per registered
device (fleet.ingest.KnownDevices), so what outlives a heartbeat holds no copy of its own."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from fleet.config import FleetSettings
from fleet.ingest import KnownDevices
from fleet.service import FleetService
from tillsyn_protocol import CameraHealth, Channel, Heartbeat, LockState, device_topic, encode


def test_known_devices_hand_back_the_stored_string() -> None:
    known = KnownDevices()
    stored = "".join(["dev-", "k0001"])
    known.add(stored)
    known.add("".join(["dev-", "k0001"]))  # a second add keeps the first string
    assert len(known) == 1 and "dev-k0001" in known and "dev-k0002" not in known
    assert known.get("tillsyn/v1/dev/dev-k0001/hb"[15:-3]) is stored
    assert known.get("dev-k0002") is None


async def test_a_heartbeat_leaves_only_the_stored_id_behind(tmp_path: Path) -> None:
    settings = FleetSettings(
        database_url=f"sqlite:///{tmp_path / 'f.db'}", signing_key_file=tmp_path / "key.pem"
    )
    now = 1_800_000_000.0
    service = FleetService(settings, registry=CollectorRegistry(), clock=lambda: now)
    try:
        stored = "".join(["dev-", "k0001"])
        service.ingest.known.add(stored)
        service.liveness.baseline(stored, now - 60, online=True, camera=CameraHealth.OK)
        service.liveness.drain()
        hb = Heartbeat(
            ts=now,
            seq=1,
            uptime_s=5,
            state=LockState.LOCKED,
            camera=CameraHealth.OK,
            clock_synced=True,
            fw="1.0.0",
        )
        topic = device_topic("".join(["dev-", "k0001"]), Channel.HB)
        assert service.ingest.heartbeat_fast(topic, encode(hb))
        (dirty,) = service.liveness._dirty
        assert dirty is stored
        (online,) = service.liveness._online
        assert online is stored
        # An unknown device's heartbeat is not handled here (the event loop rejects it).
        assert not service.ingest.heartbeat_fast(device_topic("dev-k0002", Channel.HB), b"{}")
    finally:
        service._executor.shutdown(wait=True)
        service.engine.dispose()
