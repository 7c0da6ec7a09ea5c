"""The production broker config against a real Mosquitto 2.0.11, over real TLS.

Observed Mosquitto 2.0.11 behaviour these tests pin down:

* SUBSCRIBE is never refused by the acl_file ACL: a device subscribing to "#",
  "$SYS/#" or another device's topics gets SUBACK "granted QoS 1". The ACL is applied
  when messages are routed (read access checked per message, retained ones too), so
  the device receives nothing it may not read. Tests assert the grant explicitly
  (if a future Mosquitto refuses at SUBACK, update them to assert 0x87) and, above
  all, that nothing is delivered.
* A forbidden PUBLISH is dropped; with MQTT 5 the PUBACK carries 0x87 Not
  authorized (MQTT 3.1.1 cannot say so: its PUBACK looks like success).
* ``tls_version tlsv1.2`` is a floor: 1.2 and 1.3 accepted, 1.1 refused with a
  protocol_version alert. (Without it, 2.0.11 accepts TLS 1.1 if the ciphers allow.)
* SIGHUP re-reads the CRL for NEW handshakes; an established connection of a
  now-revoked certificate survives until the broker restarts.
* A shared subscription's round robin does not skip a member whose persistent session
  is disconnected: it gets its turns (queued) until the session expires or is ended.

"Receives nothing" is checked with a barrier, not a sleep: after the forbidden
traffic, a message the client IS allowed to receive is published; Mosquitto is
single-threaded and delivers in order on one connection, so once the barrier
arrives anything forbidden would already have arrived.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker.errors import BrokerError, BrokerStartError
from broker.launcher import (
    ENVIRONMENT_DIRECTIVES,
    PRODUCTION_ACL,
    PRODUCTION_CONFIG,
    MosquittoProcess,
    config_directives,
    render_config,
    stop_by_pidfile,
)
from broker.pki import PkiPaths, issue_device_cert, make_foreign_ca, revoke
from tests.helpers import end_mqtt_sessions, make_client_ssl_context, unique_client_id

pytestmark = pytest.mark.integration

WAIT = 5.0
GRANTED_QOS1 = 1
NOT_AUTHORIZED = 0x87
CONNACK_OK = b"\x20\x02\x00\x00"
# PUBACK success, and 0x10 "no matching subscribers" (accepted, nobody listening).
ACCEPTED = (0x00, 0x10)
DEVICE_TOPICS = ("state", "hb", "status", "ack", "event", "csr")

DeviceCert = Callable[[str], tuple[Path, Path]]


# -------------------------------------------------------------------- clients


class Client:
    """A paho MQTT 5 client with bounded, synchronous helpers for tests."""

    def __init__(
        self,
        broker: MosquittoProcess,
        ctx: ssl.SSLContext,
        client_id: str,
        *,
        username: str | None = None,
        clean_start: bool = True,
        session_expiry: int = 0,
    ) -> None:
        self.client_id = client_id
        self._cond = threading.Condition()
        self._acks: dict[int, Any] = {}
        self._connack: tuple[bool, int] | None = None
        self.messages: list[tuple[str, bytes]] = []
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        c.tls_set_context(ctx)
        if username is not None:
            c.username_pw_set(username, "ignored-password")
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        self._c = c
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry
        c.connect(broker.host, broker.port, keepalive=30, clean_start=clean_start, properties=props)
        c.loop_start()
        self.session_present, rc = self._wait(lambda: self._connack)
        assert rc == 0, f"CONNACK {rc}"

    def _on_connect(self, _c: Any, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        with self._cond:
            self._connack = (bool(flags.session_present), rc.value)
            self._cond.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, rcs: Any, _p: Any) -> None:
        with self._cond:
            self._acks[mid] = [rc.value for rc in rcs]
            self._cond.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with self._cond:
            self._acks[mid] = rc.value
            self._cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, msg.payload))
            self._cond.notify_all()

    def _wait(self, get: Callable[[], Any], timeout: float = WAIT) -> Any:
        with self._cond:
            if not self._cond.wait_for(lambda: get() is not None, timeout=timeout):
                raise AssertionError(f"{self.client_id}: timed out after {timeout}s")
            return get()

    def subscribe(self, topic: str, qos: int = 1) -> int:
        """SUBSCRIBE and return the SUBACK reason code."""
        rc, mid = self._c.subscribe(topic, qos=qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        codes: list[int] = self._wait(lambda: self._acks.get(mid))
        return codes[0]

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """PUBLISH at QoS 1 and return the PUBACK reason code."""
        info = self._c.publish(topic, payload, qos=qos, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        rc: int = self._wait(lambda: self._acks.get(info.mid))
        return rc

    def wait_for(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Wait for one message and return everything received so far."""
        self._wait(lambda: True if (topic, payload) in self.messages else None)
        with self._cond:
            return list(self.messages)

    def is_connected(self) -> bool:
        return bool(self._c.is_connected())

    def close(self) -> None:
        self._c.disconnect()
        self._c.loop_stop()


