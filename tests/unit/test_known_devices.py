"""Ingest's storm economies: device ids sliced from topics are replaced by the one stored
string per registered device (fleet.ingest.KnownDevices), so what outlives a heartbeat
holds no copy of its own; events the database has nothing to do with are not queued."""

from __future__ import annotations

from pathlib import Path

from fleet.batch import Applied, Inbound
from fleet.ingest import KnownDevices
from fleet.models import Device
from tests.unit import service_support as support
from tests.unit.service_support import NOW
from tillsyn_protocol import (
    CameraHealth,
    Channel,
    Event,
    EventKind,
    LockState,
    device_topic,
    encode,
)


def test_known_devices_hand_back_the_stored_string() -> None:
    known = KnownDevices()
    stored = "".join(["dev-", "k0001"])
    known.add(stored)
    known.add("".join(["dev-", "k0001"]))  # a second add keeps the first string
    assert len(known) == 1 and "dev-k0001" in known and "dev-k0002" not in known
    assert known.get("tillsyn/v1/dev/dev-k0001/hb"[15:-3]) is stored
    assert known.get("dev-k0002") is None


async def test_a_heartbeat_leaves_only_the_stored_id_behind(tmp_path: Path) -> None:
    now = NOW
    with support.service(tmp_path) as service:
        stored = "".join(["dev-", "k0001"])
        service.ingest.known.add(stored)
        service.liveness.baseline(stored, now - 60, online=True, camera=CameraHealth.OK)
        service.liveness.drain()
        topic = device_topic("".join(["dev-", "k0001"]), Channel.HB)
        assert service.ingest.heartbeat_fast(topic, encode(support.heartbeat(now)))
        (dirty,) = service.liveness._dirty
        assert dirty is stored
        (online,) = service.liveness._online
        assert online is stored
        # An unknown device's heartbeat is not handled here (the event loop rejects it).
        assert not service.ingest.heartbeat_fast(device_topic("dev-k0002", Channel.HB), b"{}")


async def test_state_changed_events_of_online_devices_skip_the_database(tmp_path: Path) -> None:
    """A BOOT or STATE_CHANGED event changes nothing in the database (the state report
    carries the state): from an online device it is not queued; from a device coming
    back it is (its contact is what brings the device back), and other kinds always are."""
    now = NOW
    with support.service(tmp_path) as service:
        applied: list[tuple[str, str, bool]] = []
        apply = service.ops.apply_inbound

        def recording(items: list[Inbound]) -> Applied:
            applied.extend(
                (i.device_id, getattr(i.message, "kind", type(i.message).__name__), i.contact)
                for i in items
            )
            return apply(items)

        service.ops.apply_inbound = recording  # type: ignore[method-assign]
        assert service.ingest.inbound is not None
        service.ingest.inbound._apply = recording
        with service.ops.session() as s:
            s.add_all(Device(id=d, resident_id=f"res-{d}") for d in ("dev-on", "dev-back"))
        for d in ("dev-on", "dev-back"):
            service.ingest.known.add(d)
        service.liveness.baseline("dev-on", now, online=True)
        service.liveness.baseline("dev-back", now - 600, online=False)

        def event(kind: EventKind) -> bytes:
            return encode(Event(ts=now, kind=kind, state=LockState.ARMED))

        for kind in (EventKind.STATE_CHANGED, EventKind.BOOT, EventKind.TOKEN_REFUSED):
            await service.ingest.handle(device_topic("dev-on", Channel.EVENT), event(kind))
        await service.ingest.handle(
            device_topic("dev-back", Channel.EVENT), event(EventKind.STATE_CHANGED)
        )
        await service.ingest.inbound.drain()
        assert applied == [
            ("dev-on", EventKind.TOKEN_REFUSED, False),
            ("dev-back", EventKind.STATE_CHANGED, True),
        ]
        assert service.liveness.is_online("dev-back")
        assert (
            service.metrics.registry.get_sample_value(
                "tillsyn_ingest_messages_total", {"channel": "event"}
            )
            == 4
        )


async def test_topics_of_registered_devices_skip_the_strict_parser_and_others_do_not(
    tmp_path: Path,
) -> None:
    """A registered device's topic is split without the strict parser; every other topic
    still goes through it and is rejected as before (bad topic, unknown device)."""
    now = NOW
    with support.service(tmp_path) as service:
        seen: list[tuple[str, str]] = []
        apply = service.ops.apply_inbound

        def recording(items: list[Inbound]) -> Applied:
            seen.extend((i.device_id, type(i.message).__name__) for i in items)
            return apply(items)

        assert service.ingest.inbound is not None
        service.ingest.inbound._apply = recording

        def count(name: str, **labels: str) -> float:
            return service.metrics.registry.get_sample_value(name, labels) or 0.0

        with service.ops.session() as s:
            s.add(Device(id="dev-ok", resident_id="res-ok"))
        service.ingest.known.add("dev-ok")
        service.liveness.baseline("dev-ok", now, online=True)
        event = encode(Event(ts=now, kind=EventKind.TOKEN_REFUSED, state=LockState.LOCKED))
        await service.ingest.handle("tillsyn/v1/dev/dev-ok/event", event)
        await service.ingest.handle("tillsyn/v1/dev/dev-nope/event", event)
        for bad in (
            "tillsyn/v1/dev/dev-ok/extra/event",
            "tillsyn/v1/dev/dev-ok/nonsense",
            "tillsyn/v2/dev/dev-ok/event",
            "tillsyn/v1/dev//event",
        ):
            await service.ingest.handle(bad, event)
        await service.ingest.handle("tillsyn/v1/dev/dev-ok/cmd", b"x")
        await service.ingest.inbound.drain()
        assert seen == [("dev-ok", "Event")]
        assert count("tillsyn_ingest_messages_total", channel="event") == 2
        assert count("tillsyn_ingest_rejected_total", channel="event", why="unknown_device") == 1
        assert count("tillsyn_ingest_rejected_total", channel="unknown", why="bad_topic") == 4
        assert count("tillsyn_ingest_rejected_total", channel="cmd", why="unexpected") == 1
