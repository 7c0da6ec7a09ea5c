"""The device's own identity, kept in its state directory: key, certificate, pinned key.

Layout of ``{state_dir}/identity/`` (directory 0700, private keys 0600)::

    enroll.key            the key being enrolled (made on first boot, never leaves)
    enrollment.json       the current device authorization (device code: a secret, 0600)
    pairing.json          what the device shows: user code, where to enter it, expiry
    key-{n}.pem           private key of generation n
    cert-{n}.pem          its certificate (from the fleet CA)
    command-key.pem       the fleet's command verification key, pinned at pairing
    identity.json         which generation is current, the broker, renewal times

A generation's key and certificate are both on disk (fsynced) before ``identity.json`` is
atomically replaced to point at them, so a power cut leaves either the old or the new
identity, never a key with someone else's certificate. The previous generation is kept
until the fleet has confirmed the new one; then it is deleted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tillsyn_protocol.enrollment import device_id_for_key

from .errors import ConfigError, NotEnrolled

__all__ = [
    "Identity",
    "IdentityStore",
    "check_delivered",
    "key_device_id",
    "make_csr",
    "new_key",
    "public_der",
    "request_id",
    "with_identity",
]

log = logging.getLogger(__name__)

_DIR = "identity"
_FORMAT = 1


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def make_csr(key: ec.EllipticCurvePrivateKey, common_name: str) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True, slots=True)
class Identity:
    device_id: str
    broker_host: str
    broker_port: int
    generation: int
    serial: str  # hex serial of the current certificate
    not_after: float
    renew_after: float
    previous: int | None = None  # generation kept until the fleet confirms this one
    confirmed: bool = True  # the fleet knows this certificate is in use


class IdentityStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / _DIR
        self.enroll_key_path = self.dir / "enroll.key"
        self.enrollment_path = self.dir / "enrollment.json"
        self.pairing_path = self.dir / "pairing.json"
        self.identity_path = self.dir / "identity.json"
        self.command_key_path = self.dir / "command-key.pem"

    def cert_path(self, generation: int) -> Path:
        return self.dir / f"cert-{generation}.pem"

    def key_path(self, generation: int) -> Path:
        return self.dir / f"key-{generation}.pem"

    # --- files ---------------------------------------------------------------------------

    def _ensure_dir(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _write(self, path: Path, data: bytes, mode: int) -> None:
        """Atomic replace: temp file created with ``mode``, fsync, rename, fsync dir."""
        self._ensure_dir()
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".part")
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            Path(tmp).replace(path)
            dir_fd = os.open(self.dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                Path(tmp).unlink()
            raise

    def _write_json(self, path: Path, data: dict[str, Any], mode: int = 0o600) -> None:
        self._write(path, (json.dumps(data, indent=1) + "\n").encode(), mode)

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", path.name, type(exc).__name__)
            return None
        return data if isinstance(data, dict) else None

    # --- enrollment state ----------------------------------------------------------------

    def enroll_key(self) -> ec.EllipticCurvePrivateKey:
        """The key being enrolled: loaded, or made now (and kept across reboots)."""
        try:
            key = serialization.load_pem_private_key(
                self.enroll_key_path.read_bytes(), password=None
            )
            if isinstance(key, ec.EllipticCurvePrivateKey):
                return key
            log.warning("enroll.key is not an EC key: making a new one")
        except FileNotFoundError:
            pass
        except ValueError:
            log.warning("enroll.key is unreadable: making a new one")
        key = new_key()
        self._write(self.enroll_key_path, _key_pem(key), 0o600)
        self.forget_enrollment()
        return key

    def discard_enroll_key(self) -> None:
        self.enroll_key_path.unlink(missing_ok=True)
        self.forget_enrollment()

    def enrollment(self) -> dict[str, Any] | None:
        return self._read_json(self.enrollment_path)

    def save_enrollment(self, data: dict[str, Any]) -> None:
        self._write_json(self.enrollment_path, data)

    def forget_enrollment(self) -> None:
        self.enrollment_path.unlink(missing_ok=True)
        self.pairing_path.unlink(missing_ok=True)

    def show_pairing(self, data: dict[str, Any]) -> None:
        """The status file a local status page or label printer reads (no secrets)."""
        self._write_json(self.pairing_path, data, 0o644)

    # --- the identity --------------------------------------------------------------------

    def load(self) -> Identity | None:
        data = self._read_json(self.identity_path)
        if data is None:
            return None
        if data.pop("format", None) != _FORMAT:
            log.warning("identity.json has an unknown format: ignoring it")
            return None
        try:
            identity = Identity(**data)
        except TypeError:
            log.warning("identity.json is incomplete: ignoring it")
            return None
        if not (
            self.cert_path(identity.generation).is_file()
            and self.key_path(identity.generation).is_file()
        ):
            log.warning("identity generation %d is missing its files", identity.generation)
            return None
        return identity

    def _save(self, identity: Identity) -> None:
        self._write_json(self.identity_path, {"format": _FORMAT, **asdict(identity)})

    def enrolled(
        self,
        *,
        key: ec.EllipticCurvePrivateKey,
        device_id: str,
        certificate: str,
        command_keys: list[str],
        broker_host: str,
        broker_port: int,
        renew_after: float,
        not_after: float,
    ) -> Identity:
        """Store what pairing delivered (checked by the caller) as generation 1."""
        cert = x509.load_pem_x509_certificate(certificate.encode())
        self._write(self.command_key_path, "".join(command_keys[:1]).encode(), 0o644)
        self._write(self.key_path(1), _key_pem(key), 0o600)
        self._write(self.cert_path(1), certificate.encode(), 0o644)
        identity = Identity(
            device_id=device_id,
            broker_host=broker_host,
            broker_port=broker_port,
            generation=1,
            serial=format(cert.serial_number, "x"),
            not_after=not_after,
            renew_after=renew_after,
        )
        self._save(identity)
        self.discard_enroll_key()
        return identity

    def pending_key(self, identity: Identity) -> ec.EllipticCurvePrivateKey:
        """The key of the next generation (made once, kept until it is installed)."""
        path = self.key_path(identity.generation + 1)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if isinstance(key, ec.EllipticCurvePrivateKey):
                return key
        except (FileNotFoundError, ValueError):
            pass
        key = new_key()
        self._write(path, _key_pem(key), 0o600)
        return key

    def install(
        self, identity: Identity, certificate: str, *, renew_after: float, not_after: float
    ) -> Identity:
        """Switch to the next generation (its key is already on disk)."""
        gen = identity.generation + 1
        cert = x509.load_pem_x509_certificate(certificate.encode())
        self._write(self.cert_path(gen), certificate.encode(), 0o644)
        new = replace(
            identity,
            generation=gen,
            serial=format(cert.serial_number, "x"),
            not_after=not_after,
            renew_after=renew_after,
            previous=identity.generation,
            confirmed=False,
        )
        self._save(new)
        return new

    def confirmed(self, identity: Identity) -> Identity:
        """The fleet knows the current certificate: forget the previous generation."""
        done = replace(identity, previous=None, confirmed=True)
        self._save(done)
        if identity.previous is not None:
            self.cert_path(identity.previous).unlink(missing_ok=True)
            self.key_path(identity.previous).unlink(missing_ok=True)
        return done

    def postpone(self, identity: Identity, renew_after: float) -> Identity:
        new = replace(identity, renew_after=renew_after)
        self._save(new)
        return new


def check_delivered(
    *,
    certificate: str,
    ca_chain: str,
    key: ec.EllipticCurvePrivateKey,
    device_id: str,
    trusted_ca: bytes,
) -> x509.Certificate:
    """The certificate is for our key and id, from the CA we ship with; else ConfigError."""
    try:
        cert = x509.load_pem_x509_certificate(certificate.encode())
        ca = x509.load_pem_x509_certificate(trusted_ca)
    except ValueError:
        raise ConfigError("enroll", "the fleet sent an unreadable certificate") from None
    if public_der(key) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise ConfigError("enroll", "the certificate is not for this device's key")
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [device_id]:
        raise ConfigError("enroll", f"the certificate names {cns}, not {device_id}")
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:
        raise ConfigError("enroll", "the certificate is not from the trusted CA") from None
    if ca_chain.strip() and x509.load_pem_x509_certificate(ca_chain.encode()) != ca:
        # The device keeps trusting what it shipped with, never what the network says.
        log.warning("the fleet sent a different CA bundle; keeping the shipped one")
    return cert


def key_device_id(key: ec.EllipticCurvePrivateKey) -> str:
    return device_id_for_key(public_der(key))


def request_id() -> str:
    return secrets.token_hex(8)


def with_identity(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """A parsed config with ``[enroll]``, completed from the stored identity.

    Raises :class:`NotEnrolled` when there is none yet. What pairing delivered wins over
    the file: the device id, the broker address, the certificate and the pinned key.
    """
    raw_state = data.get("state_dir")
    if not isinstance(raw_state, str):
        return data  # let validation name the problem
    state_dir = Path(raw_state).expanduser()
    if not state_dir.is_absolute():
        state_dir = base_dir / state_dir
    store = IdentityStore(state_dir)
    identity = store.load()
    if identity is None:
        raise NotEnrolled(state_dir)
    enroll = data["enroll"]
    out = dict(data)
    out["device_id"] = identity.device_id
    broker = dict(data.get("broker") or {})
    broker.update(host=identity.broker_host, port=identity.broker_port)
    out["broker"] = broker
    out["tls"] = {
        "ca_file": enroll.get("ca_file", ""),
        "cert_file": str(store.cert_path(identity.generation)),
        "key_file": str(store.key_path(identity.generation)),
    }
    out["command_keys"] = [str(store.command_key_path)]
    return out
