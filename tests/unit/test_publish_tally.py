"""MqttLink.publish: one wake-up per call, the count of publishes the broker acknowledged in
order, and a wait that gives up only after PUBLISH_TIMEOUT_S without progress.

The network thread is replaced by a stand-in that acknowledges from a thread of its own, as
the real one does (tests/integration exercise the real thread against Mosquitto)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from fleet import mqtt
from fleet.mqtt import MqttLink, _Out
from fleet.outbound import Publish


class FakeNet:
    def __init__(self, ack: Callable[[list[_Out]], None]) -> None:
        self.up = True
        self.calls = 0
        self._ack = ack

    def publish_many(self, items: list[_Out]) -> None:
        self.calls += 1
        threading.Thread(target=self._ack, args=(items,), daemon=True).start()


def _link(net: FakeNet) -> MqttLink:
    link = MqttLink.__new__(MqttLink)
    link._net = net  # type: ignore[assignment]
    link._loop = asyncio.get_running_loop()
    return link


def _items(n: int) -> list[Publish]:
    return [Publish(f"tillsyn/v1/dev/d{i}/cmd", b"x", qos=1) for i in range(n)]


async def test_all_acknowledged() -> None:
    net = FakeNet(lambda outs: [o.done(True) for o in reversed(outs)])
    assert await _link(net).publish(_items(500)) == 500
    assert net.calls == 1  # one hand-over for the whole batch


async def test_counts_up_to_the_first_failure() -> None:
    net = FakeNet(lambda outs: [o.done(i != 3) for i, o in enumerate(outs)])
    assert await _link(net).publish(_items(10)) == 3


async def test_gives_up_after_the_timeout_without_progress(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mqtt, "PUBLISH_TIMEOUT_S", 0.2)

    def first_two(outs: list[_Out]) -> None:
        outs[0].done(True)
        outs[1].done(True)  # and then nothing

    started = time.monotonic()
    assert await _link(FakeNet(first_two)).publish(_items(5)) == 2
    assert time.monotonic() - started < 5


async def test_keeps_waiting_while_acknowledgements_trickle_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mqtt, "PUBLISH_TIMEOUT_S", 0.2)

    def slowly(outs: list[_Out]) -> None:
        for o in outs:
            time.sleep(0.08)
            o.done(True)

    assert await _link(FakeNet(slowly)).publish(_items(8)) == 8  # 0.64 s in all


async def test_nothing_to_send() -> None:
    net = FakeNet(lambda outs: None)
    assert await _link(net).publish([]) == 0
    assert net.calls == 0
