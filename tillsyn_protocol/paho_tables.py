"""paho-mqtt's MQTT v5 ``Properties`` without rebuilding their lookup tables per packet.

paho 2.2.0's ``Properties.__init__`` builds a 27-entry name table and a 25-entry property
table (with 25 ``list.index`` calls) for every instance, and paho makes one for every
PUBLISH it decodes and one or two for every PUBACK it reads: 6.8 % of the fleet's CPU in
a 10,000-device window start storm (py-spy), and the same per message in every agent.
The tables are constants that instances only read, so :func:`install` makes every
instance share one read-only set. And ``Properties.unpack`` first calls ``clear``, which
tries ``hasattr`` on all 27 property names (26 failed lookups, each an exception, on a
fresh instance): 3 % of the fleet's CPU in the same storm; the installed ``clear`` deletes
the same attributes by looking at those the instance has.

Nothing here opens a socket; it lives in the shared package because the fleet and the
agent both use paho (the one transport module of each calls it).
``tests/unit/test_paho_tables.py`` holds the shared tables to paho's own and the packets
to the same bytes.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

_ORIGINAL_INIT = Properties.__init__
ORIGINAL_CLEAR = Properties.clear  # (the tests compare)


def tables() -> tuple[tuple[str, ...], MappingProxyType[str, int], MappingProxyType[int, Any]]:
    """paho's own tables, as its constructor builds them, frozen."""
    proto = original(PacketTypes.PUBLISH)
    return tuple(proto.types), MappingProxyType(proto.names), MappingProxyType(proto.properties)


def install() -> None:
    """Make ``Properties()`` share the tables (idempotent)."""
    if getattr(Properties, "_tillsyn_shared", False):
        return
    types, names, props = tables()
    compressed = frozenset(name.replace(" ", "") for name in names)

    def __init__(self: Properties, packetType: int) -> None:
        # Properties.__setattr__ passes these four through; object's is the same, faster.
        object.__setattr__(self, "packetType", packetType)
        object.__setattr__(self, "types", types)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "properties", props)

    def clear(self: Properties) -> None:
        for name in [n for n in self.__dict__ if n in compressed]:
            object.__delattr__(self, name)

    Properties.__init__ = __init__  # type: ignore[method-assign]
    Properties.clear = clear  # type: ignore[method-assign]
    Properties._tillsyn_shared = True  # type: ignore[attr-defined]


def original(packet_type: int) -> Properties:
    """An instance made by paho's own constructor (the tables' source; the tests')."""
    obj = Properties.__new__(Properties)
    _ORIGINAL_INIT(obj, packet_type)  # type: ignore[no-untyped-call]
    return obj
