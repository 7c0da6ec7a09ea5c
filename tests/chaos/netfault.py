"""A fault-injecting TCP proxy on loopback, between agents and the broker (test-only).

Inside one TCP stream bytes cannot be lost, duplicated or reordered: the kernel
retransmits and reorders for the application. What a lossy link does to an application
is *delay*: a lost segment stalls everything behind it until it is retransmitted
(head-of-line blocking, 200 ms and more). So the proxy models

- ``delay_s`` / ``jitter_s``: every chunk is forwarded that much later, order kept;
- ``loss``: with this probability a chunk (and everything behind it) waits a
  retransmission timeout, ``rto_s`` doubled for each consecutive loss;
- ``blackhole``: forward nothing more in either direction and close nothing: a
  half-open connection (NAT timeout, a cable pulled between two routers), which only a
  keepalive can find;
- ``cut``: close every connection and refuse new ones (a network segment goes down).

Duplicated and reordered *messages* are an MQTT matter (a QoS 1 re-delivery, a resent
command overtaken by a newer one); the chaos tests produce those through the broker.
Faults apply per direction to every connection of the proxy; ``blackhole_now`` applies
to the connections open at the time only, so a reconnect gets a working link (as after
a NAT entry expired).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field

CHUNK = 65536


@dataclass
class Faults:
    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    rto_s: float = 0.2
    cut: bool = False


@dataclass(eq=False)  # identity: a connection is only ever itself
class _Conn:
    tasks: list[asyncio.Task[None]]
    writers: list[asyncio.StreamWriter]
    peer_port: int
    blackholed: asyncio.Event = field(default_factory=asyncio.Event)


class FaultProxy:
    def __init__(self, target_port: int, *, seed: int = 7, host: str = "127.0.0.1") -> None:
        self.target_port = target_port
        self.host = host
        self.faults = Faults()
        self.rng = random.Random(seed)
        self.port = 0
        self.stalls = 0  # chunks that waited a retransmission timeout
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.disconnect_all()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def disconnect_all(self) -> None:
        for conn in list(self._conns):
            self._drop(conn)

    def blackhole_now(self) -> int:
        """Make every open connection half-open; returns how many."""
        for conn in self._conns:
            conn.blackholed.set()
        return len(self._conns)

    def blackhole_peer(self, port: int) -> bool:
        """Half-open the connection from this client port (a device losing power: no FIN
        ever reaches the broker)."""
        for conn in self._conns:
            if conn.peer_port == port:
                conn.blackholed.set()
                return True
        return False

    def set_cut(self, cut: bool) -> None:
        self.faults.cut = cut
        if cut:
            self.disconnect_all()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.faults.cut:
            writer.close()
            return
        try:
            up_r, up_w = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.close()
            return
        self.accepted += 1
        conn = _Conn([], [writer, up_w], writer.get_extra_info("peername")[1])
        conn.tasks = [
            asyncio.create_task(self._pump(reader, up_w, conn)),
            asyncio.create_task(self._pump(up_r, writer, conn)),
        ]
        self._conns.add(conn)

    def _drop(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        for task in conn.tasks:
            task.cancel()
        for w in conn.writers:
            with contextlib.suppress(Exception):
                w.close()

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, conn: _Conn
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                at, data = await queue.get()
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if conn.blackholed.is_set():
                    continue  # swallowed: nobody closes anything
                dst.write(data)
                await dst.drain()

        sender = asyncio.create_task(deliver())
        ready_at = 0.0  # TCP keeps order: nothing overtakes a stalled chunk
        losses = 0
        try:
            while True:
                data = await src.read(CHUNK)
                if not data:
                    break
                if conn.blackholed.is_set():
                    continue
                f = self.faults
                at = loop.time() + f.delay_s + self.rng.uniform(0, f.jitter_s)
                if f.loss and self.rng.random() < f.loss:
                    losses += 1
                    self.stalls += 1
                    at += f.rto_s * 2 ** min(losses - 1, 4)
                else:
                    losses = 0
                ready_at = max(ready_at, at)
                queue.put_nowait((ready_at, data))
            # Orderly close from this side: pass it on once the data before it went out.
            while not queue.empty() and not conn.blackholed.is_set():
                await asyncio.sleep(0.05)
            if not conn.blackholed.is_set():
                self._drop(conn)
        except (ConnectionError, OSError):
            if not conn.blackholed.is_set():
                self._drop(conn)
        finally:
            sender.cancel()
