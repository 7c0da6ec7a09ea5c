"""The floor for ingest: a subscriber with the same subscriptions and TLS whose message
handler only counts. Two flavours of the same client library (paho-mqtt):

- ``lean`` (default): the fleet's own client, ``fleet.mqtt.NetworkThread`` (paho driven
  by our network thread, paho's topic matcher and callback lock bypassed);
- ``stock``: paho-mqtt as its documentation writes a subscriber (``loop_start()``,
  ``on_message``), the "bare paho subscriber" a reader would build.

python -m bench._bare_subscriber PORT CA CERT KEY [lean|stock]
    -> prints "ready", then {"received": N}
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable

from fleet.mqtt import INGEST_CHANNELS, LinkConfig, NetworkThread, client_tls_context
from tillsyn_protocol import subscription


def stock_client(port: int, ca: str, cert: str, key: str, count, up: threading.Event):
    import paho.mqtt.client as mqtt

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id="bare-sub-stock", protocol=mqtt.MQTTv5
    )
    client.tls_set_context(client_tls_context(ca, cert, key))

    def on_connect(c, _userdata, _flags, _reason, _props) -> None:
        c.subscribe([(subscription(ch), 1) for ch in INGEST_CHANNELS])

    client.on_connect = on_connect
    client.on_subscribe = lambda *_args: up.set()  # SUBACK: the broker routes to us now
    client.on_message = lambda _c, _u, msg: count(msg.topic, msg.payload)
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    return client


def lean_client(
    port: int,
    ca: str,
    cert: str,
    key: str,
    count: Callable[[str, bytes], None],
    up: threading.Event,
    client_id: str = "bare-sub",
) -> NetworkThread:
    """The fleet's own network thread on the fleet's subscriptions, started."""
    net = NetworkThread(
        LinkConfig(
            host="127.0.0.1",
            port=port,
            client_id=client_id,
            tls=client_tls_context(ca, cert, key),
            subscriptions=tuple(subscription(c) for c in INGEST_CHANNELS),
            persistent=False,
        ),
        on_message=count,
        on_state=lambda is_up: up.set() if is_up else None,
    )
    net.start()
    return net


def main(port: int, ca: str, cert: str, key: str, flavour: str = "lean") -> None:
    received = 0
    up = threading.Event()

    def count(_topic: str, _payload: bytes) -> None:
        nonlocal received
        received += 1

    if flavour == "stock":
        client = stock_client(port, ca, cert, key, count, up)
        stop = client.loop_stop
    else:
        stop = lean_client(port, ca, cert, key, count, up).stop
    if not up.wait(30):
        raise SystemExit("bare subscriber could not connect")
    print("ready", flush=True)
    deadline = time.monotonic() + 300
    while received == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    # Done when no message arrived for 3 s.
    last = -1
    while received != last:
        last = received
        time.sleep(3)
    stop()
    print(json.dumps({"received": received}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:6])
