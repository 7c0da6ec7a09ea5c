"""Certificate renewal on the device, over its current mutual-TLS connection.

Once the certificate passes its renewal point (``renew_after``, set by the fleet at a
share of its life), while connected::

    make the next generation's key (kept on disk across reboots until installed)
    publish {"op": "renew", "req": R, "csr": ...} on tillsyn/v1/dev/{id}/csr
    receive {"req": R, "result": "issued", "certificate": ...} on .../cert
    check it (our new key, our id, our shipped CA), store it, switch identity.json to it
    reconnect with it at once (a clean DISCONNECT: no Last Will, no offline blip)
    publish {"op": "confirm", "serial": S} over the new connection; the fleet then
    retires the old certificate and the device forgets it

The lock state machine does not notice any of this: a window that is open stays open
(the timers are local), and a command queued in the persistent session during the
reconnect is delivered on the new connection. A refusal or no answer is retried with
backoff, long before the old certificate expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import aiomqtt
from pydantic import ValidationError

from tillsyn_protocol.enrollment import CertReply, RenewConfirm, RenewRequest
from tillsyn_protocol.topics import CertChannel, cert_topic

from .config import TlsConfig
from .errors import ConfigError
from .identity import Identity, IdentityStore, check_delivered, make_csr, request_id
from .link import backoff_delay, make_ssl_context

if TYPE_CHECKING:
    from .agent import Agent

__all__ = ["Renewer"]

log = logging.getLogger(__name__)

REPLY_TIMEOUT_S = 30.0
RETRY_MIN_S = 10.0
RETRY_MAX_S = 3600.0
CHECK_EVERY_S = 30.0


class Renewer:
    def __init__(
        self,
        agent: Agent,
        store: IdentityStore,
        identity: Identity,
        ca_file: Path,
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._agent = agent
        self.store = store
        self.identity = identity
        self._ca_file = ca_file
        self._wall = wall
        device_id = identity.device_id
        self._csr_topic = cert_topic(device_id, CertChannel.CSR)
        self._cert_topic = cert_topic(device_id, CertChannel.CERT)
        self._req: str | None = None
        self._reply: asyncio.Future[CertReply] | None = None
        self._wake = asyncio.Event()
        self.renewed = 0  # certificates installed by this agent run

    @classmethod
    def for_agent(cls, agent: Agent) -> Renewer | None:
        config = agent.config
        if config.enroll is None:
            return None
        store = IdentityStore(config.state_dir)
        identity = store.load()
        if identity is None or identity.device_id != config.device_id:
            return None
        return cls(agent, store, identity, config.enroll.ca_file)

    def owns(self, topic: str) -> bool:
        return topic == self._cert_topic

    def due(self) -> bool:
        return self._wall() >= self.identity.renew_after

    # --- connection hooks ----------------------------------------------------------------

    async def on_connect(self, client: aiomqtt.Client, *, subscribe: bool = True) -> None:
        """``subscribe=False``: the broker resumed a session that has the subscription."""
        if subscribe:
            await self.subscribe(client)
        if not self.identity.confirmed:
            confirm = RenewConfirm(serial=self.identity.serial)
            await client.publish(
                self._csr_topic, confirm.model_dump_json().encode(), qos=1, timeout=5
            )
            self.identity = self.store.confirmed(self.identity)
            log.info("renewed certificate %s confirmed to the fleet", self.identity.serial)
        self._wake.set()

    async def subscribe(self, client: aiomqtt.Client) -> None:
        await client.subscribe(self._cert_topic, qos=1)

    async def on_message(self, payload: bytes) -> None:
        try:
            reply = CertReply.model_validate_json(payload)
        except ValidationError:
            log.warning("malformed certificate reply ignored")
            return
        future = self._reply
        if reply.req != self._req or future is None or future.done():
            return  # an answer to an older request
        future.set_result(reply)

    # --- the task ------------------------------------------------------------------------

    async def run(self) -> None:
        failures = 0
        while True:
            if not (self.due() and self._agent.connected and self.identity.confirmed):
                self._wake.clear()
                wait = min(CHECK_EVERY_S, max(0.05, self.identity.renew_after - self._wall()))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                continue
            outcome = await self._attempt()
            if outcome is None:
                failures = 0
                continue
            failures += 1
            delay = backoff_delay(failures, RETRY_MIN_S, RETRY_MAX_S)
            log.warning("certificate renewal: %s; retrying in %.0f s", outcome, delay)
            await asyncio.sleep(delay)

    async def _attempt(self) -> str | None:
        """One renewal; None on success, else why not."""
        client = self._agent.mqtt_client
        if client is None:
            return "not connected"
        identity = self.identity
        key = self.store.pending_key(identity)
        self._req = request_id()
        loop = asyncio.get_running_loop()
        self._reply = loop.create_future()
        request = RenewRequest(req=self._req, csr=make_csr(key, identity.device_id))
        try:
            await client.publish(
                self._csr_topic, request.model_dump_json().encode(), qos=1, timeout=5
            )
            async with asyncio.timeout(REPLY_TIMEOUT_S):
                reply = await self._reply
        except (aiomqtt.MqttError, TimeoutError) as exc:
            return f"no answer ({type(exc).__name__})"
        finally:
            self._reply = None
        if reply.result != "issued" or reply.certificate is None:
            return f"refused ({reply.reason or '?'})"
        try:
            check_delivered(
                certificate=reply.certificate,
                ca_chain="",
                key=key,
                device_id=identity.device_id,
                trusted_ca=self._ca_file.read_bytes(),
            )
        except ConfigError as exc:
            return exc.why
        new = self.store.install(
            identity,
            reply.certificate,
            renew_after=reply.renew_after or self._default_renew_after(reply),
            not_after=reply.not_after or identity.not_after,
        )
        try:
            tls = self._tls(new)
        except ConfigError as exc:
            return exc.why
        self.identity = new
        self.renewed += 1
        log.info("new certificate %s installed; reconnecting with it", new.serial)
        self._agent.restart_session(tls)
        return None

    def _default_renew_after(self, reply: CertReply) -> float:
        now = self._wall()
        return now + 2 / 3 * max(0.0, (reply.not_after or now) - now)

    def _tls(self, identity: Identity) -> ssl.SSLContext:
        return make_ssl_context(
            TlsConfig(
                ca_file=self._ca_file,
                cert_file=self.store.cert_path(identity.generation),
                key_file=self.store.key_path(identity.generation),
            )
        )
