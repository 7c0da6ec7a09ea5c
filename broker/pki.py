"""Development PKI for the Tillsyn broker, built with ``cryptography`` only.

Layout of a PKI directory (see :class:`PkiPaths`)::

    ca.crt ca.key              self-signed CA (ECDSA P-256, pathlen 0)
    broker.crt broker.key      TLS server cert (serverAuth, SAN DNS/IP)
    fleet.crt fleet.key        fleet service client cert (CN tillsyn-fleet)
    devices/{id}.crt|.key      device client certs (CN = device id)
    crl.pem                    signed CRL, always present (possibly empty)
    revoked.json               the revoked serials the CRL is built from

Private keys are created with mode 0600 (never widened then narrowed). The broker
maps the certificate CN to the MQTT username (``use_identity_as_username``), and
the ACL grants rights by that username, so the CN rules here are security rules:
a device CN must match :data:`DEVICE_ID_PATTERN` and can never be ``tillsyn-fleet``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from filelock import FileLock

from broker.errors import InvalidDeviceIdError, PkiError
from tillsyn_protocol.topics import DEVICE_ID_PATTERN, FLEET_IDENTITY, is_device_id

__all__ = [
    "BROKER_COMMON_NAME",
    "CA_COMMON_NAME",
    "DEVICE_ID_PATTERN",
    "FLEET_COMMON_NAME",
    "CertificateAuthority",
    "PkiPaths",
    "init_pki",
    "is_valid_device_id",
    "issue_device_cert",
    "issue_device_certs",
    "issue_server_cert",
    "load_ca",
    "load_certificate",
    "make_foreign_ca",
    "refresh_crl",
    "revoke",
    "sign_csr",
    "validate_device_id",
]

logger = logging.getLogger(__name__)

FLEET_COMMON_NAME = FLEET_IDENTITY
BROKER_COMMON_NAME = "tillsyn-broker"
CA_COMMON_NAME = "Tillsyn Fleet Dev CA"
_ORGANIZATION = "Tillsyn Fleet"

DEFAULT_CA_DAYS = 3650
DEFAULT_CERT_DAYS = 825
DEFAULT_CRL_DAYS = 30
# init_pki re-signs the CRL when it has less than this left: an expired CRL makes
# OpenSSL refuse every client certificate.
_CRL_REFRESH_MARGIN = timedelta(days=7)
# Backdate notBefore/lastUpdate so small clock differences do not refuse fresh certs.
_CLOCK_SKEW = timedelta(minutes=5)

_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644


@dataclass(frozen=True, slots=True)
class PkiPaths:
    """Every file of a PKI directory."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    broker_cert: Path
    broker_key: Path
    fleet_cert: Path
    fleet_key: Path
    crl: Path
    revoked: Path
    devices: Path

    @classmethod
    def for_directory(cls, directory: Path) -> PkiPaths:
        """The paths of the PKI rooted at ``directory`` (nothing is created)."""
        d = Path(directory).absolute()
        return cls(
            directory=d,
            ca_cert=d / "ca.crt",
            ca_key=d / "ca.key",
            broker_cert=d / "broker.crt",
            broker_key=d / "broker.key",
            fleet_cert=d / "fleet.crt",
            fleet_key=d / "fleet.key",
            crl=d / "crl.pem",
            revoked=d / "revoked.json",
            devices=d / "devices",
        )

    def device_cert(self, device_id: str) -> Path:
        """Certificate path of ``device_id`` (validated)."""
        return self.devices / f"{validate_device_id(device_id)}.crt"

    def device_key(self, device_id: str) -> Path:
        """Private key path of ``device_id`` (validated)."""
        return self.devices / f"{validate_device_id(device_id)}.key"


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """A loaded CA: certificate and signing key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def key_identifier(self) -> bytes:
        """The CA's SubjectKeyIdentifier, used as AKI in what it signs."""
        ext = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return ext.value.digest


# --------------------------------------------------------------------------- ids


