"""The floor for a window storm: sign N arm tokens, publish them (QoS 1) and collect the N
acks, with what the fleet uses for that (tillsyn_protocol.tokens, and its MQTT transport
fleet.mqtt.NetworkThread: paho in its own thread) and none of the fleet's logic (no
database, ledger, scheduler or reconcile). A plain paho ``loop_start`` publisher measured
slower than the fleet itself (1,000 devices: p99 5.5 s against 4.2 s), so it was no floor.

python -m bench._bare_commander PORT CA CERT KEY SIGNING_KEY IDS_FILE SEQ UNTIL [PACE_FILE]

First disarms every device (seq SEQ - 1) so each arm is a real LOCKED -> ARMED transition
like the fleet's, prints "ready", waits for "go" on stdin, then arms them all (seq SEQ) and
prints {"latencies": [...]}: seconds from "go" to each device's applied ack. Any other line
than "go" ends it there: the devices are left disarmed (the benchmark's next round).

With PACE_FILE (lines "device offset"), each arm leaves at its offset in seconds after
"go" instead of all at once: the fleet's own send times replayed, so that the devices see
the same arrival shape as in the fleet's storm, without the fleet's work.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fleet.mqtt import LinkConfig, NetworkThread, client_tls_context
from fleet.signing import load_or_create
from tillsyn_protocol import sign, tokens


class Acks:
    def __init__(self, seq: int, expect: int) -> None:
        self.seq, self.expect = seq, expect
        self.at: dict[str, float] = {}
        self.done = threading.Event()

    def on_message(self, topic: str, payload: bytes) -> None:  # in the network thread
        ack = json.loads(payload)
        if ack.get("seq") != self.seq or ack.get("result") not in ("applied", "duplicate"):
            return
        self.at.setdefault(topic.split("/")[3], time.time())
        if len(self.at) >= self.expect:
            self.done.set()


class Router:
    def __init__(self) -> None:
        self.target: Acks | None = None

    def __call__(self, topic: str, payload: bytes) -> None:
        if self.target is not None:
            self.target.on_message(topic, payload)


def run(
    net: NetworkThread,
    router: Router,
    key: Any,
    ids: list[str],
    acks: Acks,
    make: Any,
    pace: dict[str, float] | None = None,
) -> float:
    router.target = acks
    start = time.time()
    if pace is not None:
        ids = sorted(ids, key=lambda d: pace.get(d, 0.0))
    for device_id in ids:
        if pace is not None:
            wait = start + pace.get(device_id, 0.0) - time.time()
            if wait > 0.001:
                time.sleep(wait)
        token = sign(make(device_id, start), key)
        net.publish(f"tillsyn/v1/dev/{device_id}/cmd", token.encode(), qos=1)
    acks.done.wait(600)
    return start


def main() -> None:
    port, ca, cert, key_file, signing_file, ids_file, seq_s, until_s = sys.argv[1:9]
    ids = Path(ids_file).read_text().split()
    pace = None
    if len(sys.argv) > 9:
        lines = (line.split() for line in Path(sys.argv[9]).read_text().splitlines())
        pace = {device: float(offset) for device, offset in lines}
    seq, until = int(seq_s), int(until_s)
    key = load_or_create(Path(signing_file))
    router = Router()
    config = LinkConfig(
        host="127.0.0.1",
        port=int(port),
        client_id="bare-commander",
        tls=client_tls_context(ca, cert, key_file),
        subscriptions=("tillsyn/v1/dev/+/ack",),
        persistent=False,
    )
    net = NetworkThread(config, on_message=router)
    net.start()
    while not net.up:
        time.sleep(0.05)
    disarmed = Acks(seq - 1, len(ids))
    run(net, router, key, ids, disarmed, lambda d, now: tokens.disarm(d, seq=seq - 1, now=now))
    print("ready", len(disarmed.at), flush=True)
    if sys.stdin.readline().strip() != "go":  # "quit": only the disarms (between rounds)
        net.stop()
        return
    armed = Acks(seq, len(ids))
    start = run(
        net,
        router,
        key,
        ids,
        armed,
        lambda d, now: tokens.arm(d, seq=seq, now=now, until=until),
        pace,
    )
    net.stop()
    print(json.dumps({"latencies": [t - start for t in armed.at.values()]}), flush=True)


if __name__ == "__main__":
    main()
