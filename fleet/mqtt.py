"""The fleet's MQTT link: one persistent MQTT 5 session over mutual TLS, reconnecting with
jittered exponential backoff. Ingest is handed to a callback; publishing is best effort
while disconnected (the command ledger re-sends what was not acknowledged)."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Iterable

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tillsyn_protocol import Channel, subscription

from .config import FleetSettings
from .metrics import FleetMetrics
from .outbound import Publish

log = logging.getLogger(__name__)

INGEST_CHANNELS = (Channel.STATUS, Channel.STATE, Channel.ACK, Channel.EVENT, Channel.HB)
SESSION_EXPIRY_S = 3600


def client_tls_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class MqttLink:
    def __init__(
        self,
        settings: FleetSettings,
        metrics: FleetMetrics,
        on_message: Callable[[str, bytes], Awaitable[None]],
        on_connect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._on_message = on_message
        self._on_connect = on_connect
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()

    def _make_client(self) -> aiomqtt.Client:
        s = self._settings
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        return aiomqtt.Client(
            s.broker_host,
            s.broker_port,
            identifier=s.mqtt_client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,  # keep our queued acks and events across a restart
            properties=props,
            tls_context=client_tls_context(str(s.ca_file), str(s.cert_file), str(s.key_file)),
            keepalive=30,
            timeout=10,
            max_queued_incoming_messages=100_000,
        )

    async def run(self) -> None:
        backoff = 0.5
        while True:
            try:
                async with self._make_client() as client:
                    self._client = client
                    group = self._settings.shared_group
                    for channel in INGEST_CHANNELS:
                        await client.subscribe(subscription(channel, shared_group=group), qos=1)
                    self._metrics.mqtt_connected.set(1)
                    self._metrics.mqtt_connects.inc()
                    self.connected.set()
                    backoff = 0.5
                    log.info(
                        "connected to broker %s:%s",
                        self._settings.broker_host,
                        self._settings.broker_port,
                    )
                    if self._on_connect is not None:
                        await self._on_connect()
                    async for message in client.messages:
                        await self._on_message(message.topic.value, bytes(message.payload))
            except aiomqtt.MqttError as exc:
                log.warning("broker connection lost: %s; retrying", str(exc)[:200])
            finally:
                self._client = None
                self.connected.clear()
                self._metrics.mqtt_connected.set(0)
            # Full jitter: a fleet of replicas never reconnects in lockstep.
            await asyncio.sleep(random.uniform(0, backoff))
            backoff = min(backoff * 2, 30.0)

    async def publish(self, items: Iterable[Publish]) -> int:
        """Send what can be sent now; returns how many were handed to the broker."""
        client = self._client
        sent = 0
        if client is None:
            return 0
        for item in items:
            props = None
            if item.expiry_s is not None:
                props = Properties(PacketTypes.PUBLISH)
                props.MessageExpiryInterval = item.expiry_s
            try:
                await client.publish(
                    item.topic, item.payload, qos=item.qos, retain=item.retain, properties=props
                )
                sent += 1
            except aiomqtt.MqttError as exc:
                log.warning("publish failed: %s", str(exc)[:200])
                break
        return sent
