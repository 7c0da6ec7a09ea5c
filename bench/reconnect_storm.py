"""Reconnect storm: the broker restarts under N connected devices; time until 99 % of them
are connected again and the peak connections per second, against what the broker's
handshake rate allows: the rate of a bare connect loop (bench/_bare_connector.py: mutual
TLS + MQTT CONNECT, same broker, same certificates) measured in the same run. Target: 99 %
within 1.2x of 0.99 N / that rate. The devices use the agent's own jittered backoff
(1..60 s).

"Reconnected" is measured at the broker: the device's CONNECT accepted (its persistent
session, subscription and queued commands restored), taken from the broker's log as it is
written. The simulator's own view (each agent's session set-up done: SUBACK and the PUBACK
of its "online" status processed) is reported beside it: on one shared 2-core machine it
lags by however long the simulator's Python needs for 10,000 agents' set-up.

    .venv/bin/python -m bench.reconnect_storm [--devices 10000] [--timeline]
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench._common import cpu_seconds, start_broker
from bench._sim import SimProcess, niced, table
from tillsyn_protocol import SigningKey

_CONNACKED = re.compile(rb"New client connected from \S+ as (dev-sim-\d+) ")


def handshake_rate(pki_dir: Path, ca: Path, port: int, processes: int, nice: int) -> float:
    certs = next((pki_dir / "sim-devices").iterdir())
    # Enough connections in flight to keep the broker busy while each thread waits for
    # its handshake's round trips.
    args = [str(port), str(ca), str(certs), "10", str(max(2, processes)), "32"]
    out = subprocess.run(
        niced([sys.executable, "-m", "bench._bare_connector", *args], nice),
        capture_output=True,
        text=True,
        check=True,
    )
    rate: float = json.loads(out.stdout)["per_s"]
    return rate


def listen_overflows() -> int:
    """The kernel's TcpExt ListenOverflows: the accept queue was full, a SYN or final ACK
    was dropped and the client retransmits after 1, 3, 7 s."""
    lines = [ln.split() for ln in Path("/proc/net/netstat").read_text().splitlines()]
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names[0] == "TcpExt:":
            return int(dict(zip(names[1:], values[1:], strict=True))["ListenOverflows"])
    return 0


class ConnackTail(threading.Thread):
    """Follows the broker's log (flushed per line) from ``offset``: when each simulated
    device's CONNECT was accepted, first time only, in this process's monotonic clock."""

    def __init__(self, log: Path, offset: int) -> None:
        super().__init__(daemon=True)
        self._log, self._offset = log, offset
        self.first: dict[bytes, float] = {}
        self._done = threading.Event()

    def run(self) -> None:
        with self._log.open("rb") as fh:
            fh.seek(self._offset)
            pending = b""
            while not self._done.is_set():
                chunk = fh.read()
                now = time.monotonic()
                if not chunk:
                    time.sleep(0.05)
                    continue
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if (m := _CONNACKED.search(line)) is not None:
                        self.first.setdefault(m.group(1), now)

    def stop(self) -> None:
        self._done.set()
        self.join(5)


def after(times: list[float], count: float) -> float:
    """Seconds until ``count`` of the sorted ``times`` had happened (nan if never)."""
    k = int(-(-count // 1))  # ceil
    return times[k - 1] if 0 < k <= len(times) else float("nan")


def peak_rate(times: list[float], window: float = 1.0) -> float:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - window:
            j += 1
        best = max(best, i - j + 1)
    return best / window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--workdir", type=Path, help="keep logs (broker, simulator) here")
    parser.add_argument("--timeline", action="store_true", help="print one line per second")
    parser.add_argument(
        "--nice",
        type=int,
        default=10,
        help="CPU priority of the clients (simulator and bare connector) below the broker's:"
        " they stand in for devices with CPUs of their own [10; 0 = same as the broker]",
    )
    args = parser.parse_args()
    n = args.devices
    trace: list[tuple[float, int, int, int, int, int, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-reconnect-") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        pki, broker = start_broker(root)
        sim = tail = None
        try:
            key = root / "command-key.pub.pem"
            key.write_bytes(SigningKey.generate().public_pem())
            sim = SimProcess(root, pki, broker.port, key, n, "--direct")  # no fault relay
            subprocess.run([*sim.cmd, "--issue-only"], check=True, capture_output=True)
            rate = handshake_rate(pki.directory, pki.ca_cert, broker.port, sim.processes, args.nice)
            sim.start(nice=args.nice)
            ready = sim.wait_ready()
            time.sleep(5)
            before = sim.command("status")
            overflows0 = listen_overflows()
            offset = broker.log_path.stat().st_size  # the log is appended across restarts
            down = time.monotonic()
            broker.restart()  # SIGTERM (sessions saved), start on the same port
            up = time.monotonic()
            tail = ConnackTail(broker.log_path, offset)
            tail.start()
            sim_pids, broker_pid = sim.pids(), broker.pid or 0
            sim_up: list[float] = []  # when the simulator first reported each count
            deadline = up + 600
            while time.monotonic() < deadline:
                status = sim.command("status")
                now = time.monotonic()
                sim_up.extend([now] * (status["connected"] - len(sim_up)))
                if not trace or now - trace[-1][0] >= 1.0:
                    trace.append(
                        (
                            now,
                            len(tail.first),
                            status["connected"],
                            status["connect_failures"] - before["connect_failures"],
                            status["disconnects"] - before["disconnects"],
                            listen_overflows() - overflows0,
                            cpu_seconds(broker_pid),
                            sum(cpu_seconds(pid) for pid in sim_pids),
                        )
                    )
                if status["connected"] >= n and len(tail.first) >= n:
                    break
                time.sleep(0.25)
            final = sim.command("status")
        finally:
            if tail is not None:
                tail.stop()
            if sim is not None:
                sim.stop()
            broker.stop()
    if args.timeline:
        print(
            "   t  connacked  sim-session-up  connect-failures  sessions-ended"
            "  listen-overflows  broker-cpu/s  sim-cpu/s"
        )
        for prev, row in itertools.pairwise(trace):
            t, n_acked, connected, n_failed, n_ended, overflows, cpu, sim_cpu = row
            dt = t - prev[0]
            print(
                f"{t - up:4.0f}  {n_acked:9,}  {connected:14,}  {n_failed:16,}  {n_ended:13,}"
                f"  {overflows:16,}  {(cpu - prev[6]) / dt:12.2f}  {(sim_cpu - prev[7]) / dt:9.2f}"
            )
    acked = sorted(t - up for t in tail.first.values()) if tail else []
    seen = [t - up for t in sim_up]
    allowed = 0.99 * n / rate
    t99, sim99 = after(acked, 0.99 * n), after(seen, 0.99 * n)
    # Every device's session ends once with the old broker; any beyond N were sessions the
    # new broker accepted and the agent then gave up on (work thrown away).
    ended = final["disconnects"] - before["disconnects"]
    failures = final["connect_failures"] - before["connect_failures"]
    print("reconnect_storm: setup: 2 cores, loopback, Mosquitto 2.0.11 production config,")
    print(
        f"  {n:,} simulated agents ({sim.processes if sim else 1} processes), backoff 1..60 s,"
        f" clients at nice {args.nice}\n"
    )
    print(
        table(
            [
                (
                    "initial connect of all devices",
                    f"{ready['uptime_s']:.1f} s (ramp {n / 200:g} s)",
                ),
                ("broker restart (down -> accepting)", f"{up - down:.2f} s"),
                ("99 % reconnected (broker) after", f"{t99:.1f} s from accepting again"),
                ("100 % reconnected (broker) after", f"{after(acked, n):.1f} s"),
                ("peak connections / s (1 s window)", f"{peak_rate(acked):,.0f}"),
                ("bare handshake rate (same broker)", f"{rate:,.0f} / s"),
                ("time the handshake rate allows", f"{allowed:.1f} s for 99 %"),
                ("99 % time / allowed", f"{t99 / allowed:.2f}x (target <= 1.2x)"),
                (
                    "99 % of agents' sessions set up",
                    f"{sim99:.1f} s ({sim99 / allowed:.2f}x; simulator's view, see docstring)",
                ),
                ("failed attempts (no session)", f"{failures:,}"),
                ("sessions accepted, then dropped", f"{max(0, ended - n):,}"),
                ("listen queue overflows", f"{trace[-1][5] if trace else 0:,}"),
            ]
        )
    )


if __name__ == "__main__":
    main()
