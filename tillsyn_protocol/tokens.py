"""Signed command tokens: compact JWS (JWT) with EdDSA/Ed25519, through PyJWT.

TLS protects the pipe, not the command: a device applies only what carries a valid
signature from a key it pinned at pairing. The verifier pins the algorithm, selects the key
by ``kid`` from its own set, and checks every time claim against an injected ``now``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from .errors import RefusalReason, TokenError
from .messages import (
    MAX_TOKEN_BYTES,
    SHORT_ID_PATTERN,
    CommandKind,
    DeviceId,
    ShortId,
    StaffId,
)

ISSUER = "tillsyn-fleet"
TOKEN_TYPE = "tillsyn-cmd+jwt"
ALGORITHM = "EdDSA"
MAX_LIFETIME_S = 24 * 3600
MAX_LOOK_S = 600
# Tolerated fleet-ahead-of-device skew for nbf/iat only; expiry gets no leeway (fail closed).
NBF_LEEWAY_S = 5

_SHORT_ID = re.compile(SHORT_ID_PATTERN)
_KINDS = frozenset(c.value for c in CommandKind)

IntEpoch = Annotated[StrictInt, Field(ge=0, le=4_102_444_800)]


class CommandClaims(BaseModel):
    """The claims of one command. Exactly the fields of its kind, nothing else."""

    # Strict ints (no "5" or true as a number); enums still parse from their JSON strings.
    model_config = ConfigDict(extra="forbid", frozen=True)

    iss: Literal["tillsyn-fleet"] = "tillsyn-fleet"
    aud: DeviceId
    jti: ShortId
    seq: Annotated[StrictInt, Field(ge=1, le=2**53)]
    iat: IntEpoch
    nbf: IntEpoch
    exp: IntEpoch  # delivery deadline
    cmd: CommandKind
    until: IntEpoch | None = None  # arm: the window's end
    staff: StaffId | None = None  # look: who looks
    max_s: Annotated[StrictInt, Field(ge=1, le=MAX_LOOK_S)] | None = None  # look: its cap
    look: ShortId | None = None  # look: id the fleet logs it under

    @model_validator(mode="after")
    def _shape(self) -> Self:
        if not self.iat <= self.nbf < self.exp:
            raise ValueError("need iat <= nbf < exp")
        if self.exp - self.iat > MAX_LIFETIME_S:
            raise ValueError("lifetime too long")
        arm = (self.until is not None,)
        look = (self.staff is not None, self.max_s is not None, self.look is not None)
        match self.cmd:
            case CommandKind.ARM:
                if arm != (True,) or any(look):
                    raise ValueError("arm carries until and nothing else")
                assert self.until is not None
                if self.exp > self.until:
                    raise ValueError("arm must not be deliverable after its window")
            case CommandKind.LOOK:
                if not all(look) or any(arm):
                    raise ValueError("look carries staff, max_s and look")
            case CommandKind.DISARM:
                if any(arm) or any(look):
                    raise ValueError("disarm carries no arguments")
        return self


def new_jti() -> str:
    return secrets.token_hex(16)


def _claims(
    device_id: str,
    kind: CommandKind,
    *,
    seq: int,
    now: float,
    exp: int,
    jti: str | None,
    **args: Any,
) -> CommandClaims:
    t = int(now)
    return CommandClaims(
        aud=device_id, jti=jti or new_jti(), seq=seq, iat=t, nbf=t, exp=exp, cmd=kind, **args
    )


def arm(
    device_id: str, *, seq: int, now: float, until: int, jti: str | None = None
) -> CommandClaims:
    """Arm until the window's end; deliverable until then and not after."""
    return _claims(device_id, CommandKind.ARM, seq=seq, now=now, exp=until, jti=jti, until=until)


def disarm(
    device_id: str, *, seq: int, now: float, ttl_s: int = 6 * 3600, jti: str | None = None
) -> CommandClaims:
    """Disarm is always safe, so it stays deliverable for hours."""
    return _claims(device_id, CommandKind.DISARM, seq=seq, now=now, exp=int(now) + ttl_s, jti=jti)


def look(
    device_id: str,
    *,
    seq: int,
    now: float,
    staff: str,
    max_s: int,
    look_id: str,
    ttl_s: int = 30,
    jti: str | None = None,
) -> CommandClaims:
    """A look must start promptly or not at all: its delivery deadline is short."""
    return _claims(
        device_id,
        CommandKind.LOOK,
        seq=seq,
        now=now,
        exp=int(now) + ttl_s,
        jti=jti,
        staff=staff,
        max_s=max_s,
        look=look_id,
    )


