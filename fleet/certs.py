"""The fleet CA at work: device certificates from CSRs, revocation that really bites.

Issuing: :meth:`DeviceCA.check_enrollment_csr` refuses a CSR whose signature does not
verify (the requester does not hold the key), whose key is not one we accept, or whose
subject is not exactly ``CN = device_id_for_key(its key)``; :meth:`DeviceCA.issue` signs
it with a short lifetime (``pairing.cert_lifetime_s``) through :func:`broker.pki.sign_csr`.

Revoking (:meth:`DeviceCA.revoke_and_disconnect`), measured on Mosquitto 2.0.11:

1. the serials go into ``revoked.json`` and a new ``crl.pem`` is signed;
2. the broker is told to re-read it (SIGHUP to ``broker_pid_file``, or
   ``broker_reload_command``). Mosquitto applies a new CRL to NEW handshakes only;
3. **verified**: a throw-away probe certificate, revoked in the same CRL update, is
   presented to the broker until the handshake is refused. Only then is the new CRL known
   to be live (no fixed sleep, no guessing how fast the broker handled the signal);
4. the revoked device's open connection is closed by a **session takeover**: the fleet
   connects with the device's client id (= device id), ``clean_start`` and session expiry
   0, and disconnects. Mosquitto drops the old connection (MQTT 5 reason 0x8E) and the
   session with its queued commands; the device's reconnect is refused by the CRL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import shlex
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import aiomqtt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker.pki import CertificateAuthority, load_ca, revoke, sign_csr
from tillsyn_protocol.enrollment import device_id_for_key, factory_proof_message

from .config import FleetSettings
from .pairing_config import PairingSettings
from .pairing_errors import CsrRefused

__all__ = ["DeviceCA", "IssuedCert", "RevocationResult", "spki_sha256"]

log = logging.getLogger(__name__)

_PROBE_LIFETIME = timedelta(hours=1)
_HANDSHAKE_TIMEOUT_S = 3.0
_PROBE_EVERY_S = 0.1


@dataclass(frozen=True, slots=True)
class IssuedCert:
    pem: str
    serial: str  # hex
    not_before: float
    not_after: float
    renew_after: float
    public_key_sha256: str


@dataclass(frozen=True, slots=True)
class RevocationResult:
    serials: tuple[str, ...]
    reloaded: bool  # the broker was told to re-read the CRL
    crl_confirmed: bool  # a probe certificate revoked with them was refused afterwards
    kicked: bool  # the device's open session was taken over and closed

    def as_dict(self) -> dict[str, object]:
        return {
            "serials": list(self.serials),
            "reloaded": self.reloaded,
            "crl_confirmed": self.crl_confirmed,
            "kicked": self.kicked,
        }


def spki_sha256(public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey) -> str:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _spki_der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _connect_packet(client_id: str) -> bytes:
    """A minimal MQTT 3.1.1 CONNECT (clean session, keepalive 10)."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x0a" + struct.pack("!H", len(cid)) + cid
    return bytes([0x10, len(body)]) + body


_DISCONNECT = b"\xe0\x00"


