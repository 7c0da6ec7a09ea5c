"""Window storm: N devices whose window opens at the same second; time from the window's
start to each device's acknowledged ARMED as the fleet recorded it (``command.acked_at`` of
the arm in the ledger: when the fleet's network thread received the ack, the point at
which the floor's commander times its own), against the raw floor measured in the same run.

The floor (bench/_bare_commander.py, its own process like the fleet): sign N arm tokens
with tillsyn_protocol.tokens, publish them QoS 1 with paho and collect the N acks, no fleet
logic, to the same simulated devices (first disarmed, so each arm is the same LOCKED ->
ARMED transition). Target: fleet p99 <= 1.5x the floor's p99.

    .venv/bin/python -m bench.window_storm [--devices 10000]
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from bench._common import cpu_seconds, cpu_split, py_spy, start_broker
from bench._sim import FleetProcess, SimProcess, percentile, table
from broker.pki import PkiPaths
from firmware_agent.sim_fleet import register_in_db

TZ = "Europe/Stockholm"
WINDOW_S = 1800
FLOOR_SEQ = 1_000_000  # the floor's arms in round 1 (far above the fleet's own seqs)
ROUND_SEQS = 10  # seqs per round: the floor's, its paced copy's, the next fleet's disarm
ROUND_LEAD_S = 90.0  # a later round's window: after the fleet's restart and start-up


def acked_arms(db: Path, since: float) -> list[tuple[str, float]]:
    """(device, acked_at) of every acknowledged arm issued since ``since`` (this round's)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        return con.execute(
            "SELECT device_id, acked_at FROM command"
            " WHERE lower(kind) = 'arm' AND acked_at IS NOT NULL AND created_at >= ?",
            (since,),
        ).fetchall()


def count_acked(db: Path, since: float) -> int:
    """How many arms are acknowledged: the poll during the storm, which shares the two
    cores with it, so it counts rather than fetches."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        row = con.execute(
            "SELECT count(*) FROM command WHERE lower(kind) = 'arm' AND acked_at IS NOT NULL"
            " AND created_at >= ?",
            (since,),
        ).fetchone()
    return int(row[0])


def issued_arms(db: Path, since: float) -> tuple[dict[str, float], int]:
    """When each device's arm was issued (first sent), and how many sends there were."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        rows = con.execute(
            "SELECT device_id, created_at, attempts FROM command"
            " WHERE lower(kind) = 'arm' AND created_at >= ?",
            (since,),
        ).fetchall()
    return {r[0]: r[1] for r in rows}, sum(r[2] for r in rows)


