"""Device enrollment and certificate renewal: the contract shared by the agent and the fleet.

Enrollment follows the OAuth 2.0 device authorization grant (RFC 8628) in spirit:

1. the device ``POST``s a :class:`DeviceAuthorizationRequest` (serial, kind, firmware, a CSR
   for a key it generated itself, optionally a factory identity proof) and gets a
   :class:`DeviceAuthorization`: a secret ``device_code``, a short ``user_code`` for the
   technician, ``expires_in`` and a polling ``interval``;
2. the device shows the user code; a technician enters it in the fleet and assigns the
   device to a resident;
3. the device polls with a :class:`TokenRequest` and gets either a :class:`TokenError`
   (``authorization_pending``, ``slow_down``, ``expired_token``, ``access_denied``,
   ``invalid_grant``) or its :class:`DeviceCredentials`.

**Device ids are derived from the device's public key** (:func:`device_id_for_key`): the
CSR's CN must equal the id of the key it carries. A device never chooses an id that is
not bound to its key, every pairing gets a fresh id (a new key per enrollment), and an id
is never reused, so nothing queued or retained for an old installation can reach a device
in its next home.

Renewal runs over MQTT on the device's existing mutual-TLS identity (the broker has
authenticated the CN): :class:`RenewRequest` / :class:`RenewConfirm` on ``csr``,
:class:`CertReply` on ``cert``.

Sans-I/O: no sockets, no clock reads (``secrets`` is the only source of randomness).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .messages import DeviceId, DeviceKind, ShortId, Version

__all__ = [
    "DEVICE_CODE_GRANT",
    "ENROLL_AUTHORIZE_PATH",
    "ENROLL_TOKEN_PATH",
    "FACTORY_PROOF_CONTEXT",
    "MAX_PEM_CHARS",
    "USER_CODE_ALPHABET",
    "USER_CODE_LENGTH",
    "CertReply",
    "DeviceAuthorization",
    "DeviceAuthorizationRequest",
    "DeviceCredentials",
    "RenewConfirm",
    "RenewRequest",
    "Serial",
    "TokenError",
    "TokenErrorCode",
    "TokenRequest",
    "device_id_for_key",
    "factory_proof_message",
    "format_user_code",
    "new_device_code",
    "new_user_code",
    "normalize_user_code",
]

ENROLL_AUTHORIZE_PATH = "/enroll/v1/device_authorization"
ENROLL_TOKEN_PATH = "/enroll/v1/token"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"

# RFC 8628 section 6.1: consonants only (no vowels, so no words), which also leaves out
# the ambiguous 0/O, 1/I. 20^8 codes = 34.5 bits, with rate-limited guessing and a
# 10-minute life that is far out of reach.
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_LENGTH = 8
_ID_CHARS = 20  # base32 characters of the key hash: 100 bits

MAX_PEM_CHARS = 8192
Pem = Annotated[str, StringConstraints(min_length=64, max_length=MAX_PEM_CHARS)]
Serial = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
Code = Annotated[str, StringConstraints(min_length=1, max_length=128)]

# What a factory key signs to prove the device is genuine hardware with this serial.
FACTORY_PROOF_CONTEXT = b"tillsyn-enroll-v1"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=MAX_PEM_CHARS)


# --- ids and codes -------------------------------------------------------------------------


def device_id_for_key(public_key_der: bytes) -> str:
    """``dev-`` + 20 base32 characters of SHA-256 over the SubjectPublicKeyInfo (DER)."""
    digest = hashlib.sha256(public_key_der).digest()
    return "dev-" + base64.b32encode(digest).decode().lower()[:_ID_CHARS]


def new_device_code() -> str:
    """The device's polling secret (256 bits)."""
    return secrets.token_urlsafe(32)


def new_user_code() -> str:
    """A fresh ``XXXX-XXXX`` code from :data:`USER_CODE_ALPHABET`."""
    raw = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))
    return format_user_code(raw)


def format_user_code(normalized: str) -> str:
    return f"{normalized[:4]}-{normalized[4:]}"


def normalize_user_code(text: str) -> str | None:
    """What a person typed -> the canonical 8 characters, or None if it cannot be a code.

    Case, spaces and dashes do not matter (RFC 8628 section 6.1).
    """
    if len(text) > 32:
        return None
    raw = "".join(ch for ch in text.upper() if ch not in " -\t")
    if len(raw) != USER_CODE_LENGTH or any(ch not in USER_CODE_ALPHABET for ch in raw):
        return None
    return raw


def factory_proof_message(serial: str, csr_der: bytes) -> bytes:
    """The bytes a factory key signs: context, serial and the CSR it vouches for."""
    return b"\n".join([FACTORY_PROOF_CONTEXT, serial.encode(), hashlib.sha256(csr_der).digest()])


# --- enrollment (HTTPS) --------------------------------------------------------------------


class DeviceAuthorizationRequest(_Model):
    serial: Serial
    kind: DeviceKind
    fw: Version
    csr: Pem
    factory_cert: Pem | None = None
    factory_sig: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{16,400}$")] | None = None


class DeviceAuthorization(_Model):
    device_code: Code
    user_code: Annotated[str, StringConstraints(pattern=r"^[A-Z]{4}-[A-Z]{4}$")]
    verification_uri: Annotated[str, StringConstraints(max_length=512)]
    verification_uri_complete: Annotated[str, StringConstraints(max_length=600)] | None = None
    expires_in: Annotated[int, Field(ge=1, le=86400)]
    interval: Annotated[int, Field(ge=1, le=600)]
    device_id: DeviceId


class TokenRequest(_Model):
    grant_type: Literal["urn:ietf:params:oauth:grant-type:device_code"]
    device_code: Code


TokenErrorCode = Literal[
    "authorization_pending",
    "slow_down",
    "expired_token",
    "access_denied",
    "invalid_grant",
    "invalid_request",
]


class TokenError(_Model):
    error: TokenErrorCode
    error_description: Annotated[str, StringConstraints(max_length=200)] | None = None
    interval: Annotated[int, Field(ge=1, le=600)] | None = None  # with slow_down


class DeviceCredentials(_Model):
    device_id: DeviceId
    certificate: Pem
    ca_chain: Pem
    broker_host: Annotated[str, StringConstraints(min_length=1, max_length=253)]
    broker_port: Annotated[int, Field(ge=1, le=65535)]
    command_keys: Annotated[list[Pem], Field(min_length=1, max_length=8)]
    renew_after: Annotated[float, Field(ge=0)]
    not_after: Annotated[float, Field(ge=0)]


# --- renewal (MQTT) ------------------------------------------------------------------------


class RenewRequest(_Model):
    v: Literal[1] = 1
    op: Literal["renew"] = "renew"
    req: ShortId
    csr: Pem


class RenewConfirm(_Model):
    """Sent over the NEW certificate's connection: the fleet may retire the old one."""

    v: Literal[1] = 1
    op: Literal["confirm"] = "confirm"
    serial: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{1,40}$")]


class CertReply(_Model):
    v: Literal[1] = 1
    req: ShortId
    result: Literal["issued", "refused"]
    certificate: Pem | None = None
    renew_after: Annotated[float, Field(ge=0)] | None = None
    not_after: Annotated[float, Field(ge=0)] | None = None
    reason: Annotated[str, StringConstraints(pattern=r"^[a-z_]{1,32}$")] | None = None
