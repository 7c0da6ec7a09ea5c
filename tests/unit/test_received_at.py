"""Ingest's bookkeeping of a device message: dated when the network thread receives it,
not when the event loop or the database thread gets to it (an ack's ``acked_at`` is the
device's round trip, whatever the fleet's own queues add in a storm); and a device's
return that the database did not take is tried again."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from prometheus_client import CollectorRegistry
from sqlalchemy.exc import OperationalError
from sqlmodel import select

from fleet.batch import Applied, Inbound
from fleet.metrics import FleetMetrics
from fleet.models import Command, CommandStatus, Connectivity, Device
from fleet.mqtt import MqttLink
from fleet.service import FleetService
from tests.unit import service_support as support
from tests.unit.service_support import NOW
from tillsyn_protocol import (
    Ack,
    AckResult,
    Channel,
    CommandKind,
    LockState,
    Status,
    device_topic,
    encode,
)

HEARTBEAT = encode(support.heartbeat())


async def test_the_network_thread_stamps_each_message_with_the_links_clock(
    tmp_path: Path,
) -> None:
    ticks = iter([NOW + 1, NOW + 2])

    async def nothing(batch: list[tuple[str, bytes, float]]) -> None:
        return None

    link = MqttLink(
        support.settings(tmp_path),
        FleetMetrics(CollectorRegistry()),
        nothing,
        clock=lambda: next(ticks),
    )
    link._loop = asyncio.get_running_loop()
    link._inbound("tillsyn/v1/dev/dev-aa/ack", b"a")  # what the network thread calls
    link._inbound("tillsyn/v1/dev/dev-aa/state", b"s")
    assert list(link._inbox) == [
        ("tillsyn/v1/dev/dev-aa/ack", b"a", NOW + 1),
        ("tillsyn/v1/dev/dev-aa/state", b"s", NOW + 2),
    ]


async def test_an_ack_is_recorded_at_the_time_it_was_received(tmp_path: Path) -> None:
    later = NOW + 30  # the event loop got to it half a minute after it came in
    with support.service(tmp_path, later, Device(id="dev-aa", resident_id="res-aa")) as service:
        with service.ops.session() as s:
            s.add(
                Command(
                    jti="j-1",
                    device_id="dev-aa",
                    seq=1,
                    kind=CommandKind.ARM,
                    token="t",
                    created_at=NOW,
                    expires_at=NOW + 600,
                    attempts=1,
                    last_sent_at=NOW,
                )
            )
        service.liveness.baseline("dev-aa", NOW, online=True)
        ack = Ack(jti="j-1", ts=NOW + 2, result=AckResult.APPLIED, state=LockState.ARMED)
        await service.ingest.handle_batch(
            [(device_topic("dev-aa", Channel.ACK), encode(ack), NOW + 2)]
        )
        assert service.ingest.inbound is not None
        await service.ingest.inbound.drain()
        with service.ops.session() as s:
            command = s.exec(select(Command)).one()
        assert (command.status, command.acked_at) == (CommandStatus.APPLIED, NOW + 2)


def _fail(service: FleetService, times: int) -> None:
    """The next ``times`` attempts at a batch of device messages fail as a whole."""
    assert service.ingest.inbound is not None
    apply = service.ingest.inbound._apply
    failures = iter([True] * times)

    def flaky(items: list[Inbound]) -> Applied:
        if next(failures, False):
            raise OperationalError("BEGIN", {}, Exception("disk I/O error"))
        return apply(items)

    service.ingest.inbound._apply = flaky


async def test_a_come_back_the_database_did_not_take_is_tried_again(tmp_path: Path) -> None:
    """A device's return whose batch failed as a whole (database down, twice) is forgotten
    in memory as well: its next heartbeat is not taken for routine by the network thread
    but brings it back, so memory and database never disagree for good."""
    offline = Device(id="dev-aa", resident_id="res-aa", connectivity=Connectivity.OFFLINE)
    with support.service(tmp_path, NOW, offline) as service:
        assert service.ingest.inbound is not None
        _fail(service, 2)  # the batch and its retry
        service.liveness.baseline("dev-aa", NOW - 600, online=False)
        topic = device_topic("dev-aa", Channel.HB)
        assert not service.ingest.heartbeat_fast(topic, HEARTBEAT)  # coming back: the loop's
        await service.ingest.handle(topic, HEARTBEAT, NOW)
        await service.ingest.inbound.drain()
        assert not service.liveness.is_online("dev-aa")  # not written: not online in memory
        assert not service.ingest.heartbeat_fast(topic, HEARTBEAT)  # the next: the loop's
        await service.ingest.handle(topic, HEARTBEAT, NOW + 1)
        await service.ingest.inbound.drain()
        with service.ops.session() as s:
            device = s.get(Device, "dev-aa")
            assert device is not None and device.connectivity is Connectivity.ONLINE
        assert service.liveness.is_online("dev-aa")
        assert service.ingest.heartbeat_fast(topic, HEARTBEAT)  # routine again


async def test_a_last_will_the_database_did_not_take_leaves_the_device_to_silence(
    tmp_path: Path,
) -> None:
    """A Last Will whose batch failed as a whole: the database still says online, so the
    device is watched for silence again (from now), and a dead one still gets its visit."""
    online = Device(id="dev-aa", resident_id="res-aa", connectivity=Connectivity.ONLINE)
    with support.service(tmp_path, NOW, online) as service:
        assert service.ingest.inbound is not None
        _fail(service, 2)
        service.liveness.baseline("dev-aa", NOW - 5, online=True)
        will = encode(Status(status="offline", ts=NOW, boot_id="b1"))
        await service.ingest.handle(device_topic("dev-aa", Channel.STATUS), will, NOW)
        await service.ingest.inbound.drain()
        assert service.liveness.is_online("dev-aa")  # silence detection has it again
        assert service.liveness.silent() == []  # counted from now, not from long ago
        threshold = service.liveness.threshold_s
        service.liveness.mono = lambda: time.monotonic() + threshold + 1
        assert [d for d, _ in service.liveness.silent()] == ["dev-aa"]
