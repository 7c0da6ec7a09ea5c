"""Running and controlling the simulator: the line protocol, and several processes.

One command per line, one JSON line back (on stdout, or on the TCP connection it came
from with ``--control-port``, which listens on 127.0.0.1 only)::

    status                              counts: devices, connected, down by fault, connects
    list                                every device: connected, fault, drift, boots
    die|off|hang|drop|unplug TARGET...  see firmware_agent/sim.py
    drift SECONDS[:PPM] TARGET...       wall clock off by SECONDS, drifting PPM per million
    recover TARGET...                   undo every fault of the targets
    stop                                stop every device cleanly and exit

A TARGET is a device id, a number N (N random devices the command can act on) or ``all``.
A fault's reply names each device it hit and the epoch time it did, e.g.
``{"ok": true, "cmd": "die", "applied": {"dev-sim-000004": 1795000000.123}}``; an
unparsable line gets ``{"ok": false, "error": "..."}``. Once every device has connected
the simulator prints ``{"event": "ready", ...status}``.

With ``processes > 1`` the devices are split into that many worker processes (each runs
this same loop, reading its settings as the first line on stdin) and the parent routes
each command to the workers owning its targets and merges their replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import random
import signal
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from .sim import Fault, SimSettings, Simulator, raise_nofile

__all__ = ["Command", "Coordinator", "LocalBackend", "parse_command", "serve", "worker_main"]

log = logging.getLogger(__name__)

_FAULTS = {f.value: f for f in Fault}
_COMMANDS = {"status", "list", "stop", "recover", *_FAULTS}
# The agents' executor work: saving the command sequence (asyncio.to_thread). Connecting
# needs none (link.open_tls, link._Client); it took 32 threads per process once.
_EXECUTOR_THREADS = 4
_REPLY_TIMEOUT_S = 120.0
# Middle-generation collections between full ones once the agents are frozen (CPython's
# default 10; see LocalBackend.wait_ready).
_FULL_GC_EVERY = 1000


@dataclass(frozen=True)
class Command:
    name: str
    ids: list[str] = field(default_factory=list)
    count: int = 0
    all: bool = False
    offset_s: float = 0.0
    rate_ppm: float = 0.0

    @property
    def fault(self) -> Fault | None:
        return _FAULTS.get(self.name)

    def line(self, ids: list[str] | None = None, count: int | None = None) -> str:
        """This command as a line, optionally for other targets (for a worker)."""
        parts = [self.name]
        if self.name == "drift":
            parts.append(f"{self.offset_s}:{self.rate_ppm}")
        if self.all:
            parts.append("all")
        else:
            parts += ids if ids is not None else self.ids
            n = self.count if count is None else count
            if n:
                parts.append(str(n))
        return " ".join(parts)


def parse_command(line: str) -> Command:
    words = line.split()
    if not words or words[0] not in _COMMANDS:
        raise ValueError(f"unknown command {words[0] if words else ''!r}")
    name, args = words[0], words[1:]
    if name in {"status", "list", "stop"}:
        if args:
            raise ValueError(f"{name} takes no arguments")
        return Command(name)
    offset_s = rate_ppm = 0.0
    if name == "drift":
        if not args:
            raise ValueError("drift SECONDS[:PPM] TARGET...")
        first, _, ppm = args.pop(0).partition(":")
        offset_s, rate_ppm = float(first), float(ppm or 0)
    ids: list[str] = []
    count, everything = 0, False
    for arg in args:
        if arg == "all":
            everything = True
        elif arg.isdigit():
            count += int(arg)
        elif arg.startswith("dev-"):
            ids.append(arg)
        else:
            raise ValueError(f"not a device id, count or 'all': {arg!r}")
    if not (ids or count or everything):
        raise ValueError(f"{name} needs a target: device ids, a count or 'all'")
    return Command(name, ids, count, everything, offset_s, rate_ppm)


class Backend(Protocol):
    async def start(self) -> None: ...

    async def wait_ready(self) -> dict[str, Any]: ...

    async def execute(self, cmd: Command) -> dict[str, Any]: ...

    async def stop(self) -> None: ...


class LocalBackend:
    """The devices of this process."""

    def __init__(self, settings: SimSettings) -> None:
        self.sim = Simulator(settings)

    async def start(self) -> None:
        await self.sim.start()

    async def wait_ready(self) -> dict[str, Any]:
        await self.sim.wait_connected(within_s=float("inf"))
        # The agents live as long as the process: keep them out of the cyclic GC's scans.
        # A device runs one agent; thousands in one heap made full collections cost the
        # simulator more CPU than its TLS handshakes in a reconnect storm (perf: ~45 %).
        gc.freeze()
        # CPython runs a full collection once the objects that survived young collections
        # since the last one reach a quarter of those that survived it; frozen objects do
        # not count, so after the freeze full collections came every ~70,000 allocations,
        # each scanning everything made since (a reconnect storm's new clients): 18 % of a
        # simulator process's CPU in a storm (py-spy --native). Make them rare again.
        gen0, gen1, _ = gc.get_threshold()
        gc.set_threshold(gen0, gen1, _FULL_GC_EVERY)
        return self.sim.status()

    async def execute(self, cmd: Command) -> dict[str, Any]:
        sim = self.sim
        if cmd.name == "status":
            return {"ok": True, "cmd": "status", **sim.status()}
        if cmd.name == "list":
            return {"ok": True, "cmd": "list", "devices": sim.listing()}
        if cmd.name == "stop":
            return {"ok": True, "cmd": "stop"}
        kind = cmd.fault
        if cmd.all:
            ids = list(sim.devices)
        else:
            ids = [i for i in cmd.ids if i in sim.devices] + sim.pick(kind, cmd.count)
        if kind is None:
            applied = await sim.recover(ids)
        else:
            applied = await sim.fault(kind, ids, offset_s=cmd.offset_s, rate_ppm=cmd.rate_ppm)
        return {"ok": True, "cmd": cmd.name, "applied": applied}

    async def stop(self) -> None:
        await self.sim.stop()


@dataclass
class _Worker:
    ids: set[str]
    proc: asyncio.subprocess.Process
    replies: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    ready: dict[str, Any] | None = None
    ready_event: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None


class Coordinator:
    """Devices split over worker processes (``python -c ...worker_main()``)."""

    def __init__(self, settings: SimSettings, processes: int) -> None:
        self.settings = settings
        ids = settings.device_ids
        # Dealt out in turn, not in contiguous ranges: the fleet works through devices in
        # id order (a window start's parts of 1,000), and with ranges the first parts all
        # went to one process while the others idled, then the last one got its 2,500
        # arms alone (real devices have a CPU each; one process must not be the tail).
        self._chunks = [c for c in (ids[n::processes] for n in range(processes)) if c]
        self._workers: list[_Worker] = []
        self._lock = asyncio.Lock()
        self._rng = random.Random(settings.seed)

    async def start(self) -> None:
        code = "from firmware_agent.sim_control import worker_main; worker_main()"
        for n, chunk in enumerate(self._chunks):
            settings = self.settings.model_copy(
                update={
                    "device_ids": chunk,
                    "seed": None if self.settings.seed is None else self.settings.seed + n,
                }
            )
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                code,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=2**26,  # a ``list`` reply of thousands of devices is one line
            )
            assert proc.stdin is not None
            proc.stdin.write(settings.model_dump_json().encode() + b"\n")
            await proc.stdin.drain()
            worker = _Worker(set(chunk), proc)
            worker.reader = asyncio.create_task(self._read(worker))
            self._workers.append(worker)

    async def _read(self, worker: _Worker) -> None:
        assert worker.proc.stdout is not None
        async for raw in worker.proc.stdout:
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            if message.get("event") == "ready":
                worker.ready = message
                worker.ready_event.set()
            elif "event" not in message:
                await worker.replies.put(message)
        await worker.replies.put({"ok": False, "error": "worker exited"})

    async def wait_ready(self) -> dict[str, Any]:
        for worker in self._workers:
            await worker.ready_event.wait()
        return _merge_status([w.ready or {} for w in self._workers])

    def _route(self, cmd: Command) -> list[tuple[_Worker, str]]:
        if cmd.name in {"status", "list", "stop"} or cmd.all:
            return [(w, cmd.line()) for w in self._workers]
        shares = Counter(
            self._rng.choices(
                range(len(self._workers)), [len(w.ids) for w in self._workers], k=cmd.count
            )
        )
        routed = []
        for n, worker in enumerate(self._workers):
            ids = [i for i in cmd.ids if i in worker.ids]
            if ids or shares[n]:
                routed.append((worker, cmd.line(ids, shares[n])))
        return routed

    async def execute(self, cmd: Command) -> dict[str, Any]:
        async with self._lock:
            routed = self._route(cmd)
            for worker, line in routed:
                assert worker.proc.stdin is not None
                worker.proc.stdin.write(line.encode() + b"\n")
                await worker.proc.stdin.drain()
            replies = [await asyncio.wait_for(w.replies.get(), _REPLY_TIMEOUT_S) for w, _ in routed]
        errors = [r["error"] for r in replies if not r.get("ok")]
        if errors:
            return {"ok": False, "cmd": cmd.name, "error": "; ".join(errors)}
        if cmd.name == "status":
            return {"ok": True, "cmd": "status", **_merge_status(replies)}
        if cmd.name == "stop":
            return {"ok": True, "cmd": "stop"}
        merged: dict[str, Any] = {}
        key = "devices" if cmd.name == "list" else "applied"
        for reply in replies:
            merged.update(reply.get(key, {}))
        return {"ok": True, "cmd": cmd.name, key: merged}

    async def stop(self) -> None:
        for worker in self._workers:
            if worker.proc.stdin is not None and worker.proc.returncode is None:
                with contextlib.suppress(OSError, RuntimeError):
                    worker.proc.stdin.write(b"stop\n")
                    await worker.proc.stdin.drain()
                    worker.proc.stdin.close()
        for worker in self._workers:
            try:
                await asyncio.wait_for(worker.proc.wait(), 60)
            except TimeoutError:
                worker.proc.kill()
                await worker.proc.wait()
            if worker.reader is not None:
                worker.reader.cancel()


def _merge_status(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key in {"ok", "cmd", "event"} or not isinstance(value, int | float):
                continue
            out[key] = max(out.get(key, 0), value) if key == "uptime_s" else out.get(key, 0) + value
    return out


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _stdin_lines(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None]) -> None:
    """Read stdin in a daemon thread: works for pipes, terminals and files alike."""

    def pump() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line)
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=pump, name="sim-stdin", daemon=True).start()


async def _answer(backend: Backend, line: str, stop: asyncio.Event) -> dict[str, Any]:
    try:
        cmd = parse_command(line)
    except ValueError as exc:
        return {"ok": False, "error": str(exc)}
    try:
        reply = await backend.execute(cmd)
    except Exception as exc:  # one bad command must not end the simulation
        log.exception("command %r failed", line.strip())
        return {"ok": False, "cmd": cmd.name, "error": f"{type(exc).__name__}: {exc}"}
    if cmd.name == "stop":
        stop.set()
    return reply


async def serve(
    backend: Backend,
    *,
    control_port: int | None = None,
    exit_on_eof: bool = False,
    duration_s: float = 0.0,
) -> None:
    """Start ``backend``, answer commands (stdin, TCP) until stopped, then stop it."""
    loop = asyncio.get_running_loop()
    raise_nofile()
    loop.set_default_executor(ThreadPoolExecutor(_EXECUTOR_THREADS, thread_name_prefix="sim"))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await backend.start()

    async def announce() -> None:
        _emit({"event": "ready", **(await backend.wait_ready())})

    async def from_stdin() -> None:
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        _stdin_lines(loop, queue)
        while (line := await queue.get()) is not None:
            if line.strip():
                _emit(await _answer(backend, line, stop))
        if exit_on_eof:
            stop.set()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while line := (await reader.readline()).decode(errors="replace"):
                if line.strip():
                    reply = await _answer(backend, line, stop)
                    writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
                    await writer.drain()
        writer.close()

    tasks = [asyncio.create_task(announce()), asyncio.create_task(from_stdin())]
    server = None
    if control_port is not None:
        server = await asyncio.start_server(client, "127.0.0.1", control_port)
        log.info("control port 127.0.0.1:%d", control_port)
    try:
        if duration_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), duration_s)
        else:
            await stop.wait()
    finally:
        if server is not None:
            server.close()
        for task in tasks:
            task.cancel()
        await backend.stop()


def worker_main() -> None:
    """A worker process: settings on the first stdin line, then the line protocol."""
    settings = SimSettings.model_validate_json(sys.stdin.readline())
    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING, format="%(asctime)s %(name)s %(message)s"
    )
    asyncio.run(serve(LocalBackend(settings), exit_on_eof=True))
