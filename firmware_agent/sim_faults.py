"""What the simulator's faults act on: a per-device network link, and a clock that drifts.

Each simulated device's MQTT connection goes through an in-process relay (unless the
simulator runs ``--direct``): the agent's TCP connect (link.TcpOpener) is replaced by a
socket pair whose other end the event loop copies to and from a real TCP connection to
the broker. TLS stays end to end (the relay copies ciphertext), and a fault is a switch
on the relay:

- ``pause``: nothing crosses either way and nothing is closed, so only keepalives can
  tell (a dropped network, or a hung device whose socket stays open);
- ``cut``: the broker side is closed with no MQTT DISCONNECT, so the broker publishes the
  device's Last Will (a device that lost power);
- ``down``: new connections fail at once with ENETUNREACH (the device's link is down).

Each relayed connection costs three descriptors (device end, relay end, broker socket);
run several simulator processes for thousands of devices (RLIMIT_NOFILE is per process).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from dataclasses import dataclass

from tillsyn_protocol import Clock

from .link import open_tcp

__all__ = ["DriftClock", "Link"]

_CHUNK = 65536


@dataclass(eq=False)
class _Relay:
    inner: socket.socket  # our end of the pair whose other end paho holds
    upstream: socket.socket  # TCP to the broker
    task: asyncio.Task[None] | None = None


class Link:
    """One device's network: relays its connections and can pause, cut or take them down."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, host: str, port: int, *, timeout_s: float = 10.0
    ) -> None:
        self._loop = loop
        self._addr = (host, port)
        self._timeout_s = timeout_s
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._relays: set[_Relay] = set()
        self.down = False

    @property
    def paused(self) -> bool:
        return not self._flowing.is_set()

    @property
    def connections(self) -> int:
        return len(self._relays)

    async def open(self) -> socket.socket:
        """The agent's TCP connection (link.TcpOpener): the device's end of a socket pair
        whose other end is relayed to a real TCP connection to the broker."""
        if self.down:
            raise OSError(errno.ENETUNREACH, "network is unreachable (simulated)")
        upstream = await open_tcp(*self._addr, limit_s=self._timeout_s)
        try:
            device_end, inner = socket.socketpair()
        except BaseException:
            upstream.close()
            raise
        device_end.setblocking(False)
        inner.setblocking(False)
        relay = _Relay(inner, upstream)
        self._relays.add(relay)
        relay.task = asyncio.create_task(self._relay(relay))
        return device_end

    async def _relay(self, relay: _Relay) -> None:
        pumps = [
            asyncio.create_task(self._pump(relay.inner, relay.upstream)),
            asyncio.create_task(self._pump(relay.upstream, relay.inner)),
        ]
        try:
            # One direction ended: close the whole connection, as the far end would see it.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            # Closed only once the pumps are gone: a socket closed while the loop still
            # watches its descriptor could unregister a new socket that reused the number.
            await asyncio.gather(*pumps, return_exceptions=True)
            self._relays.discard(relay)
            for sock in (relay.inner, relay.upstream):
                sock.close()

    async def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = await self._loop.sock_recv(src, _CHUNK)
                # Held here while paused: bytes (and an end of stream) cross only when the
                # network is back, as TCP retransmits after an outage.
                await self._flowing.wait()
                if not data:
                    return
                await self._loop.sock_sendall(dst, data)

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def cut(self) -> None:
        """Close every connection now, forwarding nothing that is still held."""
        tasks = [r.task for r in self._relays if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class DriftClock:
    """A device clock that is wrong on purpose: wall time off by ``offset_s`` plus
    ``rate_ppm`` millionths of the time since :meth:`set`. Monotonic time is untouched (a
    real drifting RTC skews the wall clock; the agent's deadlines also run on monotonic)."""

    def __init__(self) -> None:
        self.offset_s = 0.0
        self.rate_ppm = 0.0
        self._since = time.monotonic()

    def set(self, offset_s: float, rate_ppm: float = 0.0) -> None:
        self.offset_s, self.rate_ppm, self._since = offset_s, rate_ppm, time.monotonic()

    @property
    def drifting(self) -> bool:
        return self.offset_s != 0.0 or self.rate_ppm != 0.0

    def now(self) -> Clock:
        mono = time.monotonic()
        drift = self.offset_s + (mono - self._since) * self.rate_ppm * 1e-6
        return Clock(wall=time.time() + drift, mono=mono, synced=True)