def key_id(public_key: Ed25519PublicKey) -> str:
    """RFC 7638 JWK thumbprint, so the kid is derived from the key and never ambiguous."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class SigningKey:
    private_key: Ed25519PrivateKey
    kid: str

    @classmethod
    def generate(cls) -> SigningKey:
        return cls.from_private(Ed25519PrivateKey.generate())

    @classmethod
    def from_private(cls, key: Ed25519PrivateKey) -> SigningKey:
        return cls(key, key_id(key.public_key()))

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise TokenError(RefusalReason.UNKNOWN_KEY, "pinned key is not Ed25519")
    return key


def keyring(*public_keys: Ed25519PublicKey) -> dict[str, Ed25519PublicKey]:
    return {key_id(k): k for k in public_keys}


def sign(claims: CommandClaims, key: SigningKey) -> str:
    return jwt.encode(
        claims.model_dump(exclude_none=True),
        key.private_key,
        algorithm=ALGORITHM,
        headers={"kid": key.kid, "typ": TOKEN_TYPE},
    )


def verify(
    token: str | bytes,
    *,
    keys: Mapping[str, Ed25519PublicKey],
    device_id: str,
    now: float,
) -> CommandClaims:
    """Return the claims of a token this device may apply now, or raise TokenError.

    Sequence numbers are not checked here: replay protection needs the device's persisted
    counter and belongs to the state machine.
    """
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenError(RefusalReason.TOO_LARGE, f"{len(token)} bytes")
    try:
        text = token.decode("ascii") if isinstance(token, bytes) else token
        header = jwt.get_unverified_header(text)
    except (UnicodeDecodeError, jwt.PyJWTError):
        raise TokenError(RefusalReason.MALFORMED, "not a compact JWS") from None
    if header.get("alg") != ALGORITHM or header.get("typ") != TOKEN_TYPE:
        raise TokenError(RefusalReason.BAD_ALGORITHM, f"alg={str(header.get('alg'))[:16]}")
    kid = header.get("kid")
    if not isinstance(kid, str) or kid not in keys:
        raise TokenError(RefusalReason.UNKNOWN_KEY)
    try:
        # Time and audience are checked below against the injected clock, not PyJWT's.
        payload = jwt.decode(
            text,
            keys[kid],
            algorithms=[ALGORITHM],
            options={
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
                "verify_iss": False,
                "verify_jti": False,
                "verify_sub": False,
            },
        )
    except jwt.InvalidSignatureError:
        raise TokenError(RefusalReason.BAD_SIGNATURE) from None
    except jwt.PyJWTError:
        raise TokenError(RefusalReason.MALFORMED, "undecodable payload") from None
    if payload.get("iss") != ISSUER:  # required on the wire although the model defaults it
        raise TokenError(RefusalReason.WRONG_ISSUER)
    try:
        claims = CommandClaims.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "claims"
        if where == "iss":
            raise TokenError(RefusalReason.WRONG_ISSUER) from None
        raise TokenError(RefusalReason.BAD_CLAIMS, f"{where}: {err['msg']}") from None
    if claims.aud != device_id:
        raise TokenError(RefusalReason.WRONG_AUDIENCE)
    if now + NBF_LEEWAY_S < claims.nbf:
        raise TokenError(RefusalReason.NOT_YET_VALID)
    if now >= claims.exp:
        raise TokenError(RefusalReason.EXPIRED)
    return claims


def peek_ids(token: str | bytes) -> tuple[str | None, int | None, CommandKind | None]:
    """Best-effort (jti, seq, cmd) of an unverified token, only to label a refusal ack."""
    try:
        text = token.decode("ascii") if isinstance(token, bytes) else token
        if len(text) > MAX_TOKEN_BYTES:
            return None, None, None
        raw = jwt.decode(text, options={"verify_signature": False})
    except (UnicodeDecodeError, jwt.PyJWTError):
        return None, None, None
    jti, seq, cmd = raw.get("jti"), raw.get("seq"), raw.get("cmd")
    # Unverified input of any JSON type: only well-formed values are echoed back.
    ok_jti = jti if isinstance(jti, str) and _SHORT_ID.fullmatch(jti) else None
    ok_seq = (
        seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq <= 2**53 else None
    )
    ok_cmd = CommandKind(cmd) if isinstance(cmd, str) and cmd in _KINDS else None
    return ok_jti, ok_seq, ok_cmd