class DeviceCA:
    """Device certificates from the fleet CA, and their revocation at the broker."""

    def __init__(self, fleet: FleetSettings, *, command_key_pem: str) -> None:
        settings = fleet.pairing
        # The command verification key devices pin at pairing.
        self.command_key_pem = command_key_pem
        assert settings.pki_dir is not None
        self.settings: PairingSettings = settings
        self.fleet = fleet
        self.pki_dir = Path(settings.pki_dir)
        self._ca: CertificateAuthority = load_ca(self.pki_dir)
        self.ca_pem = self._ca.cert.public_bytes(serialization.Encoding.PEM).decode()
        self._factory_ca: x509.Certificate | None = None
        if settings.factory_ca_file is not None:
            self._factory_ca = x509.load_pem_x509_certificate(settings.factory_ca_file.read_bytes())
        self.broker_host = settings.broker_public_host or fleet.broker_host
        self.broker_port = settings.broker_public_port or fleet.broker_port

    @property
    def requires_factory_proof(self) -> bool:
        return self._factory_ca is not None

    # --- CSRs ---------------------------------------------------------------------------

    @staticmethod
    def _load_csr(csr_pem: str) -> x509.CertificateSigningRequest:
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError:
            raise CsrRefused("csr_malformed", "the CSR is not a PEM certificate request") from None
        if not csr.is_signature_valid:
            raise CsrRefused(
                "csr_key_mismatch", "the CSR is not signed by the key it carries"
            ) from None
        key = csr.public_key()
        if not (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"):
            raise CsrRefused("csr_key_type", "the CSR key must be an EC P-256 key")
        return csr

    @staticmethod
    def _subject_cn(csr: x509.CertificateSigningRequest) -> str | None:
        attrs = list(csr.subject)
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1 or len(attrs) != 1:
            return None
        value = cns[0].value
        return value if isinstance(value, str) else None

    def check_enrollment_csr(self, csr_pem: str) -> tuple[x509.CertificateSigningRequest, str]:
        """The CSR and the device id it is bound to (its CN = the id of its key)."""
        csr = self._load_csr(csr_pem)
        expected = device_id_for_key(_spki_der(csr))
        cn = self._subject_cn(csr)
        if cn != expected:
            raise CsrRefused(
                "csr_subject_mismatch",
                f"the CSR subject must be exactly CN={expected} (the id of its key), got {cn!r}",
            )
        return csr, expected

    def check_renewal_csr(self, csr_pem: str, device_id: str) -> x509.CertificateSigningRequest:
        csr = self._load_csr(csr_pem)
        cn = self._subject_cn(csr)
        if cn != device_id:
            raise CsrRefused(
                "csr_subject_mismatch", f"the CSR subject must be exactly CN={device_id}"
            )
        return csr

    def check_factory_proof(
        self,
        serial: str,
        csr: x509.CertificateSigningRequest,
        cert_pem: str | None,
        signature_b64: str | None,
        now: float,
    ) -> None:
        """If a factory CA is configured: the device proves its serial with a factory key."""
        import base64

        if self._factory_ca is None:
            return
        if not cert_pem or not signature_b64:
            raise CsrRefused("factory_proof_missing", "this fleet requires a factory identity")
        try:
            cert = x509.load_pem_x509_certificate(cert_pem.encode())
            cert.verify_directly_issued_by(self._factory_ca)
        except (ValueError, TypeError, InvalidSignature):
            raise CsrRefused(
                "factory_proof_invalid", "the factory certificate is not from our manufacturer"
            ) from None
        if not cert.not_valid_before_utc.timestamp() <= now <= cert.not_valid_after_utc.timestamp():
            raise CsrRefused("factory_proof_invalid", "the factory certificate is not valid now")
        names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)]
        names += [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if serial not in names:
            raise CsrRefused(
                "factory_serial_mismatch", "the factory certificate is for another serial"
            )
        message = factory_proof_message(serial, csr.public_bytes(serialization.Encoding.DER))
        try:
            signature = base64.urlsafe_b64decode(signature_b64 + "=" * (-len(signature_b64) % 4))
            key = cert.public_key()
            if isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
            elif isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(signature, message)
            else:
                raise TypeError("unsupported factory key type")  # noqa: TRY301
        except (ValueError, TypeError, InvalidSignature):
            raise CsrRefused(
                "factory_proof_invalid", "the factory signature does not verify"
            ) from None

    # --- issuing ------------------------------------------------------------------------

    def issue(self, csr: x509.CertificateSigningRequest, device_id: str, now: float) -> IssuedCert:
        pem = csr.public_bytes(serialization.Encoding.PEM)
        lifetime = timedelta(seconds=self.settings.cert_lifetime_s)
        cert = sign_csr(self._ca, pem, device_id, lifetime=lifetime)
        not_after = cert.not_valid_after_utc.timestamp()
        # Renew at a share of the life from now (not from the back-dated notBefore).
        renew_after = now + self.settings.renew_share * max(0.0, not_after - now)
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        return IssuedCert(
            pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            serial=format(cert.serial_number, "x"),
            not_before=cert.not_valid_before_utc.timestamp(),
            not_after=not_after,
            renew_after=renew_after,
            public_key_sha256=spki_sha256(key),
        )

    # --- revoking -----------------------------------------------------------------------

    def _revoke_with_probe(self, serials: list[str], probe: bool) -> tuple[bytes, bytes] | None:
        """Revoke ``serials`` (and a fresh probe cert); returns the probe's (cert, key) PEM."""
        pair: tuple[bytes, bytes] | None = None
        probe_serial: int | None = None
        if probe:
            key = ec.generate_private_key(ec.SECP256R1())
            probe_id = f"dev-crlprobe-{secrets.token_hex(6)}"
            csr = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, probe_id)]))
                .sign(key, hashes.SHA256())
            )
            cert = sign_csr(
                self._ca,
                csr.public_bytes(serialization.Encoding.PEM),
                probe_id,
                lifetime=_PROBE_LIFETIME,
            )
            probe_serial = cert.serial_number
            pair = (
                cert.public_bytes(serialization.Encoding.PEM),
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            )
        for serial in serials:
            revoke(self.pki_dir, int(serial, 16))
        if probe_serial is not None:
            revoke(self.pki_dir, probe_serial)
        return pair

    def _reload_broker(self) -> bool:
        s = self.settings
        if s.broker_pid_file is not None:
            try:
                pid = int(s.broker_pid_file.read_text().strip())
                os.kill(pid, signal.SIGHUP)
            except (OSError, ValueError) as exc:
                log.error("cannot signal the broker (%s): %s", s.broker_pid_file, exc)
                return False
            return True
        if s.broker_reload_command is not None:
            try:
                subprocess.run(shlex.split(s.broker_reload_command), check=True, timeout=30)
            except (OSError, subprocess.SubprocessError) as exc:
                log.error("broker reload command failed: %s", exc)
                return False
            return True
        log.warning("no broker reload configured: the new CRL applies after a broker restart")
        return False

    def fleet_tls(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        f = self.fleet
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(f.ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(cert or f.cert_file), str(key or f.key_file))
        return ctx

    def _handshake_accepted(self, ctx: ssl.SSLContext) -> bool:
        """TLS + CONNECT with the probe certificate; True if the broker answered CONNACK."""
        host, port = self.fleet.broker_host, self.fleet.broker_port
        try:
            with (
                socket.create_connection((host, port), timeout=_HANDSHAKE_TIMEOUT_S) as raw,
                ctx.wrap_socket(raw, server_hostname=host) as tls,
            ):
                tls.sendall(_connect_packet(f"crlprobe-{secrets.token_hex(4)}"))
                answer = tls.recv(4)
                if answer[:1] == b"\x20":
                    with contextlib.suppress(OSError):
                        tls.sendall(_DISCONNECT)
                    return True
                return False
        except (ssl.SSLError, OSError):
            return False

    def _confirm_crl(self, probe: tuple[bytes, bytes]) -> bool:
        with tempfile.TemporaryDirectory(prefix="tillsyn-crlprobe-") as tmp:
            cert_path, key_path = Path(tmp) / "probe.crt", Path(tmp) / "probe.key"
            cert_path.write_bytes(probe[0])
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(probe[1])
            ctx = self.fleet_tls(cert_path, key_path)
            deadline = time.monotonic() + self.settings.crl_confirm_s
            while time.monotonic() < deadline:
                if not self._handshake_accepted(ctx):
                    return True
                time.sleep(_PROBE_EVERY_S)
        return False

    async def _kick(self, device_id: str) -> bool:
        """Take over the device's MQTT session (client id = device id) and end it."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0
        client = aiomqtt.Client(
            self.fleet.broker_host,
            self.fleet.broker_port,
            identifier=device_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,
            properties=props,
            tls_context=self.fleet_tls(),
            timeout=10,
        )
        try:
            async with client:
                pass
        except aiomqtt.MqttError as exc:
            log.error("could not take over the session of device=%s: %s", device_id, exc)
            return False
        return True

    async def revoke_and_disconnect(
        self, serials: list[str], *, disconnect: str | None
    ) -> RevocationResult:
        """Revoke, publish the CRL to the broker, verify it is live, close ``disconnect``'s
        session. ``disconnect=None`` (a renewal retiring the old certificate): no takeover,
        the device is already connected with its new certificate."""
        want_probe = bool(serials) and (
            self.settings.broker_pid_file is not None or bool(self.settings.broker_reload_command)
        )
        probe = await asyncio.to_thread(self._revoke_with_probe, serials, want_probe)
        reloaded = await asyncio.to_thread(self._reload_broker)
        confirmed = False
        if reloaded and probe is not None:
            confirmed = await asyncio.to_thread(self._confirm_crl, probe)
            if not confirmed:
                log.error("the broker still accepts a revoked probe certificate")
        kicked = False
        if disconnect is not None:
            kicked = await self._kick(disconnect)
        result = RevocationResult(tuple(serials), reloaded, confirmed, kicked)
        log.info(
            "revoked %s (reloaded=%s confirmed=%s kicked=%s)",
            ",".join(serials) or "-",
            reloaded,
            confirmed,
            kicked,
        )
        return result