@pytest.fixture
def connect(mosquitto: MosquittoProcess, pki_dir: PkiPaths) -> Iterator[Callable[..., Client]]:
    """``connect(cert, key, **kw)``: a connected client, closed after the test."""
    clients: list[Client] = []

    def make(cert: Path, key: Path, *, broker: MosquittoProcess | None = None, **kw: Any) -> Client:
        ctx = make_client_ssl_context(pki_dir, cert, key)
        client_id = kw.pop("client_id", None) or unique_client_id(cert.stem)
        client = Client(broker or mosquitto, ctx, client_id, **kw)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def fleet(connect: Callable[..., Client], pki_dir: PkiPaths) -> Client:
    return connect(pki_dir.fleet_cert, pki_dir.fleet_key)


@pytest.fixture
def new_device(device_cert: DeviceCert) -> Callable[[str], tuple[str, Path, Path]]:
    """``new_device("a") -> (device_id, cert, key)`` with a device id unique to the test."""

    def make(label: str) -> tuple[str, Path, Path]:
        device_id = f"dev-{label}-{uuid.uuid4().hex[:8]}"
        cert, key = device_cert(device_id)
        return device_id, cert, key

    return make


def dev_topic(device_id: str, leaf: str) -> str:
    return f"tillsyn/v1/dev/{device_id}/{leaf}"


