"""The broker's connection-rate limit: mutual-TLS handshake + MQTT 5 CONNECT/CONNACK +
DISCONNECT in a tight loop, from several processes and threads, with device certificates.

python -m bench._bare_connector PORT CA CERT_DIR SECONDS [PROCESSES] [THREADS]
    -> {"connections": N, "seconds": S, "per_s": R}

Client ids are ``bare-*`` (never a simulated device's, whose persistent session a clean
start would throw away); the certificates are the devices' (the ACL keys on their CN).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import ssl
import sys
import threading
import time
from pathlib import Path


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    # "MQTT", version 5, flags: clean start, keepalive 60, no properties; payload: the id.
    body = b"\x00\x04MQTT\x05\x02\x00\x3c\x00" + len(cid).to_bytes(2, "big") + cid
    return b"\x10" + _varint(len(body)) + body


def _worker(
    port: int, contexts: list[ssl.SSLContext], name: str, until: float, out: list[int]
) -> None:
    done = 0
    while time.monotonic() < until:
        ctx = contexts[done % len(contexts)]
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(connect_packet(f"bare-{name}-{done}"))
                connack = tls.recv(16)
                if len(connack) >= 4 and connack[0] == 0x20 and connack[3] == 0:
                    done += 1
                tls.sendall(b"\xe0\x00")  # DISCONNECT
        except OSError:
            pass
    out.append(done)


def _process(port: int, ca: str, cert_dir: str, seconds: float, threads: int, q: mp.Queue) -> None:  # type: ignore[type-arg]
    contexts = []
    for crt in sorted(Path(cert_dir).glob("*.crt"))[:64]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(ca)
        ctx.load_cert_chain(crt, crt.with_suffix(".key"))
        contexts.append(ctx)
    until = time.monotonic() + seconds
    counts: list[int] = []
    pool = [
        threading.Thread(target=_worker, args=(port, contexts, f"{os.getpid()}-{t}", until, counts))
        for t in range(threads)
    ]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    q.put(sum(counts))


def main() -> None:
    port, ca, cert_dir, seconds = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
    processes = int(sys.argv[5]) if len(sys.argv) > 5 else 2
    threads = int(sys.argv[6]) if len(sys.argv) > 6 else 8
    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    start = time.monotonic()
    procs = [
        mp.Process(target=_process, args=(port, ca, cert_dir, seconds, threads, q))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    total = sum(q.get() for _ in procs)
    for p in procs:
        p.join()
    elapsed = time.monotonic() - start
    print(json.dumps({"connections": total, "seconds": elapsed, "per_s": total / seconds}))


if __name__ == "__main__":
    main()
