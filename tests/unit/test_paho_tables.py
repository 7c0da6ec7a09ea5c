"""paho's Properties with shared tables behave as paho's own (tillsyn_protocol.paho_tables)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from paho.mqtt.exception import MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tillsyn_protocol import paho_tables

paho_tables.install()


def new(packet_type: int) -> Any:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


PACKET_TYPES = [
    PacketTypes.CONNECT,
    PacketTypes.CONNACK,
    PacketTypes.PUBLISH,
    PacketTypes.PUBACK,
    PacketTypes.SUBSCRIBE,
    PacketTypes.DISCONNECT,
]


@pytest.mark.parametrize("module", ["fleet.mqtt", "firmware_agent.link"])
def test_the_fleet_and_the_agent_install_it(module: str) -> None:
    code = (
        f"import {module}\n"
        "from paho.mqtt.properties import Properties\n"
        "assert Properties(3).names is Properties(4).names\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("packet_type", PACKET_TYPES)
def test_tables_are_paho_s_own(packet_type: int) -> None:
    mine, theirs = new(packet_type), paho_tables.original(packet_type)
    assert mine.packetType == theirs.packetType
    assert list(mine.types) == theirs.types
    assert dict(mine.names) == theirs.names
    assert dict(mine.properties) == theirs.properties


def test_shared_tables_cannot_be_written() -> None:
    props: Any = new(PacketTypes.PUBLISH)
    with pytest.raises(TypeError):
        props.names["Made Up"] = 99
    assert "Made Up" not in new(PacketTypes.PUBLISH).names


def _publish_props(shared: bool) -> Any:
    props: Any = new(PacketTypes.PUBLISH) if shared else paho_tables.original(3)
    props.MessageExpiryInterval = 90
    props.ContentType = "application/jwt"
    props.UserProperty = [("a", "1"), ("b", "2")]
    return props


def test_packs_and_unpacks_the_same_bytes() -> None:
    mine, theirs = _publish_props(True), _publish_props(False)
    assert mine.pack() == theirs.pack()
    decoded: Any = new(PacketTypes.PUBLISH)
    decoded.unpack(theirs.pack())
    assert decoded.MessageExpiryInterval == 90
    assert decoded.ContentType == "application/jwt"
    assert decoded.UserProperty == [("a", "1"), ("b", "2")]
    assert decoded.json() == theirs.json()


def test_validation_is_unchanged() -> None:
    props: Any = new(PacketTypes.PUBLISH)
    with pytest.raises(MQTTException, match="does not apply"):
        props.SessionExpiryInterval = 10  # a CONNECT property
    with pytest.raises(MQTTException, match="must be one of"):
        props.NoSuchThing = 1


def test_clear_removes_what_paho_s_own_clear_removes() -> None:
    mine, theirs = _publish_props(True), _publish_props(False)
    mine.clear()
    paho_tables.ORIGINAL_CLEAR(theirs)
    assert mine.json() == theirs.json() == {}
    assert (mine.packetType, dict(mine.names)) == (theirs.packetType, theirs.names)
    # Unpacking into a used instance leaves only what the packet carries.
    reused = _publish_props(True)
    other: Any = new(PacketTypes.PUBLISH)
    other.ContentType = "text/plain"
    reused.unpack(other.pack())
    assert reused.json() == {"ContentType": "text/plain"}