def is_valid_device_id(device_id: str) -> bool:
    """True if ``device_id`` matches :data:`DEVICE_ID_PATTERN` (the protocol's rule)."""
    return is_device_id(device_id)


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` or raise :class:`InvalidDeviceIdError`.

    The id becomes the certificate CN, hence the MQTT username that the ACL's
    ``%u`` patterns expand; anything outside the pattern (``tillsyn-fleet``,
    ``+``, ``#``, ``/``) could widen a device's rights.
    """
    if not isinstance(device_id, str) or not is_valid_device_id(device_id):
        raise InvalidDeviceIdError(str(device_id), DEVICE_ID_PATTERN)
    return device_id


# ------------------------------------------------------------------------- files


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Atomically replace ``path``; the temp file is *created* with ``mode``."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_file(path, pem, _PRIVATE_MODE)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_file(path, cert.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PkiError("file not found", path=path) from None
    except OSError as exc:
        raise PkiError(f"cannot read file: {exc.strerror}", path=path) from exc


def load_certificate(path: Path) -> x509.Certificate:
    """Load one PEM certificate, raising :class:`PkiError` on any problem."""
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as exc:
        raise PkiError("not a PEM certificate", path=path) from exc


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError("not an unencrypted PEM private key", path=path) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError("CA key must be an EC private key", path=path)
    return key


# ------------------------------------------------------------------ certificates


def _now() -> datetime:
    return datetime.now(UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _check_days(days: int) -> None:
    if days <= 0:
        raise PkiError(f"validity must be at least one day, got {days}")


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _create_ca(common_name: str, days: int) -> CertificateAuthority:
    key = _new_key()
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        # pathlen 0: this CA signs leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert=cert, key=key)


def _issue(
    ca: CertificateAuthority,
    *,
    public_key: CertificatePublicKeyTypes,
    common_name: str,
    days: int,
    usage: x509.ObjectIdentifier,
    san: list[x509.GeneralName] | None = None,
    lifetime: timedelta | None = None,
) -> x509.Certificate:
    _check_days(days)
    if lifetime is not None and lifetime <= timedelta(0):
        raise PkiError(f"lifetime must be positive, got {lifetime}")
    now = _now()
    validity = lifetime if lifetime is not None else timedelta(days=days)
    # Never outlive the CA: a chain with an expired issuer fails anyway.
    not_after = min(now + validity, ca.cert.not_valid_after_utc)
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=is_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                x509.SubjectKeyIdentifier(ca.key_identifier)
            ),
            critical=False,
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def _host_names(hosts: tuple[str, ...] | list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _client_san(kind: str, common_name: str) -> list[x509.GeneralName]:
    # Mosquitto only looks at the CN; the URI SAN lets strict RFC 5280 validators
    # (which require a SAN) verify client certificates too.
    return [x509.UniformResourceIdentifier(f"urn:tillsyn:{kind}:{common_name}")]


def _issued_by(cert: x509.Certificate, ca: CertificateAuthority) -> bool:
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _leaf_needs_issue(
    cert_path: Path,
    key_path: Path,
    ca: CertificateAuthority,
    san: list[x509.GeneralName] | None = None,
) -> bool:
    """True if the leaf is missing, not from ``ca``, expired or has other SANs."""
    if not (cert_path.exists() and key_path.exists()):
        return True
    try:
        cert = load_certificate(cert_path)
    except PkiError:
        return True
    if not _issued_by(cert, ca) or cert.not_valid_after_utc <= _now():
        return True
    if san is not None:
        try:
            current = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return True
        if set(current.value) != set(san):
            return True
    return False


def _write_leaf(
    cert_path: Path,
    key_path: Path,
    ca: CertificateAuthority,
    *,
    common_name: str,
    days: int,
    usage: x509.ObjectIdentifier,
    san: list[x509.GeneralName] | None = None,
) -> None:
    key = _new_key()
    cert = _issue(
        ca,
        public_key=key.public_key(),
        common_name=common_name,
        days=days,
        usage=usage,
        san=san,
    )
    # Key first: a cert without its key is useless, a key without a cert is reissued.
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    logger.info("issued %s certificate serial=%x", common_name, cert.serial_number)


# ------------------------------------------------------------------------- CA


def load_ca(directory: Path) -> CertificateAuthority:
    """Load the CA of the PKI in ``directory``; :class:`PkiError` if absent or broken."""
    paths = PkiPaths.for_directory(directory)
    cert = load_certificate(paths.ca_cert)
    key = _load_key(paths.ca_key)
    if cert.public_key() != key.public_key():
        raise PkiError("CA key does not match CA certificate", path=paths.ca_key)
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise PkiError("CA certificate lacks BasicConstraints", path=paths.ca_cert) from None
    if not constraints.ca:
        raise PkiError("certificate is not a CA", path=paths.ca_cert)
    return CertificateAuthority(cert=cert, key=key)


def init_pki(
    directory: Path,
    *,
    broker_hosts: tuple[str, ...] | list[str] = ("localhost", "127.0.0.1"),
    days: int = DEFAULT_CERT_DAYS,
    ca_days: int = DEFAULT_CA_DAYS,
    crl_days: int = DEFAULT_CRL_DAYS,
    ca_common_name: str = CA_COMMON_NAME,
) -> PkiPaths:
    """Create (or complete) a dev PKI in ``directory`` and return its paths.

    Idempotent: an existing CA is never overwritten. Broker and fleet certificates
    are (re)issued only when missing, not signed by the CA, expired, or (broker)
    when ``broker_hosts`` changed. The CRL is written when missing, unreadable or
    close to its ``next_update``.
    """
    _check_days(days)
    _check_days(ca_days)
    if not broker_hosts:
        raise PkiError("broker_hosts must name at least one host")
    paths = PkiPaths.for_directory(directory)
    paths.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths.devices.mkdir(mode=0o700, exist_ok=True)

    with _lock(paths):
        if paths.ca_cert.exists() or paths.ca_key.exists():
            ca = load_ca(paths.directory)
        else:
            ca = _create_ca(ca_common_name, ca_days)
            _write_key(paths.ca_key, ca.key)
            _write_cert(paths.ca_cert, ca.cert)
            logger.info("created CA in %s", paths.directory)

        san = _host_names(broker_hosts)
        if _leaf_needs_issue(paths.broker_cert, paths.broker_key, ca, san):
            _write_leaf(
                paths.broker_cert,
                paths.broker_key,
                ca,
                common_name=BROKER_COMMON_NAME,
                days=days,
                usage=ExtendedKeyUsageOID.SERVER_AUTH,
                san=san,
            )
        if _leaf_needs_issue(paths.fleet_cert, paths.fleet_key, ca):
            _write_leaf(
                paths.fleet_cert,
                paths.fleet_key,
                ca,
                common_name=FLEET_COMMON_NAME,
                days=days,
                usage=ExtendedKeyUsageOID.CLIENT_AUTH,
                san=_client_san("service", FLEET_COMMON_NAME),
            )
        if _crl_needs_refresh(paths, ca):
            _write_crl(paths, ca, crl_days)
    return paths


def make_foreign_ca(directory: Path) -> PkiPaths:
    """A complete PKI whose CA is unrelated to any other (for negative tests).

    The CA deliberately reuses the default CA name: a broker must refuse its
    certificates because of the key, not because of a differing subject.
    """
    return init_pki(directory)


# ---------------------------------------------------------------------- devices


def issue_device_cert(
    directory: Path,
    device_id: str,
    *,
    days: int = DEFAULT_CERT_DAYS,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Issue a key and certificate for ``device_id``; return ``(cert_path, key_path)``.

    Refuses ids outside :data:`DEVICE_ID_PATTERN` (including ``tillsyn-fleet``).
    Refuses to replace an existing certificate unless ``overwrite`` (the old one
    stays valid until revoked).
    """
    validate_device_id(device_id)
    paths = PkiPaths.for_directory(directory)
    ca = load_ca(paths.directory)
    cert_path, key_path = paths.device_cert(device_id), paths.device_key(device_id)
    paths.devices.mkdir(mode=0o700, exist_ok=True)
    with _lock(paths):
        if cert_path.exists() and not overwrite:
            raise PkiError(
                f"certificate for {device_id} already exists (revoke it, or overwrite)",
                path=cert_path,
                device_id=device_id,
            )
        _write_leaf(
            cert_path,
            key_path,
            ca,
            common_name=device_id,
            days=days,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            san=_client_san("device", device_id),
        )
    return cert_path, key_path


def issue_device_certs(
    directory: Path,
    device_ids: Iterable[str],
    out_dir: Path,
    *,
    days: int = DEFAULT_CERT_DAYS,
) -> dict[str, tuple[Path, Path]]:
    """Many device certificates at once: ``{id: (cert_path, key_path)}`` in ``out_dir``.

    For the simulator's thousands of devices: the CA is loaded once, and an id whose
    ``{id}.crt`` and ``{id}.key`` already exist in ``out_dir`` is reused as it is (a
    cache: the caller keys ``out_dir`` by CA). Files are not fsynced one by one: these
    are throw-away identities, and 20,000 fsyncs would dominate the run.
    """
    ca = load_ca(directory)
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    issued: dict[str, tuple[Path, Path]] = {}
    for device_id in device_ids:
        validate_device_id(device_id)
        cert_path, key_path = out_dir / f"{device_id}.crt", out_dir / f"{device_id}.key"
        issued[device_id] = (cert_path, key_path)
        if cert_path.exists() and key_path.exists():
            continue
        key = _new_key()
        cert = _issue(
            ca,
            public_key=key.public_key(),
            common_name=device_id,
            days=days,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            san=_client_san("device", device_id),
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Key first, each created with its final mode and renamed into place.
        for path, data, mode in (
            (key_path, pem, _PRIVATE_MODE),
            (cert_path, cert.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE),
        ):
            tmp = path.with_name(f".{path.name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            tmp.replace(path)
    return issued


def _check_csr_key(key: CertificatePublicKeyTypes, device_id: str) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise PkiError(f"CSR uses unsupported curve {key.curve.name}", device_id=device_id)
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise PkiError(f"CSR RSA key too small ({key.key_size})", device_id=device_id)
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise PkiError("CSR key type not supported", device_id=device_id)


def sign_csr(
    ca: CertificateAuthority,
    csr_pem: bytes | str,
    device_id: str,
    days: int = DEFAULT_CERT_DAYS,
    *,
    lifetime: timedelta | None = None,
) -> x509.Certificate:
    """Issue a device client certificate for a CSR the device created itself.

    Checks the CSR's self-signature (proof the requester holds the key) and that its
    subject has exactly one CN, equal to ``device_id``. Requested extensions are
    ignored: the CA decides what the certificate may do. ``lifetime`` (if given)
    replaces ``days``: paired devices get short-lived certificates they renew.
    """
    validate_device_id(device_id)
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise PkiError("not a PEM certificate signing request", device_id=device_id) from exc
    if not csr.is_signature_valid:
        raise PkiError("CSR signature is invalid", device_id=device_id)
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or cns[0].value != device_id:
        found = [str(a.value) for a in cns]
        raise PkiError(
            f"CSR subject CN {found} does not match device id {device_id!r}",
            device_id=device_id,
        )
    public_key = csr.public_key()
    _check_csr_key(public_key, device_id)
    cert = _issue(
        ca,
        public_key=public_key,
        common_name=device_id,
        days=days,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        san=_client_san("device", device_id),
        lifetime=lifetime,
    )
    logger.info("signed CSR for %s serial=%x", device_id, cert.serial_number)
    return cert


def issue_server_cert(
    directory: Path,
    name: str,
    hosts: tuple[str, ...] | list[str],
    *,
    days: int = DEFAULT_CERT_DAYS,
) -> tuple[Path, Path]:
    """A TLS server certificate (serverAuth, SAN = ``hosts``) for another fleet listener.

    Used for the fleet's HTTPS enrollment endpoint, which devices verify against the
    same CA bundle they trust the broker with. Written to ``servers/{name}.crt|.key``;
    reissued only when missing, expired, not from this CA, or for other hosts.
    """
    if not hosts:
        raise PkiError("hosts must name at least one host")
    if not name.replace("-", "").isalnum():
        raise PkiError(f"server certificate name {name!r} must be letters, digits and -")
    paths = PkiPaths.for_directory(directory)
    ca = load_ca(paths.directory)
    servers = paths.directory / "servers"
    servers.mkdir(mode=0o700, exist_ok=True)
    cert_path, key_path = servers / f"{name}.crt", servers / f"{name}.key"
    san = _host_names(hosts)
    with _lock(paths):
        if _leaf_needs_issue(cert_path, key_path, ca, san):
            _write_leaf(
                cert_path,
                key_path,
                ca,
                common_name=name,
                days=days,
                usage=ExtendedKeyUsageOID.SERVER_AUTH,
                san=san,
            )
    return cert_path, key_path


# -------------------------------------------------------------------------- CRL


def _lock(paths: PkiPaths) -> FileLock:
    # Serialises writers of one PKI dir (CLI and fleet pairing may both revoke).
    return FileLock(str(paths.directory / ".pki.lock"), timeout=30)


def _load_revoked(paths: PkiPaths) -> dict[str, Any]:
    if not paths.revoked.exists():
        return {"crl_number": 0, "revoked": []}
    try:
        state = json.loads(_read(paths.revoked))
        number = int(state["crl_number"])
        entries = [
            {"serial": str(e["serial"]), "revoked_at": str(e["revoked_at"])}
            for e in state["revoked"]
        ]
        for e in entries:
            int(e["serial"], 16)
            datetime.fromisoformat(e["revoked_at"])
    except (ValueError, KeyError, TypeError) as exc:
        raise PkiError("revocation list is corrupt", path=paths.revoked) from exc
    return {"crl_number": number, "revoked": entries}


def _save_revoked(paths: PkiPaths, state: dict[str, Any]) -> None:
    _write_file(paths.revoked, (json.dumps(state, indent=2) + "\n").encode(), _PUBLIC_MODE)


def _crl_needs_refresh(paths: PkiPaths, ca: CertificateAuthority) -> bool:
    if not paths.crl.exists():
        return True
    try:
        crl = x509.load_pem_x509_crl(_read(paths.crl))
    except ValueError:
        return True
    next_update = crl.next_update_utc
    return (
        not crl.is_signature_valid(ca.key.public_key())
        or next_update is None
        or next_update - _now() < _CRL_REFRESH_MARGIN
    )


def _write_crl(paths: PkiPaths, ca: CertificateAuthority, days: int) -> Path:
    """Sign a fresh CRL from ``revoked.json`` (caller holds the lock)."""
    _check_days(days)
    state = _load_revoked(paths)
    state["crl_number"] += 1
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        # A lastUpdate in the future makes OpenSSL reject the CRL (and every client).
        .last_update(now - _CLOCK_SKEW)
        .next_update(now + timedelta(days=days))
        .add_extension(x509.CRLNumber(state["crl_number"]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                x509.SubjectKeyIdentifier(ca.key_identifier)
            ),
            critical=False,
        )
    )
    for entry in state["revoked"]:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(int(entry["serial"], 16))
            .revocation_date(datetime.fromisoformat(entry["revoked_at"]))
            .build()
        )
    crl = builder.sign(ca.key, hashes.SHA256())
    _write_file(paths.crl, crl.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE)
    _save_revoked(paths, state)
    logger.info("wrote CRL number=%d with %d revoked", state["crl_number"], len(state["revoked"]))
    return paths.crl


def refresh_crl(directory: Path, *, days: int = DEFAULT_CRL_DAYS) -> Path:
    """Re-sign ``crl.pem`` (same revoked list, new validity); return its path."""
    paths = PkiPaths.for_directory(directory)
    ca = load_ca(paths.directory)
    with _lock(paths):
        return _write_crl(paths, ca, days)


def revoke(
    directory: Path,
    serial_or_cert_path: int | Path,
    *,
    crl_days: int = DEFAULT_CRL_DAYS,
) -> int:
    """Revoke a certificate (by serial, or by the path of a cert this CA issued).

    Adds the serial to ``revoked.json`` (idempotent) and rewrites ``crl.pem``.
    Returns the revoked serial. A running Mosquitto 2.0.11 applies the new CRL to
    new handshakes after SIGHUP, but only a restart drops a revoked device that is
    already connected.
    """
    paths = PkiPaths.for_directory(directory)
    ca = load_ca(paths.directory)
    if isinstance(serial_or_cert_path, bool):
        raise PkiError("serial must be an integer or a certificate path")
    if isinstance(serial_or_cert_path, int):
        serial = serial_or_cert_path
        if serial <= 0:
            raise PkiError(f"invalid serial {serial}")
    else:
        cert = load_certificate(Path(serial_or_cert_path))
        if not _issued_by(cert, ca):
            raise PkiError("certificate was not issued by this CA", path=serial_or_cert_path)
        serial = cert.serial_number
    with _lock(paths):
        state = _load_revoked(paths)
        hex_serial = format(serial, "x")
        if all(int(e["serial"], 16) != serial for e in state["revoked"]):
            state["revoked"].append(
                {"serial": hex_serial, "revoked_at": _now().replace(microsecond=0).isoformat()}
            )
            _save_revoked(paths, state)
            logger.info("revoked serial=%s", hex_serial)
        else:
            logger.info("serial=%s was already revoked", hex_serial)
        _write_crl(paths, ca, crl_days)
    return serial
