"""Offline detection: time from a device's death to its physical visit being raised (the
visit row in the fleet's database), for clean deaths (connection dropped, the broker
publishes the Last Will) and silent ones (network dropped both ways, nothing closed: only
heartbeat silence or the broker's keepalive can tell).

N simulated devices connect, each with a window due within the visit horizon (so an
offline device needs a visit); then K of them die at once, a third each: ``die`` (clean
for the broker: the connection drops, it publishes the Last Will), ``off`` (a clean
shutdown: the agent reports ``offline`` and disconnects) and ``drop`` (silent: the
network stops both ways). Their heartbeat phases are random, so the silence already
lasting at death is too.
Targets: clean p99 <= 2 s; silent p99 <= 1.5x the heartbeat interval, against the
configured threshold ``offline_after_s``.

    .venv/bin/python -m bench.offline_detection [--devices 10000] [--kills 200]
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from bench._common import start_broker
from bench._sim import FleetProcess, SimProcess, percentile, table
from firmware_agent.sim_fleet import register_in_db

TZ = "Europe/Stockholm"


def visits(db: Path) -> dict[str, float]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        rows = con.execute(
            "SELECT device_id, raised_at FROM visit WHERE lower(cause) = 'device_offline'"
        ).fetchall()
    return dict(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--kills", type=int, help="devices killed [min(300, devices / 5)]")
    parser.add_argument("--heartbeat", type=float, default=30.0)
    parser.add_argument("--offline-after", type=float, help="threshold [4/3 of heartbeat]")
    parser.add_argument("--workdir", type=Path, help="keep logs and the database here")
    args = parser.parse_args()
    n, hb = args.devices, args.heartbeat
    kills = args.kills or min(300, n // 5)
    threshold = args.offline_after or round(hb * 4 / 3, 1)
    keepalive = max(5, int(hb))
    with tempfile.TemporaryDirectory(prefix="bench-offline-") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        pki, broker = start_broker(root)
        fleet = sim = None
        try:
            ids = [f"dev-sim-{i:06d}" for i in range(n)]
            # A window 30 minutes ahead: inside the visit horizon, so offline means a visit.
            opens = datetime.fromtimestamp(time.time() + 1800, ZoneInfo(TZ))
            register_in_db(
                f"sqlite:///{root / 'fleet.db'}", ids, window=(opens.strftime("%H:%M:%S"), 600)
            )
            fleet = FleetProcess(
                root,
                pki,
                broker.port,
                tz=TZ,
                offline_after_s=threshold,
                liveness_interval_s=1.0,
                visit_horizon_s=7200.0,
            ).start()
            sim = SimProcess(
                root,
                pki,
                broker.port,
                fleet.public_key,
                n,
                "--heartbeat",
                str(hb),
                "--keepalive",
                str(keepalive),
                # Boots spread over at least one heartbeat: the heartbeat phases are uniform.
                "--ramp",
                str(max(hb, n / 200)),
            ).start()
            sim.wait_ready()
            time.sleep(hb + 5)  # every device has heartbeated; the phases are random
            before = len(visits(fleet.db))  # start-up must not raise any
            third = kills // 3
            died = sim.command(f"die {third}")["applied"]
            switched_off = sim.command(f"off {third}")["applied"]
            dropped = sim.command(f"drop {kills - 2 * third}")["applied"]
            deadline = time.time() + 2 * max(threshold, 1.5 * keepalive) + 30
            raised: dict[str, float] = {}
            lag_max = 0.0
            while time.time() < deadline:
                time.sleep(0.5)
                lag_max = max(lag_max, fleet.metrics().get("tillsyn_ingest_lag_seconds", 0.0))
                raised = visits(fleet.db)
                if all(d in raised for d in [*died, *switched_off, *dropped]):
                    break
        finally:
            if sim is not None:
                sim.stop()
            if fleet is not None:
                fleet.stop()
            broker.stop()
    clean = [raised[d] - t for d, t in died.items() if d in raised]
    shutdown = [raised[d] - t for d, t in switched_off.items() if d in raised]
    silent = [raised[d] - t for d, t in dropped.items() if d in raised]
    others = len(set(raised) - set(died) - set(switched_off) - set(dropped))

    def stats(values: list[float], of: int) -> str:
        return (
            f"p50 {percentile(values, 50):6.2f}  p99 {percentile(values, 99):6.2f}"
            f"  max {max(values, default=float('nan')):6.2f} s  ({len(values)} of {of})"
        )

    print("offline_detection: setup: 2 cores, loopback, Mosquitto 2.0.11 production config,")
    print(f"  {n:,} simulated agents, heartbeat {hb:g} s, keepalive {keepalive} s,")
    print(f"  offline_after_s {threshold:g}, liveness tick 1 s, fleet on SQLite\n")
    print(
        table(
            [
                ("clean death (Last Will) -> visit", stats(clean, len(died))),
                ("  p99 vs target 2 s", f"{percentile(clean, 99) / 2:.2f}x"),
                ("clean shutdown (offline) -> visit", stats(shutdown, len(switched_off))),
                ("  p99 vs target 2 s", f"{percentile(shutdown, 99) / 2:.2f}x"),
                ("silent death (network) -> visit", stats(silent, len(dropped))),
                ("  p99 / offline_after_s", f"{percentile(silent, 99) / threshold:.2f}x"),
                (
                    "  p99 / heartbeat interval",
                    f"{percentile(silent, 99) / hb:.2f}x (target <= 1.5x)",
                ),
                ("visits for devices not killed", f"{others} (expected 0)"),
                ("  of them before the kill", f"{before}"),
                ("fleet ingest lag, max after the kill", f"{lag_max:.2f} s"),
            ]
        )
    )


if __name__ == "__main__":
    main()
