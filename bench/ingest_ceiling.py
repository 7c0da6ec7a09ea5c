"""Ingest ceiling: heartbeats per CPU-second the fleet service absorbs (full validation and
liveness logic), against a bare subscriber on the same broker, in the same run: the
fleet's own MQTT client (``fleet.mqtt.NetworkThread``, same subscriptions) with a
handler that only counts (``bench/_bare_subscriber.py``).

Both consumers run as their own process; throughput is normalised by that process's CPU
time, which is "per core" whatever else the machine does during the run. The fleet's CPU
is also reported per thread (the MQTT network thread first).

    .venv/bin/python -m bench.ingest_ceiling [--messages 200000] [--devices 10000]
        [--profile out.txt]   (py-spy, raw format for .txt, else a flame graph)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench._common import (
    CLK_TCK,
    cpu_seconds,
    device_ids,
    publish_load,
    py_spy,
    start_broker,
)
from broker.launcher import free_port


def run_bare(pki, port: int, ids: list[str], total: int, flavour: str = "lean") -> dict:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench._bare_subscriber",
            str(port),
            str(pki.ca_cert),
            str(pki.fleet_cert),
            str(pki.fleet_key),
            flavour,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    cpu0 = cpu_seconds(proc.pid)
    wall = publish_load(pki, port, ids, total)
    cpu = 0.0
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        cpu = cpu_seconds(proc.pid) - cpu0
        time.sleep(0.05)
    out = json.loads(proc.stdout.readline())
    proc.wait(10)
    return {"received": out["received"], "cpu_s": cpu, "publish_wall_s": wall}


def run_fleet(
    pki, port: int, root: Path, ids: list[str], total: int, profile: str | None = None
) -> dict:
    from sqlmodel import Session

    from fleet.db import init_db, make_engine
    from fleet.models import Connectivity, Device
    from tillsyn_protocol import CameraHealth

    db = root / "fleet.db"
    engine = make_engine(f"sqlite:///{db}")
    init_db(engine)
    with Session(engine) as s:
        # Steady state: the devices are known and online (first contact is a rarer, DB path).
        s.add_all(
            [Device(id=d, connectivity=Connectivity.ONLINE, camera=CameraHealth.OK) for d in ids]
        )
        s.commit()
    api_port = free_port()
    toml = root / "fleet.toml"
    toml.write_text(
        f'database_url = "sqlite:///{db}"\nbroker_port = {port}\n'
        f'ca_file = "{pki.ca_cert}"\ncert_file = "{pki.fleet_cert}"\nkey_file = "{pki.fleet_key}"\n'
        f'signing_key_file = "{root / "key.pem"}"\napi_port = {api_port}\n'
        "offline_after_s = 600\nsweep_interval_s = 3600\n"
    )
    log = (root / "fleet.log").open("w")
    cmd = [sys.executable, "-m", "tillsyn_cli", "fleet", "serve", "--config", str(toml)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    api = f"http://127.0.0.1:{api_port}"

    def counted() -> float:
        text = httpx.get(f"{api}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith('tillsyn_ingest_messages_total{channel="hb"}'):
                return float(line.split()[-1])
        return 0.0

    deadline = time.monotonic() + 600  # start-up reconciles every device once
    while True:
        try:
            if httpx.get(f"{api}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("fleet did not become ready")
        time.sleep(0.2)
    # Start measuring only once start-up work (the first full reconcile) is over.
    prev = cpu_seconds(proc.pid)
    while True:
        time.sleep(1)
        now_cpu = cpu_seconds(proc.pid)
        if now_cpu - prev < 0.05:
            break
        prev = now_cpu
    spy = None  # attached after start-up, so the profile is of ingest alone
    if profile:  # py-spy attached to the service: where the ingest time goes
        spy = subprocess.Popen(
            [
                py_spy(),
                "record",
                "-p",
                str(proc.pid),
                "-o",
                profile,
                "-f",
                "raw" if profile.endswith(".txt") else "flamegraph",
                "-r",
                "200",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    cpu0 = cpu_seconds(proc.pid)
    threads0 = thread_cpu(proc.pid)
    wall = publish_load(pki, port, ids, total)
    cpu_publish = cpu_seconds(proc.pid) - cpu0
    # Wait until the fleet has drained what the broker delivered.
    last, stable = -1.0, 0
    while stable < 5:
        time.sleep(0.2)
        n = counted()
        stable = stable + 1 if n == last else 0
        last = n
    cpu = cpu_seconds(proc.pid) - cpu0
    threads1 = thread_cpu(proc.pid)
    # Per thread: the MQTT network thread is the busiest; then the event loop and the DB.
    per_thread = sorted(
        (round(t - threads0.get(tid, 0.0), 2) for tid, t in threads1.items()), reverse=True
    )
    proc.terminate()
    if spy is not None:
        spy.wait(30)
    proc.wait(15)
    return {
        "received": int(last),
        "cpu_s": cpu,
        "cpu_s_while_publishing": cpu_publish,
        "cpu_s_per_thread": [t for t in per_thread if t > 0][:4],
        "publish_wall_s": wall,
    }


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds per thread of a process (Linux /proc)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--profile", help="write a py-spy profile of the service here (.svg)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pki, broker = start_broker(root)
        try:
            ids = device_ids(args.devices)
            bare = run_bare(pki, broker.port, ids, args.messages)
            stock = run_bare(pki, broker.port, ids, args.messages, "stock")
            fleet = run_fleet(pki, broker.port, root, ids, args.messages, args.profile)
        finally:
            broker.stop()
    bare_rate = bare["received"] / bare["cpu_s"]
    fleet_rate = fleet["received"] / fleet["cpu_s"]
    stock_rate = stock["received"] / stock["cpu_s"]
    print(
        json.dumps(
            {
                "setup": {
                    "messages": args.messages,
                    "devices": args.devices,
                    "publishers": 2,
                    "qos": 1,
                    "tls": "mutual, Mosquitto production config",
                    "cores": 2,
                },
                "bare_subscriber": {**bare, "msgs_per_cpu_s": round(bare_rate)},
                "fleet_service": {**fleet, "msgs_per_cpu_s": round(fleet_rate)},
                "stock_paho_subscriber": {**stock, "msgs_per_cpu_s": round(stock_rate)},
                "fleet_vs_bare": round(fleet_rate / bare_rate, 3),
                "fleet_vs_stock_paho": round(fleet_rate / stock_rate, 3),
                "target": {"fleet_msgs_per_cpu_s": 8000, "fleet_vs_bare": 0.7},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
