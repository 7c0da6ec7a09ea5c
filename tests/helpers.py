"""Helpers shared by tests (import as ``from tests.helpers import ...``)."""

from __future__ import annotations

import ssl
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker.pki import PkiPaths

__all__ = ["end_mqtt_sessions", "make_client_ssl_context", "unique_client_id"]


def make_client_ssl_context(
    pki: PkiPaths, cert: Path | None, key: Path | None = None
) -> ssl.SSLContext:
    """TLS client context trusting ``pki``'s CA, presenting ``cert``/``key`` if given.

    Hostname checking stays on: the broker certificate names ``localhost`` and
    ``127.0.0.1``. Pass ``cert=None`` for a client without a certificate.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=pki.ca_cert)
    if cert is not None:
        ctx.load_cert_chain(certfile=cert, keyfile=key)
    return ctx


def unique_client_id(prefix: str) -> str:
    """An MQTT client id no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def end_mqtt_sessions(
    host: str, port: int, tls: ssl.SSLContext, client_ids: Iterable[str], *, timeout: float = 5.0
) -> None:
    """End the broker's sessions of ``client_ids``: connect as each with a clean start and a
    session expiry of 0, then disconnect (MQTT 5: the old session is discarded at CONNECT,
    the new one ends with the connection).

    A client stopped with a persistent session leaves it on the broker for its expiry
    interval (the fleet's: 1 h). Meanwhile the session keeps collecting what its
    subscriptions match, and in a shared-subscription group Mosquitto 2.0.11 goes on handing
    it its round-robin share of the group's messages: a later test's fleet in the same group
    would never see them. Call this only once the clients are stopped: a live one is kicked.
    """
    for client_id in client_ids:
        _end_mqtt_session(host, port, tls, client_id, timeout)


def _end_mqtt_session(
    host: str, port: int, tls: ssl.SSLContext, client_id: str, timeout: float
) -> None:
    acked: list[Any] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.tls_set_context(tls)
    client.on_connect = lambda _c, _u, _f, rc, _p: acked.append(rc)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    client.connect(host, port, keepalive=30, clean_start=True, properties=props)
    try:
        deadline = time.monotonic() + timeout
        while not acked and time.monotonic() < deadline:
            client.loop(0.05)
    finally:
        client.disconnect()  # (not threaded: written at once)
    if not acked or acked[0].is_failure:
        raise AssertionError(f"could not end MQTT session {client_id!r}: CONNACK {acked}")
