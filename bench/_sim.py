"""Benchmark helpers: a fleet service process and a ``tillsyn sim`` process, both driven
the way an operator would (TOML config, command line, the simulator's control lines)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench._common import cpu_seconds, rss_kib
from broker.launcher import free_port
from broker.pki import PkiPaths
from fleet import signing

DEVICES_PER_PROCESS = 2500  # three descriptors per relayed device, 20,000 per process


def sim_processes(devices: int) -> int:
    # At least one per core: a simulator process handshakes at a few hundred per second.
    return max(2, math.ceil(devices / DEVICES_PER_PROCESS))


def niced(cmd: list[str], nice: int) -> list[str]:
    """``cmd`` run at CPU priority ``nice`` (unchanged for 0)."""
    return ["nice", "-n", str(nice), *cmd] if nice else cmd


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def table(rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


class FleetProcess:
    """``python -m tillsyn_cli fleet serve --config fleet.toml`` on SQLite."""

    def __init__(self, root: Path, pki: PkiPaths, broker_port: int, **settings: Any) -> None:
        self.root = root
        self.db = root / "fleet.db"
        self.database_url = f"sqlite:///{self.db}"
        self.key_file = root / "command-signing-key.pem"
        signing.load_or_create(self.key_file)  # the devices pin its public half
        self.public_key = signing.public_key_path(self.key_file)
        self.api_port = free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        values: dict[str, Any] = {
            "database_url": self.database_url,
            "broker_port": broker_port,
            "ca_file": str(pki.ca_cert),
            "cert_file": str(pki.fleet_cert),
            "key_file": str(pki.fleet_key),
            "signing_key_file": str(self.key_file),
            "api_port": self.api_port,
            **settings,
        }
        self.toml = root / "fleet.toml"
        self.toml.write_text(
            "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items() if v is not None)
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready_timeout: float = 900) -> FleetProcess:
        log = (self.root / "fleet.log").open("ab")
        cmd = [sys.executable, "-m", "tillsyn_cli", "fleet", "serve", "--config", str(self.toml)]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                if httpx.get(f"{self.api}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"fleet did not become ready (log: {self.root / 'fleet.log'})")
            time.sleep(0.2)

    def wait_idle(self, cpu_per_s: float = 0.05, timeout: float = 600) -> None:
        """Until the start-up work (the first full reconcile) is over."""
        deadline = time.monotonic() + timeout
        prev = cpu_seconds(self.pid)
        while time.monotonic() < deadline:
            time.sleep(1)
            now = cpu_seconds(self.pid)
            if now - prev < cpu_per_s:
                return
            prev = now

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by its full name with labels."""
        out: dict[str, float] = {}
        for line in httpx.get(f"{self.api}/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class SimProcess:
    """``python -m tillsyn_cli sim ...`` with its control lines on stdin/stdout."""

    def __init__(
        self,
        root: Path,
        pki: PkiPaths,
        broker_port: int,
        command_key: Path,
        devices: int,
        *args: str,
    ) -> None:
        self.root = root
        # Per-device seq stores on tmpfs: thousands of fsyncs must not be the benchmark.
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self._state = tempfile.TemporaryDirectory(prefix="tillsyn-bench-sim-", dir=shm)
        self.processes = sim_processes(devices)
        self.cmd = [
            sys.executable,
            "-m",
            "tillsyn_cli",
            "sim",
            "--devices",
            str(devices),
            "--pki-dir",
            str(pki.directory),
            "--broker-port",
            str(broker_port),
            "--command-key",
            str(command_key),
            "--state-dir",
            self._state.name,
            "--processes",
            str(self.processes),
            *args,
        ]
        self.proc: subprocess.Popen[str] | None = None
        self.ready: dict[str, Any] | None = None

    def start(self, *, nice: int = 0) -> SimProcess:
        """``nice`` > 0 lowers the simulator's CPU priority: it stands in for devices that
        each have their own CPU, and on a shared 2-core machine its threads would otherwise
        take CPU time from the process under test."""
        log = (self.root / "sim.log").open("a")
        cmd = niced(self.cmd, nice)
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
        )
        return self

    def _line(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"simulator exited (log: {self.root / 'sim.log'})")
        message: dict[str, Any] = json.loads(line)
        if message.get("event") == "ready":
            self.ready = message
        return message

    def wait_ready(self) -> dict[str, Any]:
        while self.ready is None:
            self._line()
        return self.ready

    def command(self, line: str) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        while True:
            message = self._line()
            if "event" not in message:
                return message

    def pids(self) -> list[int]:
        """The simulator's processes (the parent and its workers)."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [self.proc.pid, *(int(p) for p in children.read_text().split())]

    def cpu(self) -> float:
        """CPU seconds of all its processes."""
        return sum(cpu_seconds(pid) for pid in self.pids())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.command("stop")
                self.proc.wait(120)
            except (OSError, SystemExit, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        self._state.cleanup()