def wait_for_log(broker: MosquittoProcess, text: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while text not in broker.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not logged within {timeout}s"
        time.sleep(0.02)


# ------------------------------------------------------------- raw handshakes


def _connect_packet(client_id: str) -> bytes:
    """A minimal MQTT 3.1.1 CONNECT (clean session, keepalive 60)."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack("!H", len(cid)) + cid
    return bytes([0x10, len(body)]) + body


def mqtt_handshake(broker: MosquittoProcess, ctx: ssl.SSLContext | None) -> bytes | Exception:
    """TCP (+TLS if ``ctx``) + CONNECT; the first bytes answered, or the error raised."""
    sock = socket.create_connection((broker.host, broker.port), timeout=WAIT)
    try:
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_hostname="localhost")
        sock.sendall(_connect_packet(unique_client_id("probe")))
        return sock.recv(4)
    except (ssl.SSLError, OSError) as exc:
        return exc
    finally:
        sock.close()


def assert_refused(result: bytes | Exception) -> None:
    # Refusal shows as a TLS alert, a reset or EOF; never as a CONNACK.
    assert isinstance(result, Exception) or result == b"", f"broker answered {result!r}"


# ------------------------------------------------------------------- allowed


def test_device_publishes_its_own_topics_and_fleet_receives(
    connect: Callable[..., Client], fleet: Client, new_device: Any
) -> None:
    device_id, cert, key = new_device("pub")
    assert fleet.subscribe(dev_topic(device_id, "#")) == GRANTED_QOS1
    device = connect(cert, key)
    for leaf in DEVICE_TOPICS:
        assert device.publish(dev_topic(device_id, leaf), leaf.encode()) in ACCEPTED
    for leaf in DEVICE_TOPICS:
        fleet.wait_for(dev_topic(device_id, leaf), leaf.encode())


def test_device_receives_its_own_cmd_from_fleet(
    connect: Callable[..., Client], fleet: Client, new_device: Any
) -> None:
    device_id, cert, key = new_device("cmd")
    device = connect(cert, key)
    assert device.subscribe(dev_topic(device_id, "cmd")) == GRANTED_QOS1
    assert fleet.publish(dev_topic(device_id, "cmd"), b"arm") in ACCEPTED
    assert device.wait_for(dev_topic(device_id, "cmd"), b"arm") == [
        (dev_topic(device_id, "cmd"), b"arm")
    ]


def test_fleet_shared_subscription_receives_heartbeats(
    connect: Callable[..., Client], fleet: Client, new_device: Any, pki_dir: PkiPaths
) -> None:
    device_id, cert, key = new_device("share")
    assert fleet.subscribe("$share/fleet/tillsyn/v1/dev/+/hb") == GRANTED_QOS1
    device = connect(cert, key)
    assert device.publish(dev_topic(device_id, "hb"), b"beat") in ACCEPTED
    fleet.wait_for(dev_topic(device_id, "hb"), b"beat")


def test_stopped_persistent_session_keeps_its_share_until_ended(
    connect: Callable[..., Client], fleet: Client, mosquitto: MosquittoProcess, pki_dir: PkiPaths
) -> None:
    """A fleet stopped with a persistent session stays a member of its shared group: the
    broker goes on queueing its share of the group's messages, which the live members
    never see. Tests end such sessions (``end_mqtt_sessions``, the ``mqtt_sessions``
    fixture): the broker is shared by the whole test session."""
    base = f"tillsyn/v1/test-{uuid.uuid4().hex[:8]}"
    shared, barrier = f"$share/g-{uuid.uuid4().hex[:8]}/{base}/msg", f"{base}/barrier"
    gone = connect(pki_dir.fleet_cert, pki_dir.fleet_key, session_expiry=300)
    assert gone.subscribe(shared) == GRANTED_QOS1
    gone.close()
    wait_for_log(mosquitto, f"Client {gone.client_id} disconnected.")
    live = connect(pki_dir.fleet_cert, pki_dir.fleet_key)
    assert live.subscribe(shared) == GRANTED_QOS1
    assert live.subscribe(barrier) == GRANTED_QOS1

    def delivered(tag: bytes, n: int = 4) -> int:
        for i in range(n):
            assert fleet.publish(f"{base}/msg", tag + bytes([48 + i])) in ACCEPTED
        assert fleet.publish(barrier, tag) in ACCEPTED  # in order after them (one connection)
        got = live.wait_for(barrier, tag)
        return sum(1 for t, p in got if t == f"{base}/msg" and p.startswith(tag))

    assert delivered(b"before") < 4  # the stopped session took its turns
    tls = make_client_ssl_context(pki_dir, pki_dir.fleet_cert, pki_dir.fleet_key)
    end_mqtt_sessions(mosquitto.host, mosquitto.port, tls, [gone.client_id])
    assert delivered(b"after") == 4  # ended: every message reaches the live member
    back = connect(
        pki_dir.fleet_cert, pki_dir.fleet_key, client_id=gone.client_id, clean_start=False
    )
    assert not back.session_present


# ------------------------------------------------------------------- reading


def test_device_cannot_read_another_devices_topics(
    connect: Callable[..., Client], fleet: Client, new_device: Any
) -> None:
    a_id, a_cert, a_key = new_device("reader")
    b_id, b_cert, b_key = new_device("victim")
    b = connect(b_cert, b_key)
    # Retained before A subscribes: must not be replayed to A either.
    assert b.publish(dev_topic(b_id, "state"), b"b-state", retain=True) in ACCEPTED
    a = connect(a_cert, a_key)
    # 2.0.11 grants these SUBSCRIBEs (see module docstring); delivery is what is denied.
    for topic in (
        dev_topic(b_id, "#"),
        dev_topic(b_id, "cmd"),
        dev_topic(b_id, "hb"),
        "tillsyn/v1/dev/+/state",
    ):
        assert a.subscribe(topic) == GRANTED_QOS1, topic
    assert a.subscribe(dev_topic(a_id, "cmd")) == GRANTED_QOS1
    for leaf in DEVICE_TOPICS:
        assert b.publish(dev_topic(b_id, leaf), b"b-" + leaf.encode()) in ACCEPTED
    assert fleet.publish(dev_topic(b_id, "cmd"), b"for-b") in ACCEPTED
    assert fleet.publish(dev_topic(a_id, "cmd"), b"barrier") in ACCEPTED
    received = a.wait_for(dev_topic(a_id, "cmd"), b"barrier")
    assert received == [(dev_topic(a_id, "cmd"), b"barrier")]
    b.publish(dev_topic(b_id, "state"), b"", retain=True)


def test_device_subscribing_to_everything_receives_nothing_else(
    connect: Callable[..., Client], fleet: Client, new_device: Any
) -> None:
    a_id, a_cert, a_key = new_device("greedy")
    b_id, b_cert, b_key = new_device("other")
    b = connect(b_cert, b_key)
    assert b.publish(dev_topic(b_id, "status"), b"online", retain=True) in ACCEPTED
    a = connect(a_cert, a_key)
    for topic in ("#", "tillsyn/#", "+/+/+/+/+", "$SYS/#", "$share/x/tillsyn/v1/dev/+/hb"):
        # Documented 2.0.11 behaviour: granted at SUBACK, filtered at delivery.
        assert a.subscribe(topic) == GRANTED_QOS1, topic
    assert b.publish(dev_topic(b_id, "hb"), b"b-hb") in ACCEPTED
    assert fleet.publish(dev_topic(b_id, "cmd"), b"for-b") in ACCEPTED
    assert fleet.publish("tillsyn/v1/fleet/visits", b"fleet-only") in ACCEPTED
    assert fleet.publish(dev_topic(a_id, "cmd"), b"barrier") in ACCEPTED
    received = a.wait_for(dev_topic(a_id, "cmd"), b"barrier")
    assert {topic for topic, _ in received} == {dev_topic(a_id, "cmd")}
    b.publish(dev_topic(b_id, "status"), b"", retain=True)


def test_connect_username_cannot_claim_fleet_identity(
    connect: Callable[..., Client], fleet: Client, new_device: Any
) -> None:
    """use_identity_as_username: the CN wins over a username sent in CONNECT."""
    a_id, a_cert, a_key = new_device("spoof")
    b_id, _, _ = new_device("target")
    a = connect(a_cert, a_key, username="tillsyn-fleet")
    a.subscribe("tillsyn/v1/#")
    assert a.publish(dev_topic(b_id, "cmd"), b"forged") == NOT_AUTHORIZED
    assert fleet.publish(dev_topic(b_id, "cmd"), b"for-b") in ACCEPTED
    assert fleet.publish(dev_topic(a_id, "cmd"), b"barrier") in ACCEPTED
    assert a.wait_for(dev_topic(a_id, "cmd"), b"barrier") == [(dev_topic(a_id, "cmd"), b"barrier")]


def test_session_takeover_does_not_leak_queued_commands(
    connect: Callable[..., Client], fleet: Client, new_device: Any, mosquitto: MosquittoProcess
) -> None:
    """A device reusing another device's client id gets none of its queued commands."""
    a_id, a_cert, a_key = new_device("thief")
    b_id, b_cert, b_key = new_device("owner")
    b = connect(b_cert, b_key, client_id=b_id, session_expiry=60)
    assert b.subscribe(dev_topic(b_id, "cmd")) == GRANTED_QOS1
    b.close()
    # Make sure the command is queued for an offline session, not delivered live.
    wait_for_log(mosquitto, f"Client {b_id} disconnected.")
    assert fleet.publish(dev_topic(b_id, "cmd"), b"queued-for-b") in ACCEPTED
    thief = connect(a_cert, a_key, client_id=b_id, clean_start=False, session_expiry=0)
    assert thief.session_present  # the session is taken over ...
    assert thief.subscribe(dev_topic(a_id, "cmd")) == GRANTED_QOS1
    assert fleet.publish(dev_topic(a_id, "cmd"), b"barrier") in ACCEPTED
    # ... but its queued command is not delivered to another identity.
    assert thief.wait_for(dev_topic(a_id, "cmd"), b"barrier") == [
        (dev_topic(a_id, "cmd"), b"barrier")
    ]


def test_device_renews_only_over_its_own_csr_and_cert_topics(
    connect: Callable[..., Client], fleet: Client, new_device: Any
) -> None:
    """Certificate renewal (fleet/renewal.py): a device asks on its own ``csr`` and gets
    the answer on its own ``cert``; it can neither ask for another device nor hand itself
    (or anyone) a certificate."""
    a_id, a_cert, a_key = new_device("renew")
    b_id, b_cert, b_key = new_device("renew-other")
    assert fleet.subscribe(dev_topic(a_id, "csr")) == GRANTED_QOS1
    assert fleet.subscribe(dev_topic(b_id, "csr")) == GRANTED_QOS1
    b = connect(b_cert, b_key)
    assert b.subscribe(dev_topic(b_id, "cert")) == GRANTED_QOS1
    a = connect(a_cert, a_key)
    assert a.subscribe(dev_topic(a_id, "cert")) == GRANTED_QOS1
    # Granted at SUBACK (2.0.11), filtered at delivery: see the module docstring.
    assert a.subscribe(dev_topic(b_id, "cert")) == GRANTED_QOS1
    assert a.publish(dev_topic(b_id, "csr"), b"csr-for-b") == NOT_AUTHORIZED
    assert a.publish(dev_topic(a_id, "cert"), b"self-made") == NOT_AUTHORIZED
    assert a.publish(dev_topic(b_id, "cert"), b"planted") == NOT_AUTHORIZED
    assert a.publish(dev_topic(a_id, "csr"), b"csr-a") in ACCEPTED
    assert fleet.wait_for(dev_topic(a_id, "csr"), b"csr-a") == [(dev_topic(a_id, "csr"), b"csr-a")]
    assert fleet.publish(dev_topic(b_id, "cert"), b"cert-for-b") in ACCEPTED
    assert fleet.publish(dev_topic(a_id, "cert"), b"cert-for-a") in ACCEPTED
    assert a.wait_for(dev_topic(a_id, "cert"), b"cert-for-a") == [
        (dev_topic(a_id, "cert"), b"cert-for-a")
    ]
    assert b.wait_for(dev_topic(b_id, "cert"), b"cert-for-b") == [
        (dev_topic(b_id, "cert"), b"cert-for-b")
    ]


# ------------------------------------------------------------------- writing


@pytest.mark.parametrize("whose", ["own", "other"])
def test_device_cannot_publish_a_cmd(
    connect: Callable[..., Client], fleet: Client, new_device: Any, whose: str
) -> None:
    a_id, a_cert, a_key = new_device("forger")
    b_id, b_cert, b_key = new_device("target")
    target_id = a_id if whose == "own" else b_id
    assert fleet.subscribe(dev_topic(target_id, "cmd")) == GRANTED_QOS1
    assert fleet.subscribe(dev_topic(a_id, "hb")) == GRANTED_QOS1
    b = connect(b_cert, b_key)
    assert b.subscribe(dev_topic(b_id, "cmd")) == GRANTED_QOS1
    a = connect(a_cert, a_key)
    assert a.publish(dev_topic(target_id, "cmd"), b"forged") == NOT_AUTHORIZED
    assert a.publish(dev_topic(target_id, "cmd"), b"forged-retained", retain=True) == (
        NOT_AUTHORIZED
    )
    assert a.publish(dev_topic(a_id, "hb"), b"barrier") in ACCEPTED
    assert fleet.wait_for(dev_topic(a_id, "hb"), b"barrier") == [
        (dev_topic(a_id, "hb"), b"barrier")
    ]
    assert fleet.publish(dev_topic(b_id, "cmd"), b"barrier-b") in ACCEPTED
    assert b.wait_for(dev_topic(b_id, "cmd"), b"barrier-b") == [
        (dev_topic(b_id, "cmd"), b"barrier-b")
    ]


def test_device_cannot_publish_on_another_devices_topics(
    connect: Callable[..., Client], fleet: Client, new_device: Any
) -> None:
    a_id, a_cert, a_key = new_device("impostor")
    b_id, _, _ = new_device("victim")
    assert fleet.subscribe(dev_topic(b_id, "#")) == GRANTED_QOS1
    assert fleet.subscribe(dev_topic(a_id, "hb")) == GRANTED_QOS1
    a = connect(a_cert, a_key)
    for leaf in DEVICE_TOPICS:
        assert a.publish(dev_topic(b_id, leaf), b"spoofed") == NOT_AUTHORIZED, leaf
    for topic in ("tillsyn/v1/fleet/visits", "tillsyn/v1/dev", "other/topic"):
        assert a.publish(topic, b"spoofed") == NOT_AUTHORIZED, topic
    assert a.publish(dev_topic(a_id, "hb"), b"barrier") in ACCEPTED
    assert fleet.wait_for(dev_topic(a_id, "hb"), b"barrier") == [
        (dev_topic(a_id, "hb"), b"barrier")
    ]


# ------------------------------------------------------------ authentication


def test_client_without_certificate_is_refused(
    mosquitto: MosquittoProcess, pki_dir: PkiPaths
) -> None:
    assert_refused(mqtt_handshake(mosquitto, make_client_ssl_context(pki_dir, None)))


def test_client_with_certificate_from_another_ca_is_refused(
    mosquitto: MosquittoProcess, pki_dir: PkiPaths, tmp_path: Path
) -> None:
    foreign = make_foreign_ca(tmp_path / "foreign")
    cert, key = issue_device_cert(foreign.directory, "dev-foreign")
    # Trust the real CA (so the server cert verifies), present the foreign cert.
    assert_refused(mqtt_handshake(mosquitto, make_client_ssl_context(pki_dir, cert, key)))


def test_plain_tcp_is_refused(mosquitto: MosquittoProcess) -> None:
    assert_refused(mqtt_handshake(mosquitto, None))


def test_valid_device_is_accepted_by_raw_handshake(
    mosquitto: MosquittoProcess, pki_dir: PkiPaths, new_device: Any
) -> None:
    """Control for the refusal tests: the same probe succeeds with a good cert."""
    _, cert, key = new_device("control")
    assert mqtt_handshake(mosquitto, make_client_ssl_context(pki_dir, cert, key)) == CONNACK_OK


def _tls_context(pki: PkiPaths, cert: Path, key: Path, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = make_client_ssl_context(pki, cert, key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
        ctx.maximum_version = version
    if version < ssl.TLSVersion.TLSv1_2:
        # Let OUR side offer TLS 1.1 (OpenSSL 3 forbids it above security level 0),
        # so a refusal can only come from the broker.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def test_tls_1_1_is_refused(
    mosquitto: MosquittoProcess, pki_dir: PkiPaths, new_device: Any
) -> None:
    _, cert, key = new_device("tls11")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        version = ssl.TLSVersion.TLSv1_1
    result = mqtt_handshake(mosquitto, _tls_context(pki_dir, cert, key, version))
    assert isinstance(result, ssl.SSLError)
    assert "PROTOCOL_VERSION" in str(result).upper()  # the broker's alert


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_1_2_and_1_3_are_accepted(
    mosquitto: MosquittoProcess, pki_dir: PkiPaths, new_device: Any, version: ssl.TLSVersion
) -> None:
    _, cert, key = new_device("tlsok")
    ctx = _tls_context(pki_dir, cert, key, version)
    with (
        socket.create_connection((mosquitto.host, mosquitto.port), timeout=WAIT) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() == version.name.replace("_", ".")
        tls.sendall(_connect_packet(unique_client_id("tls")))
        assert tls.recv(4) == CONNACK_OK


# ----------------------------------------------------------------- revocation


@pytest.fixture
def private_broker(pki_dir: PkiPaths, tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A broker of our own: these tests restart it and must not disturb the shared one."""
    proc = MosquittoProcess(pki=pki_dir, workdir=tmp_path / "broker")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def test_revoked_certificate_is_refused(
    private_broker: MosquittoProcess,
    pki_dir: PkiPaths,
    new_device: Any,
    connect: Callable[..., Client],
) -> None:
    _, cert, key = new_device("revoked")
    _, other_cert, other_key = new_device("still-ok")
    ctx = make_client_ssl_context(pki_dir, cert, key)
    other_ctx = make_client_ssl_context(pki_dir, other_cert, other_key)
    assert mqtt_handshake(private_broker, ctx) == CONNACK_OK
    live = connect(cert, key, broker=private_broker)

    revoke(pki_dir.directory, cert)

    # SIGHUP: 2.0.11 re-reads the CRL, so new handshakes are refused at once ...
    private_broker.reload()
    assert_refused(mqtt_handshake(private_broker, ctx))
    assert mqtt_handshake(private_broker, other_ctx) == CONNACK_OK
    # ... but the connection made before the revocation is NOT dropped by SIGHUP.
    assert live.is_connected()

    # A restart drops every connection; the revoked cert cannot come back.
    port = private_broker.port
    private_broker.restart()
    assert private_broker.port == port
    assert_refused(mqtt_handshake(private_broker, ctx))
    assert mqtt_handshake(private_broker, other_ctx) == CONNACK_OK


def test_revoked_device_is_kicked_by_a_fleet_session_takeover_and_stays_out(
    private_broker: MosquittoProcess,
    pki_dir: PkiPaths,
    new_device: Any,
    connect: Callable[..., Client],
) -> None:
    """What retirement relies on (fleet/certs.py): SIGHUP alone leaves a revoked device
    connected, but the fleet connecting with the device's client id takes its session
    over; the device is dropped and its reconnect is refused by the new CRL."""
    device_id, cert, key = new_device("kicked")
    ctx = make_client_ssl_context(pki_dir, cert, key)
    live = connect(cert, key, broker=private_broker, client_id=device_id, session_expiry=300)
    revoke(pki_dir.directory, cert)
    private_broker.reload()
    assert live.is_connected()
    kicker = connect(
        pki_dir.fleet_cert, pki_dir.fleet_key, broker=private_broker, client_id=device_id
    )
    deadline = time.monotonic() + WAIT
    while live.is_connected():
        assert time.monotonic() < deadline, "the takeover did not drop the revoked device"
        time.sleep(0.02)
    kicker.close()
    assert_refused(mqtt_handshake(private_broker, ctx))


# ------------------------------------------------------------------- launcher


def test_rendered_config_keeps_production_security_directives(
    mosquitto: MosquittoProcess, pki_dir: PkiPaths, tmp_path: Path
) -> None:
    production = config_directives(PRODUCTION_CONFIG.read_text())
    rendered_text = render_config(pki=pki_dir, workdir=tmp_path, port=18883)

    def kept(directives: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [d for d in directives if d[0] not in ENVIRONMENT_DIRECTIVES]

    assert kept(config_directives(rendered_text)) == kept(production)
    # ... and the running broker uses exactly such a rendering.
    running = config_directives(mosquitto.config_path.read_text())
    assert kept(running) == kept(production)
    assert (mosquitto.workdir / "acl.conf").read_text() == PRODUCTION_ACL.read_text()

    prod = dict(production)
    for name, value in {
        "allow_anonymous": "false",
        "require_certificate": "true",
        "use_identity_as_username": "true",
        "tls_version": "tlsv1.2",
        "per_listener_settings": "false",
    }.items():
        assert prod[name] == value, name
    assert [v for n, v in production if n == "listener"] == ["8883"]
    assert "port" not in prod  # the legacy default listener would be plain TCP
    assert prod["cafile"] == "/mosquitto/pki/ca.crt"
    assert prod["crlfile"] == "/mosquitto/pki/crl.pem"
    assert prod["acl_file"] == "/mosquitto/config/acl.conf"

    rendered = dict(config_directives(rendered_text))
    assert rendered["listener"] == "18883 127.0.0.1"
    assert rendered["crlfile"] == str(pki_dir.crl)
    assert rendered["log_dest"] == f"file {tmp_path / 'mosquitto.log'}"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda text: text + "\nlistener 1883\n",
        lambda text: text + "\nport 1883\n",
        lambda text: text.replace("crlfile ", "#crlfile "),
    ],
    ids=["second-listener", "legacy-port", "no-crlfile"],
)
def test_render_refuses_a_template_that_drifts(
    pki_dir: PkiPaths, tmp_path: Path, mutate: Callable[[str], str]
) -> None:
    template = tmp_path / "mosquitto.conf"
    template.write_text(mutate(PRODUCTION_CONFIG.read_text()))
    with pytest.raises(BrokerError):
        render_config(pki=pki_dir, workdir=tmp_path, port=18883, template=template)


def test_start_failure_reports_the_log(
    mosquitto: MosquittoProcess, pki_dir: PkiPaths, tmp_path: Path
) -> None:
    clash = MosquittoProcess(pki=pki_dir, workdir=tmp_path / "clash", port=mosquitto.port)
    with pytest.raises(BrokerStartError) as info:
        clash.start()
    assert info.value.port == mosquitto.port
    assert "in use" in info.value.log_tail.lower()
    assert not clash.is_running()


def test_detached_start_and_stop_by_pidfile(pki_dir: PkiPaths, tmp_path: Path) -> None:
    workdir = tmp_path / "detached"
    proc = MosquittoProcess(pki=pki_dir, workdir=workdir).start(detached=True)
    pid = int((workdir / "mosquitto.pid").read_text())
    assert pid == proc.pid
    assert stop_by_pidfile(workdir) is True
    assert not (workdir / "mosquitto.pid").exists()
    proc.stop()  # reaps the child; nothing left to signal
    assert stop_by_pidfile(workdir) is False


def test_kill_and_restart_keep_the_port(
    private_broker: MosquittoProcess, pki_dir: PkiPaths, new_device: Any
) -> None:
    _, cert, key = new_device("chaos")
    ctx = make_client_ssl_context(pki_dir, cert, key)
    private_broker.kill()
    assert not private_broker.is_running()
    started = time.monotonic()
    private_broker.start()
    assert time.monotonic() - started < WAIT
    assert mqtt_handshake(private_broker, ctx) == CONNACK_OK
