"""Shared set-up for benchmarks: a throwaway PKI + Mosquitto with the production config,
heartbeat payloads, publisher processes, and CPU accounting from /proc."""

from __future__ import annotations

import multiprocessing as mp
import os
import ssl
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from broker.launcher import MosquittoProcess
from broker.pki import PkiPaths, init_pki
from tillsyn_protocol import CameraHealth, Heartbeat, LockState, encode

CLK_TCK = os.sysconf("SC_CLK_TCK")


def start_broker(root: Path) -> tuple[PkiPaths, MosquittoProcess]:
    pki = init_pki(root / "pki")
    broker = MosquittoProcess(pki=pki, workdir=root / "broker").start()
    return pki, broker


def tls(pki: PkiPaths, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=pki.ca_cert)
    ctx.load_cert_chain(cert, key)
    return ctx


def heartbeat(seq: int) -> bytes:
    return encode(
        Heartbeat(
            ts=time.time(),
            seq=seq,
            uptime_s=100.0,
            state=LockState.LOCKED,
            camera=CameraHealth.OK,
            clock_synced=True,
            fw="0.1.0",
        )
    )


def device_ids(n: int) -> list[str]:
    return [f"dev-bench-{i:06d}" for i in range(n)]


def _publish(pki: PkiPaths, port: int, ids: list[str], count: int, done: mp.Queue) -> None:
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{os.getpid()}", protocol=mqtt.MQTTv5
    )
    client.tls_set_context(tls(pki, pki.fleet_cert, pki.fleet_key))
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    payload = heartbeat(1)
    infos = []
    for i in range(count):
        infos.append(client.publish(f"tillsyn/v1/dev/{ids[i % len(ids)]}/hb", payload, qos=1))
        if len(infos) >= 2000:
            for info in infos:
                info.wait_for_publish(30)
            infos.clear()
    for info in infos:
        info.wait_for_publish(30)
    client.loop_stop()
    client.disconnect()
    done.put(count)


def publish_load(pki: PkiPaths, port: int, ids: list[str], total: int, procs: int = 2) -> float:
    """Publish ``total`` heartbeats (QoS 1) from ``procs`` processes; returns seconds taken."""
    done: mp.Queue = mp.Queue()
    per = total // procs
    workers = [mp.Process(target=_publish, args=(pki, port, ids, per, done)) for _ in range(procs)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - start


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def py_spy() -> str:
    """py-spy beside this interpreter (pip install py-spy into the venv), else on PATH."""
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else "py-spy"
