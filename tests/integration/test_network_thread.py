"""The fleet's MQTT network thread against the real broker: every byte of a burst parsed
correctly through the read-ahead, and a consumer that stops reading for longer than two
keepalive intervals keeps its connection and reports how far behind it is."""

from __future__ import annotations

import ssl
import time
import uuid
from collections.abc import Callable, Iterator

import paho.mqtt.client as mqtt
import pytest

from broker.launcher import MosquittoProcess
from broker.pki import PkiPaths
from fleet.mqtt import READ_AHEAD, LinkConfig, NetworkThread, client_tls_context

pytestmark = pytest.mark.integration


def _wait(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


class Sub:
    """A NetworkThread on this test's own topics, recording what it gets."""

    def __init__(self, pki: PkiPaths, port: int, prefix: str, keepalive_s: int = 30) -> None:
        self.prefix = prefix
        self.got: list[tuple[str, bytes]] = []
        self.states: list[bool] = []
        self.paused = False
        self.net = NetworkThread(
            LinkConfig(
                host="127.0.0.1",
                port=port,
                client_id=f"test-net-{uuid.uuid4().hex[:8]}",
                tls=client_tls_context(str(pki.ca_cert), str(pki.fleet_cert), str(pki.fleet_key)),
                subscriptions=(f"{prefix}/#",),
                persistent=False,
                keepalive_s=keepalive_s,
            ),
            on_message=lambda t, p: self.got.append((t, p)),
            on_state=self.states.append,
            paused=lambda: self.paused,
        )


@pytest.fixture
def sub_factory(pki_dir: PkiPaths, mosquitto: MosquittoProcess) -> Iterator[Callable[..., Sub]]:
    made: list[Sub] = []

    def make(**kw: int) -> Sub:
        sub = Sub(pki_dir, mosquitto.port, f"tillsyn/v1/test/{uuid.uuid4().hex[:8]}", **kw)
        sub.net.start()
        assert _wait(lambda: sub.net.up), "network thread did not connect"
        made.append(sub)
        return sub

    yield make
    for sub in made:
        sub.net.stop()


@pytest.fixture
def publisher(pki_dir: PkiPaths, mosquitto: MosquittoProcess) -> Iterator[mqtt.Client]:
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-pub-{uuid.uuid4().hex[:8]}"
    )
    ctx = ssl.create_default_context(cafile=str(pki_dir.ca_cert))
    ctx.load_cert_chain(pki_dir.fleet_cert, pki_dir.fleet_key)
    client.tls_set_context(ctx)
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    yield client
    client.loop_stop()
    client.disconnect()


def _payload(i: int) -> bytes:
    # Sizes from a few bytes to well past a TLS record (16 KB): packets straddle every
    # boundary of the read-ahead buffer.
    size = (i * 7919) % 3000 if i % 50 else 40_000 + i
    return f"{i:06d}:".encode() + bytes((i + k) % 251 for k in range(size))


def test_a_burst_is_parsed_exactly_in_order(sub_factory: Callable[..., Sub], publisher) -> None:
    sub = sub_factory()
    sent = [(f"{sub.prefix}/m/{i % 7}", _payload(i)) for i in range(3000)]
    assert sum(len(p) for _, p in sent) > 4 * READ_AHEAD
    infos = [publisher.publish(t, p, qos=1) for t, p in sent]
    for info in infos:
        info.wait_for_publish(30)
    assert _wait(lambda: len(sub.got) >= len(sent), 60), f"{len(sub.got)} of {len(sent)}"
    assert sub.got == sent  # one publisher, QoS 1: the broker keeps the order
    assert _wait(lambda: sub.net.lag() == 0.0, 5)
    assert sub.states == [True]


def test_a_paused_consumer_keeps_its_connection_and_reports_its_lag(
    sub_factory: Callable[..., Sub], publisher
) -> None:
    sub = sub_factory(keepalive_s=2)
    sub.paused = True
    time.sleep(1.2)  # the thread sees it at its next pass (select waits up to 1 s)
    for i in range(200):
        publisher.publish(f"{sub.prefix}/hb", _payload(i), qos=1)
    # Paused for three keepalive intervals: paho alone would call the link dead after two.
    time.sleep(6.5)
    assert sub.net.up and sub.states == [True]
    assert sub.got == []
    assert sub.net.lag() >= 5.0  # the broker's data has waited that long
    sub.paused = False
    assert _wait(lambda: len(sub.got) == 200), len(sub.got)
    assert _wait(lambda: sub.net.lag() == 0.0, 5)
    assert sub.states == [True]  # never reconnected: nothing lost, nothing re-sent


def test_lag_is_zero_when_idle(sub_factory: Callable[..., Sub]) -> None:
    sub = sub_factory(keepalive_s=2)
    time.sleep(2.5)  # a keepalive round trip, nothing else
    assert sub.net.lag() == 0.0
    assert sub.states == [True]


def test_lag_reads_zero_while_the_link_is_down() -> None:
    """Down, there is nothing to be behind on: the lost link is its own alarm."""
    net = NetworkThread(
        LinkConfig(
            host="127.0.0.1",
            port=1,
            client_id="x",
            tls=ssl.create_default_context(),
            subscriptions=("x",),
        ),
        on_message=lambda _t, _p: None,
    )
    net._behind_since = time.monotonic() - 100  # as left by a session that ended
    assert net.lag() == 0.0
