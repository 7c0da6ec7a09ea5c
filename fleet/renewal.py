"""Certificate renewal over the device's existing mutual-TLS identity (MQTT).

The broker has already authenticated the sender: only a device whose (unrevoked)
certificate has CN = ``{id}`` may publish on ``tillsyn/v1/dev/{id}/csr`` (``acl.conf``),
so the topic names the requester. The exchange::

    device -> csr   {"op": "renew", "req": R, "csr": PEM}       CN = device id, a new key
    fleet  -> cert  {"req": R, "result": "issued", "certificate": PEM, "renew_after": T}
    (the device reconnects with the new certificate)
    device -> csr   {"op": "confirm", "serial": S}              over the NEW connection
    fleet           the new certificate is active; the old one is retired and revoked

A repeated request with the same ``req`` gets the same certificate (the first answer may
have been lost); a device asking again within ``renew_min_interval_s`` is refused.

The link is its own MQTT connection (client id ``{client_id()}-pki``), so the ingest
path and its channel set stay exactly as they are.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import TYPE_CHECKING

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError
from sqlmodel import Session, col, select

from tillsyn_protocol.enrollment import CertReply, RenewConfirm, RenewRequest
from tillsyn_protocol.errors import TopicError
from tillsyn_protocol.topics import CertChannel, cert_subscription, cert_topic, parse_cert_topic

from . import audit
from .inventory import CertStatus, DeviceCertificate, DeviceRecord, Lifecycle, add_history
from .pairing_errors import CsrRefused

if TYPE_CHECKING:
    from .pairing import Pairing

__all__ = ["RenewalLink"]

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 16384
SESSION_EXPIRY_S = 3600
_RENEWABLE = (Lifecycle.LIVE, Lifecycle.COMMISSIONING, Lifecycle.FAILED)


class RenewalLink:
    def __init__(self, pairing: Pairing) -> None:
        self.p = pairing
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()

    # --- database side -------------------------------------------------------------------

    def _renew(self, session: Session, device_id: str, req: RenewRequest, now: float) -> CertReply:
        def refuse(reason: str, why: str) -> CertReply:
            audit.append(
                session,
                ts=now,
                actor=device_id,
                action="cert.renewal_refused",
                subject=device_id,
                reason=reason,
                why=why,
            )
            return CertReply(req=req.req, result="refused", reason=reason)

        record = session.get(DeviceRecord, device_id)
        if record is None or record.state not in _RENEWABLE:
            return refuse("not_in_service", "the device is not in service")
        certs = session.exec(
            select(DeviceCertificate)
            .where(DeviceCertificate.device_id == device_id)
            .order_by(col(DeviceCertificate.issued_at).desc())
        ).all()
        for cert in certs:
            if cert.request_id == req.req and cert.status is CertStatus.PENDING:
                return CertReply(
                    req=req.req,
                    result="issued",
                    certificate=cert.pem,
                    renew_after=cert.renew_after,
                    not_after=cert.not_after,
                )
        if certs and now - certs[0].issued_at < self.p.settings.renew_min_interval_s:
            return refuse("too_soon", "a certificate was issued moments ago")
        try:
            csr = self.p.ca.check_renewal_csr(req.csr, device_id)
        except CsrRefused as exc:
            return refuse(exc.reason, exc.why)
        issued = self.p.ca.issue(csr, device_id, now)
        for cert in certs:  # an older unconfirmed renewal is superseded by this one
            if cert.status is CertStatus.PENDING:
                cert.status, cert.ended_at, cert.reason = CertStatus.RETIRED, now, "superseded"
                session.add(cert)
        session.add(
            DeviceCertificate(
                serial=issued.serial,
                device_id=device_id,
                status=CertStatus.PENDING,
                not_before=issued.not_before,
                not_after=issued.not_after,
                renew_after=issued.renew_after,
                issued_at=now,
                request_id=req.req,
                public_key_sha256=issued.public_key_sha256,
                pem=issued.pem,
            )
        )
        audit.append(
            session,
            ts=now,
            actor=device_id,
            action="cert.renewal_issued",
            subject=device_id,
            serial=issued.serial,
            not_after=issued.not_after,
        )
        return CertReply(
            req=req.req,
            result="issued",
            certificate=issued.pem,
            renew_after=issued.renew_after,
            not_after=issued.not_after,
        )

    def _confirm(self, session: Session, device_id: str, serial: str, now: float) -> list[str]:
        """Make ``serial`` the active certificate; returns the serials to revoke."""
        cert = session.get(DeviceCertificate, serial)
        if cert is None or cert.device_id != device_id:
            log.warning("device=%s confirmed a certificate it was not issued", device_id)
            return []
        if cert.status is CertStatus.ACTIVE:
            return []  # a repeated confirmation
        if cert.status is not CertStatus.PENDING:
            return []
        cert.status = CertStatus.ACTIVE
        session.add(cert)
        retire = []
        for old in session.exec(
            select(DeviceCertificate).where(
                DeviceCertificate.device_id == device_id,
                col(DeviceCertificate.status).in_([CertStatus.ACTIVE, CertStatus.PENDING]),
                DeviceCertificate.serial != serial,
            )
        ):
            old.status, old.ended_at, old.reason = CertStatus.RETIRED, now, "renewed"
            session.add(old)
            retire.append(old.serial)
        record = session.get(DeviceRecord, device_id)
        add_history(
            session,
            device_id=device_id,
            serial=record.serial if record else None,
            ts=now,
            action="renewed",
            actor=device_id,
            cert=serial,
            not_after=cert.not_after,
            retired=retire,
        )
        audit.append(
            session,
            ts=now,
            actor=device_id,
            action="cert.renewed",
            subject=device_id,
            serial=serial,
            retired=retire,
        )
        return retire

    # --- MQTT side -----------------------------------------------------------------------

    async def handle(self, topic: str, payload: bytes) -> None:
        try:
            device_id, channel = parse_cert_topic(topic)
        except TopicError:
            return
        if channel is not CertChannel.CSR or len(payload) > MAX_REQUEST_BYTES:
            return
        try:
            data = json.loads(payload)
            op = data.get("op") if isinstance(data, dict) else None
            message = (RenewConfirm if op == "confirm" else RenewRequest).model_validate(data)
        except (ValueError, ValidationError):
            log.warning("malformed certificate request from device=%s", device_id)
            self.p.count("ingest_errors", channel="csr", why="malformed")
            return
        now = self.p.clock()
        if isinstance(message, RenewRequest):
            reply = await self.p.db(self._renew, device_id, message, now)
            log.info("renewal for device=%s: %s", device_id, reply.reason or reply.result)
            await self.publish(
                cert_topic(device_id, CertChannel.CERT),
                reply.model_dump_json(exclude_none=True).encode(),
            )
            return
        retire = await self.p.db(self._confirm, device_id, message.serial, now)
        if retire:
            await self.p.ca.revoke_and_disconnect(retire, disconnect=None)
            for _ in retire:
                self.p.count("revocations", reason="renewed")
            log.info("device=%s renewed; retired %s", device_id, ",".join(retire))

    async def publish(self, topic: str, payload: bytes) -> bool:
        client = self._client
        if client is None:
            return False
        try:
            await client.publish(topic, payload, qos=1)
        except aiomqtt.MqttError as exc:
            log.warning("could not publish %s: %s", topic, exc)
            return False
        return True

    def _make_client(self) -> aiomqtt.Client:
        f = self.p.service.settings
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        # Persistent like the ingest link: only with a configured (stable) client id.
        persistent = f.persistent_session()
        props.SessionExpiryInterval = SESSION_EXPIRY_S if persistent else 0
        return aiomqtt.Client(
            f.broker_host,
            f.broker_port,
            identifier=f"{f.client_id()}-pki",
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=not persistent,
            properties=props,
            tls_context=self.p.ca.fleet_tls(),
            keepalive=30,
            timeout=10,
        )

    async def run(self) -> None:
        backoff = 0.5
        group = self.p.service.settings.shared_group
        while True:
            try:
                async with self._make_client() as client:
                    await client.subscribe(cert_subscription(shared_group=group), qos=1)
                    self._client = client
                    self.connected.set()
                    backoff = 0.5
                    async for message in client.messages:
                        try:
                            await self.handle(message.topic.value, bytes(message.payload))
                        except Exception:  # one bad request must not stop renewals
                            log.exception("renewal request failed")
            except aiomqtt.MqttError as exc:
                log.warning("certificate link lost: %s; retrying", str(exc)[:200])
            finally:
                self._client = None
                self.connected.clear()
            await asyncio.sleep(random.uniform(0, backoff))
            backoff = min(backoff * 2, 30.0)
