"""Ingest under contention: how many messages per second the fleet's MQTT network thread
(``fleet.mqtt.NetworkThread``) takes while other threads of the same process are
CPU-bound, as the fleet's database thread and event loop are during a storm.

Every socket read releases the GIL, and getting it back from a CPU-bound thread waits up
to the switch interval (5 ms by default). paho reads a packet in three or four reads, so
the thread's rate under contention depends on reads per packet (``--read-ahead off``
restores paho's own) and on the switch interval (``--switch``; ``tillsyn fleet serve``
runs with 1 ms).

A publisher process sends QoS 0 heartbeats at ``--rate`` for ``--seconds``; the report is
the subscriber's rate and how far behind it was at the end (the broker drops QoS 0
messages it cannot deliver).

    .venv/bin/python -m bench.ingest_contention [--rate 3000] [--hogs 2] [--switch 0.001]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from bench._bare_subscriber import lean_client
from bench._common import heartbeat, start_broker, tls
from bench._sim import table
from broker.pki import PkiPaths
from fleet import mqtt as fleet_mqtt


def _publish(pki: PkiPaths, port: int, rate: float, seconds: float) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="contention-pub")
    client.tls_set_context(tls(pki, pki.fleet_cert, pki.fleet_key))
    client.connect("127.0.0.1", port)
    client.loop_start()
    payload, sent, start = heartbeat(1), 0, time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        while sent < int(elapsed * rate):
            client.publish(f"tillsyn/v1/dev/dev-bench-{sent % 1000:06d}/hb", payload, qos=0)
            sent += 1
        time.sleep(0.005)
    time.sleep(0.5)
    client.loop_stop()
    client.disconnect()


def _burn(stop: threading.Event) -> None:
    x = 0
    while not stop.is_set():
        for i in range(1000):
            x += i


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=3000.0, help="messages/s published")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--hogs", type=int, default=2, help="CPU-bound threads beside it")
    parser.add_argument("--switch", type=float, help="sys.setswitchinterval [5 ms default]")
    parser.add_argument("--read-ahead", choices=("on", "off"), default="on")
    args = parser.parse_args()
    if args.switch:
        sys.setswitchinterval(args.switch)
    if args.read_ahead == "off":  # paho's own reads: one per type byte, length byte, body
        fleet_mqtt._Client._sock_recv = fleet_mqtt.paho.Client._sock_recv  # type: ignore[method-assign]
    received = 0

    def count(_topic: str, _payload: bytes) -> None:
        nonlocal received
        received += 1

    with tempfile.TemporaryDirectory(prefix="bench-contention-") as tmp:
        pki, broker = start_broker(Path(tmp))
        up, stop = threading.Event(), threading.Event()
        keys = (str(pki.ca_cert), str(pki.fleet_cert), str(pki.fleet_key))
        net = lean_client(broker.port, *keys, count, up, client_id="contention-sub")
        try:
            if not up.wait(30):
                raise SystemExit("subscriber could not connect")
            for _ in range(args.hogs):
                threading.Thread(target=_burn, args=(stop,), daemon=True).start()
            work = (pki, broker.port, args.rate, args.seconds)
            publisher = mp.Process(target=_publish, args=work)
            start, cpu0 = time.monotonic(), time.process_time()
            publisher.start()
            behind: list[int] = []
            while publisher.is_alive():
                time.sleep(1)
                behind.append(int((time.monotonic() - start) * args.rate) - received)
            publisher.join()
            at_end, end = received, time.monotonic()
            time.sleep(3)  # what was still on its way
            cpu = time.process_time() - cpu0  # this process: the subscriber and the hogs
        finally:
            stop.set()
            net.stop()
            broker.stop()
    sent = int(args.rate * args.seconds)
    print("ingest_contention: setup: 2 cores, loopback, Mosquitto 2.0.11 production config,")
    switch_ms = sys.getswitchinterval() * 1000
    print(f"  QoS 0 heartbeats at {args.rate:,.0f}/s for {args.seconds:g} s, {args.hogs} CPU-bound")
    print(f"  threads in the subscriber's process, switch interval {switch_ms:g} ms,")
    print(f"  read-ahead {args.read_ahead}\n")
    print(
        table(
            [
                ("received while publishing", f"{at_end / (end - start):,.0f} /s"),
                ("received in all", f"{received:,} of {sent:,} ({received / sent:.1%})"),
                ("behind, worst second", f"{max(behind, default=0):,} messages"),
                (
                    "process CPU per message",
                    f"{cpu / max(received, 1) * 1e6:,.1f} us (with the hogs' CPU: use --hogs 0)",
                ),
            ]
        )
    )


if __name__ == "__main__":
    main()