def profiler(pid: int, out: str) -> subprocess.Popen[bytes]:
    """py-spy attached to the fleet for the storm (raw format for .txt, else a flame graph):
    the thread holding the GIL only, i.e. where its Python CPU goes."""
    cmd = [py_spy(), "record", "-p", str(pid), "-o", out]
    cmd += [
        "-f",
        "raw" if out.endswith(".txt") else "flamegraph",
        "-r",
        "100",
        "--threads",
        "--gil",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def commander(
    root: Path,
    pki: PkiPaths,
    port: int,
    fleet: FleetProcess,
    ids: list[str],
    until: int,
    seq: int,
    pace: dict[str, float] | None = None,
) -> subprocess.Popen[str]:
    """The bare commander, started: every device disarmed (seq ``seq - 1``), waiting for
    "go" on its stdin."""
    ids_file = root / "ids.txt"
    ids_file.write_text("\n".join(ids))
    args = [str(port), str(pki.ca_cert), str(pki.fleet_cert), str(pki.fleet_key)]
    args += [str(fleet.key_file), str(ids_file), str(seq), str(until)]
    if pace is not None:
        pace_file = root / "pace.txt"
        pace_file.write_text("".join(f"{d} {at:.4f}\n" for d, at in pace.items()))
        args.append(str(pace_file))
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench._bare_commander", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    ready = proc.stdout.readline().split()
    if not ready or ready[0] != "ready" or int(ready[1]) != len(ids):
        raise SystemExit(f"bare commander failed: {' '.join(ready) or 'no answer'}")
    return proc


def floor(
    root: Path,
    pki: PkiPaths,
    port: int,
    fleet: FleetProcess,
    sim: SimProcess,
    ids: list[str],
    until: int,
    seq: int,
    pace: dict[str, float] | None = None,
) -> tuple[list[float], float, float, float]:
    """The floor's latencies, how long it took (go -> last ack), and its own and the
    simulator's CPU for that. With ``pace`` (device -> seconds after the start), the arms
    leave at those times instead of all at once."""
    proc = commander(root, pki, port, fleet, ids, until, seq, pace)
    assert proc.stdin is not None and proc.stdout is not None
    time.sleep(2)  # the disarm's state reports settle
    cpu0 = cpu_seconds(proc.pid), sim.cpu()
    t_go = time.time()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out = json.loads(proc.stdout.readline())
    cpu = cpu_seconds(proc.pid) - cpu0[0], sim.cpu() - cpu0[1]
    took = time.time() - t_go
    proc.wait(30)
    latencies: list[float] = out["latencies"]
    return latencies, took, *cpu


def window_start(lead: float) -> tuple[float, str]:
    """The first whole minute at least ``lead`` s ahead (windows open "in the same minute",
    at its first second), as epoch seconds and as the windows' local start."""
    t0 = math.ceil((time.time() + lead) / 60) * 60
    return t0, datetime.fromtimestamp(t0, ZoneInfo(TZ)).strftime("%H:%M:%S")


def next_round(
    root: Path, pki: PkiPaths, port: int, fleet: FleetProcess, ids: list[str], seq: int, lead: float
) -> float:
    """Devices and fleet ready for another storm, the fleet stopped: every device disarmed
    (seq ``seq - 1``, the floor had armed them), the fleet's database told so (as the
    devices' retained state reports would on its start), and every window moved to the
    next minute ``lead`` s ahead, which is returned."""
    proc = commander(root, pki, port, fleet, ids, 0, seq)
    assert proc.stdin is not None
    proc.stdin.write("quit\n")
    proc.stdin.flush()
    proc.wait(60)
    t0, start_local = window_start(lead)
    with sqlite3.connect(fleet.db, timeout=30) as con:
        con.execute(
            "UPDATE device SET reported_state = 'LOCKED', armed_until = NULL,"
            " device_last_seq = ?, next_seq = ?",
            (seq - 1, seq),
        )
        con.execute('UPDATE "window" SET start_local = ?', (start_local,))
    return t0


@dataclass
class Round:
    """One fleet storm and the floor right after it, on the same devices."""

    t0: float  # the window's start
    acked: list[float]  # window start -> ack recorded, per device
    issued: tuple[dict[str, float], int]
    storm_cpu: tuple[float, float]  # fleet, sim: until the last ack
    split: list[float]  # the fleet's user / system CPU for that
    storm_s: float
    sim_idle: float  # the simulator's CPU-s/s before the edge
    fleet_cpu: float  # the fleet process's CPU from its start
    floor_lat: list[float] = field(default_factory=list)
    floor_s: float = 0.0
    floor_cpu: tuple[float, float] = (0.0, 0.0)  # commander, sim
    paced_lat: list[float] = field(default_factory=list)
    paced_s: float = 0.0
    paced_cpu: tuple[float, float] = (0.0, 0.0)

    def ratio(self, floor_values: list[float] | None = None) -> float:
        return percentile(self.acked, 99) / percentile(floor_values or self.floor_lat, 99)


def fleet_storm(
    fleet: FleetProcess, sim: SimProcess, n: int, t0: float, profile: str | None
) -> Round:
    """Wait for the window at ``t0`` and measure the fleet's storm; stops the fleet."""
    deadline = t0 + 600
    # CPU from just before the edge: what the storm itself costs, apart from start-up.
    # The simulator's own pace in the 10 s before (heartbeats, keepalives): what it
    # spends per second of any storm, apart from the storm's messages.
    time.sleep(max(0.0, t0 - 11 - time.time()))
    idle0 = time.time(), sim.cpu()
    time.sleep(max(0.0, t0 - 1 - time.time()))
    cpu0 = fleet.cpu(), sim.cpu()
    split0 = cpu_split(fleet.pid)
    t_cpu0 = time.time()
    sim_idle = (cpu0[1] - idle0[1]) / (t_cpu0 - idle0[0])
    spy = profiler(fleet.pid, profile) if profile else None
    since = t0 - 60  # this round's arms (the edge issues them at t0)
    while time.time() < deadline:
        time.sleep(0.5)
        if time.time() > t0 and count_acked(fleet.db, since) >= n:
            break
    rows = acked_arms(fleet.db, since)
    storm_cpu = fleet.cpu() - cpu0[0], sim.cpu() - cpu0[1]
    split = [b - a for a, b in zip(split0, cpu_split(fleet.pid), strict=True)]
    storm_s = time.time() - t_cpu0
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
        spy.wait(60)
    time.sleep(5)  # the state reports' reconciles and the last acks' batches
    fleet_cpu, issued = fleet.cpu(), issued_arms(fleet.db, since)
    fleet.stop()
    acked = [a - t0 for _, a in rows]
    return Round(t0, acked, issued, storm_cpu, split, storm_s, sim_idle, fleet_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--lead", type=float, help="s before the window opens [auto]")
    parser.add_argument("--workdir", type=Path, help="keep logs and the database here")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="CPU priority of the simulator below the fleet's and the broker's (it stands in"
        " for devices with CPUs of their own) [0: the same; 10 made the devices, and so the"
        " floor, slower here, not the fleet faster]",
    )
    parser.add_argument("--profile", help="py-spy profile of the fleet during the storm here")
    parser.add_argument(
        "--care-plans",
        action="store_true",
        help="devices on care plans (one check a night, the window's start and length; its"
        " spans come from planned checks) instead of legacy window rows",
    )
    parser.add_argument(
        "--paced-floor",
        action="store_true",
        help="also run the floor with its arms leaving at the times the fleet sent its own"
        " (a diagnostic: the fleet's arrival shape without the fleet's work)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="fleet storm + floor pairs on the same devices (the fleet restarted, the"
        " windows moved to a later minute); each round's ratio and their median are"
        " reported [1]",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.rounds > 1 and args.care_plans:
        parser.error("--rounds > 1 moves legacy window rows: not with --care-plans")
    n = args.devices
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="bench-window-storm-") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        pki, broker = start_broker(root)
        fleet = sim = None
        try:
            # Far enough ahead for the fleet to start and every device to connect.
            lead = args.lead or 60 + n * 0.02
            t0, start_local = window_start(lead)
            ids = [f"dev-sim-{i:06d}" for i in range(n)]
            register_in_db(
                f"sqlite:///{root / 'fleet.db'}",
                ids,
                window=(start_local, WINDOW_S),
                care_plans=args.care_plans,
            )
            fleet = FleetProcess(root, pki, broker.port, tz=TZ).start()
            sim = SimProcess(root, pki, broker.port, fleet.public_key, n, "--direct")
            sim.start(nice=args.nice)
            sim.wait_ready()
            for r in range(args.rounds):
                if r > 0:
                    seq = FLOOR_SEQ + ROUND_SEQS * r - ROUND_SEQS // 2
                    t0 = next_round(root, pki, broker.port, fleet, ids, seq, ROUND_LEAD_S)
                    fleet.start()
                if time.time() > t0 - 5:
                    raise SystemExit(
                        f"not ready before the window opened; try --lead {lead * 2:.0f}"
                    )
                print(f"round {r + 1}: window opens in {t0 - time.time():.0f} s", file=sys.stderr)
                one = fleet_storm(fleet, sim, n, t0, args.profile if r == 0 else None)
                floor_seq = FLOOR_SEQ + ROUND_SEQS * r
                until = int(t0) + WINDOW_S
                one.floor_lat, one.floor_s, *floor_cpu = floor(
                    root, pki, broker.port, fleet, sim, ids, until, floor_seq
                )
                one.floor_cpu = floor_cpu[0], floor_cpu[1]
                if args.paced_floor:
                    # The same arms at the fleet's own pace, without its work: how much
                    # of the fleet's time is the arrival shape alone (the devices' work
                    # spread over the seconds the edge takes), and how much its CPU.
                    pace = {d: max(0.0, at - t0) for d, at in one.issued[0].items()}
                    one.paced_lat, one.paced_s, *paced_cpu = floor(
                        root, pki, broker.port, fleet, sim, ids, until, floor_seq + 2, pace
                    )
                    one.paced_cpu = paced_cpu[0], paced_cpu[1]
                rounds.append(one)
        finally:
            if sim is not None:
                sim.stop()
            if fleet is not None:
                fleet.stop()
            broker.stop()
    print("window_storm: setup: 2 cores, loopback, Mosquitto 2.0.11 production config,")
    kind = "care plans" if args.care_plans else "legacy window rows"
    print(
        f"  {n:,} simulated agents ({sim.processes if sim else 1} processes, nice {args.nice}),"
        f" fleet on SQLite, devices on {kind}"
    )
    for r, one in enumerate(rounds):
        if len(rounds) > 1:
            print(f"\nround {r + 1} of {len(rounds)}" + (" (the fleet restarted)" if r else ""))
        print()
        report(one, n)
    if len(rounds) > 1:
        ratios = [one.ratio() for one in rounds]
        listed = ", ".join(f"{x:.2f}x" for x in ratios)
        print(f"\nfleet p99 / floor p99 by round: {listed}")
        print(f"median of {len(ratios)} rounds: {statistics.median(ratios):.2f}x (target <= 1.5x)")
        # The fleet's own figure: steadier than the ratio, which moves with the devices.
        cpus = [one.storm_cpu[0] for one in rounds]
        listed = ", ".join(f"{x:.1f}" for x in cpus)
        per = statistics.median(cpus) / n * 1e3
        print(f"fleet CPU until the last ack by round: {listed} s (median {per:.2f} ms/device)")


def stats(values: list[float]) -> str:
    return (
        f"p50 {percentile(values, 50):6.2f}  p99 {percentile(values, 99):6.2f}"
        f"  max {max(values, default=float('nan')):6.2f} s  (n={len(values):,})"
    )


def report(one: Round, n: int) -> None:
    created = sorted(c - one.t0 for c in one.issued[0].values())
    issue_span = f"{created[0]:.2f} / {created[-1]:.2f} s" if created else "none"
    floor_cpu, sim_idle = one.floor_cpu, one.sim_idle
    print(
        table(
            [
                ("fleet: window start -> ack recorded", stats(one.acked)),
                ("floor: sign + publish + ack", stats(one.floor_lat)),
                ("fleet p99 / floor p99", f"{one.ratio():.2f}x (target <= 1.5x)"),
                ("acked arms", f"{len(one.acked):,} of {n:,}"),
                ("arms issued: first / last after start", issue_span),
                ("arm sends in all (resends included)", f"{one.issued[1]:,}"),
                (
                    "CPU until the last ack: fleet / sim",
                    "{:.1f} / {:.1f} s".format(*one.storm_cpu),
                ),
                (
                    "fleet's CPU until the last ack, per device",
                    f"{one.storm_cpu[0] / n * 1e3:.2f} ms",
                ),
                (
                    "fleet's CPU until the last ack: user / system",
                    "{:.1f} / {:.1f} s".format(*one.split),
                ),
                ("floor's CPU: commander / sim", "{:.1f} / {:.1f} s".format(*floor_cpu)),
                ("sim's CPU at its own pace (before the edge)", f"{sim_idle:.2f} CPU-s/s"),
                (
                    "sim's CPU above that pace: fleet's / floor's storm",
                    f"{one.storm_cpu[1] - sim_idle * one.storm_s:.1f} s in {one.storm_s:.1f} s"
                    f" / {floor_cpu[1] - sim_idle * one.floor_s:.1f} s in {one.floor_s:.1f} s",
                ),
                ("fleet CPU (start-up, storm, after)", f"{one.fleet_cpu:.1f} s"),
            ]
        )
    )
    if one.paced_lat:
        paced_above = one.paced_cpu[1] - sim_idle * one.paced_s
        print(
            table(
                [
                    ("floor at the fleet's pace", stats(one.paced_lat)),
                    ("fleet p99 / paced floor p99", f"{one.ratio(one.paced_lat):.2f}x"),
                    (
                        "paced floor's CPU: commander / sim above its pace",
                        f"{one.paced_cpu[0]:.1f} / {paced_above:.1f} s in {one.paced_s:.1f} s",
                    ),
                ]
            )
        )


if __name__ == "__main__":
    main()
