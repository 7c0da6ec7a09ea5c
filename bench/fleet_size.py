"""Fleet size: what N connected devices (30 s heartbeats, mutual TLS, the production
Mosquitto config) cost the fleet service, and how far that is from its ingest limit.

The fleet service runs as its own process on SQLite with the N devices registered; it is
measured idle (after its start-up reconcile, no device connected: the baseline) and again
with every device connected and heartbeating (RSS, and CPU over a measurement window).
Then a burst of extra heartbeats (two publisher processes, as bench/ingest_ceiling.py)
measures, in the same run, how many heartbeats the service absorbs per CPU-second:
headroom = that ceiling / the fleet's heartbeat rate (N / interval).

    .venv/bin/python -m bench.fleet_size [--devices 10000] [--window 60] [--burst 40000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench._common import cpu_seconds, publish_load, rss_kib, start_broker
from bench._sim import FleetProcess, SimProcess, table
from firmware_agent.sim_fleet import register_in_db


def heartbeats_counted(fleet: FleetProcess) -> float:
    return fleet.metrics().get('tillsyn_ingest_messages_total{channel="hb"}', 0.0)


def online_count(fleet: FleetProcess) -> float:
    # tillsyn_devices{connectivity="online"} is refreshed from the database every sweep.
    return fleet.metrics().get('tillsyn_devices{connectivity="online"}', 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--heartbeat", type=float, default=30.0)
    parser.add_argument("--window", type=float, default=60.0, help="CPU measurement, s")
    parser.add_argument("--burst", type=int, default=40_000, help="extra heartbeats (0: skip)")
    args = parser.parse_args()
    n = args.devices
    with tempfile.TemporaryDirectory(prefix="bench-fleet-size-") as tmp:
        root = Path(tmp)
        pki, broker = start_broker(root)
        fleet = sim = None
        try:
            ids = [f"dev-sim-{i:06d}" for i in range(n)]
            t = time.perf_counter()
            register_in_db(f"sqlite:///{root / 'fleet.db'}", ids)
            registered_s = time.perf_counter() - t
            fleet = FleetProcess(
                root,
                pki,
                broker.port,
                offline_after_s=3 * args.heartbeat,
                sweep_interval_s=30.0,
                liveness_interval_s=2.0,
            )
            t = time.perf_counter()
            fleet.start()
            fleet.wait_idle()
            startup_s = time.perf_counter() - t
            base_rss = fleet.rss_kib()
            cpu0, wall0 = fleet.cpu(), time.monotonic()
            time.sleep(min(args.window, 30))
            base_share = (fleet.cpu() - cpu0) / (time.monotonic() - wall0)

            # --direct: no fault relay (not needed here), one descriptor per device.
            sim = SimProcess(
                root,
                pki,
                broker.port,
                fleet.public_key,
                n,
                "--direct",
                "--heartbeat",
                str(args.heartbeat),
            ).start()
            t = time.perf_counter()
            sim.wait_ready()
            connect_s = time.perf_counter() - t
            deadline = time.monotonic() + 120
            while online_count(fleet) < n and time.monotonic() < deadline:
                time.sleep(2)
            time.sleep(2 * args.heartbeat)  # steady state: every device heartbeating
            hb0, cpu0, wall0 = heartbeats_counted(fleet), fleet.cpu(), time.monotonic()
            broker_cpu0 = cpu_seconds(broker.pid or 0)
            sim_cpu0 = sim.cpu()
            time.sleep(args.window)
            wall = time.monotonic() - wall0
            cpu = fleet.cpu() - cpu0
            hb_rate = (heartbeats_counted(fleet) - hb0) / wall
            broker_share = (cpu_seconds(broker.pid or 0) - broker_cpu0) / wall
            sim_share = (sim.cpu() - sim_cpu0) / wall
            rss = fleet.rss_kib()
            broker_rss = rss_kib(broker.pid or 0)
            status = sim.command("status")

            ceiling = None
            if args.burst:
                before, cpu_b = heartbeats_counted(fleet), fleet.cpu()
                publish_load(pki, broker.port, ids[:1000], args.burst)
                # Drained when the count grows no faster than the devices' own heartbeats
                # (with N devices connected it never stands still).
                last, t_last = heartbeats_counted(fleet), time.monotonic()
                while True:
                    time.sleep(1.0)
                    now, t_now = heartbeats_counted(fleet), time.monotonic()
                    drained = (now - last) / (t_now - t_last) <= 1.5 * hb_rate + 5
                    last, t_last = now, t_now
                    if drained:
                        break
                burst_cpu = fleet.cpu() - cpu_b
                # The devices' own heartbeats keep coming during the burst: count them all.
                ceiling = (last - before) / burst_cpu
        finally:
            if sim is not None:
                sim.stop()
            if fleet is not None:
                fleet.stop()
            broker.stop()
    share = cpu / wall
    rate = n / args.heartbeat
    rows = [
        ("devices", f"{n:,} (simulated agents in {sim.processes} processes)"),
        ("heartbeat interval", f"{args.heartbeat:g} s -> {rate:,.0f} heartbeats/s expected"),
        ("registration (DB) / fleet start-up", f"{registered_s:.1f} s / {startup_s:.1f} s"),
        ("all connected after", f"{connect_s:.1f} s (ramp {n / 200:.0f} s)"),
        ("heartbeats measured", f"{hb_rate:,.0f} /s over {wall:.0f} s"),
        ("fleet CPU, idle baseline", f"{base_share:.1%} of one core"),
        ("fleet CPU, N connected", f"{share:.1%} of one core"),
        ("fleet RSS baseline -> connected", f"{base_rss / 1024:,.1f} -> {rss / 1024:,.1f} MiB"),
        ("RSS per device above baseline", f"{(rss - base_rss) * 1024 / n:,.0f} B (target <= 2 KB)"),
        ("headroom from CPU share", f"{1 / share:,.1f}x (one core / share)"),
    ]
    if ceiling is not None:
        rows += [
            ("ingest ceiling (burst, in run)", f"{ceiling:,.0f} heartbeats / CPU-s"),
            ("heartbeat ingest headroom", f"{ceiling / rate:,.1f}x (target >= 10x)"),
        ]
    rows += [
        ("broker CPU / RSS", f"{broker_share:.1%} / {broker_rss / 1024:,.0f} MiB"),
        ("simulator CPU (all processes)", f"{sim_share:.1%}"),
        ("simulator status", json.dumps({k: status[k] for k in ("connected", "connects")})),
    ]
    print("fleet_size: setup: 2 cores, loopback, Mosquitto 2.0.11 production config")
    print("  (mutual TLS, ACL, QoS 1 commands / QoS 0 heartbeats), fleet on SQLite\n")
    print(table(rows))


if __name__ == "__main__":
    main()
