"""The MQTT side of the agent: TLS context, client construction, reconnect backoff.

MQTT 5 over mutual TLS; the client id is the device id and the broker takes the MQTT
username from the client certificate. ``clean_start=False`` plus a session expiry makes
the broker keep the subscription and queue QoS 1 commands while the device is briefly
away. The Last Will is a retained ``status`` "offline".
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import Callable

import aiomqtt
from aiomqtt.client import ProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .config import AgentConfig, TlsConfig
from .errors import ConfigError

__all__ = ["CLIENT_TIMEOUT_S", "backoff_delay", "make_client", "make_ssl_context"]

# Bound on every broker round trip (CONNACK, SUBACK, PUBACK, DISCONNECT).
CLIENT_TIMEOUT_S = 5.0

_mqtt_log = logging.getLogger(f"{__name__}.paho")
# paho is chatty at DEBUG; keep it to warnings so packet traces never reach the logs.
_mqtt_log.setLevel(logging.WARNING)


def make_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """One client context: verify the broker against our CA, present the device cert."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("tls.ca_file", f"cannot load CA: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("tls.cert_file", f"cannot load certificate and key: {exc}") from None
    return ctx


def backoff_delay(
    attempt: int,
    low: float,
    high: float,
    *,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Full jitter over [low, min(high, low * 2**attempt)].

    Spreading reconnects over the whole interval keeps a broker restart from turning into
    a thundering herd of simultaneous TLS handshakes; ``low`` stays a real minimum so a
    down broker is never hammered in a tight loop.
    """
    ceiling = min(high, low * 2 ** min(attempt, 32))
    return uniform(low, max(low, ceiling))


def make_client(
    config: AgentConfig, tls: ssl.SSLContext, *, will_topic: str, will_payload: bytes
) -> aiomqtt.Client:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = config.broker.session_expiry_s
    return aiomqtt.Client(
        config.broker.host,
        config.broker.port,
        identifier=config.device_id,
        protocol=ProtocolVersion.V5,
        clean_start=False,
        properties=props,
        keepalive=config.broker.keepalive_s,
        tls_context=tls,
        will=aiomqtt.Will(will_topic, will_payload, qos=1, retain=True),
        timeout=CLIENT_TIMEOUT_S,
        logger=_mqtt_log,
        max_queued_incoming_messages=1000,
    )
