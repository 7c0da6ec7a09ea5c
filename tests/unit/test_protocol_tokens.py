"""Command tokens: sign -> verify round-trips, every refusal reason, the RFC 7638 key id."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from tillsyn_protocol import (
    CommandClaims,
    CommandKind,
    RefusalReason,
    SigningKey,
    TokenError,
    key_id,
    keyring,
    load_public_key,
    sign,
    verify,
)
from tillsyn_protocol import tokens as tk
from tillsyn_protocol.messages import MAX_TOKEN_BYTES

DEVICE = "dev-kitchen01"
OTHER_DEVICE = "dev-kitchen02"
NOW = 1_800_000_000  # 2027-01-15, well inside the epoch bounds

FLEET = SigningKey.from_private(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
ROGUE = SigningKey.from_private(Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33))))
KEYS = keyring(FLEET.public_key)


# --- helpers ---------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def header(**extra: Any) -> dict[str, Any]:
    return {"alg": "EdDSA", "typ": tk.TOKEN_TYPE, "kid": FLEET.kid, **extra}


def arm_claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": "tillsyn-fleet",
        "aud": DEVICE,
        "jti": "a1b2c3",
        "seq": 7,
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + 1800,
        "cmd": "arm",
        "until": NOW + 3600,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not _DROP}


def look_claims(**overrides: Any) -> dict[str, Any]:
    base = arm_claims(cmd="look", until=_DROP, exp=NOW + 30)
    base.update({"staff": "nurse.anna", "max_s": 60, "look": "lk1"})
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not _DROP}


def disarm_claims(**overrides: Any) -> dict[str, Any]:
    base = arm_claims(cmd="disarm", until=_DROP)
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP: Any = object()


def sign_raw(
    payload: dict[str, Any] | bytes,
    *,
    key: SigningKey = FLEET,
    headers: dict[str, Any] | None = None,
) -> str:
    """A genuinely EdDSA-signed token with arbitrary header and claims (built by hand, so
    neither CommandClaims nor PyJWT's encoder can tidy it up)."""
    hdr = header() if headers is None else headers
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64(json.dumps(hdr).encode())}.{b64(body)}"
    return f"{signing_input}.{b64(key.private_key.sign(signing_input.encode()))}"


def hand_built(hdr: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    h = b64(json.dumps(hdr).encode())
    p = b64(json.dumps(payload).encode())
    return f"{h}.{p}.{b64(signature)}"


def hs256(hdr: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{b64(json.dumps(hdr).encode())}.{b64(json.dumps(payload).encode())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def refusal(token: str | bytes, *, now: float = NOW, device_id: str = DEVICE) -> RefusalReason:
    with pytest.raises(TokenError) as info:
        verify(token, keys=KEYS, device_id=device_id, now=now)
    return info.value.reason


def accepts(token: str | bytes, *, now: float = NOW) -> CommandClaims:
    return verify(token, keys=KEYS, device_id=DEVICE, now=now)


# --- round trips -----------------------------------------------------------------------

epochs = st.integers(min_value=0, max_value=4_102_444_800 - 2 * tk.MAX_LIFETIME_S)
seqs = st.integers(min_value=1, max_value=2**53)
device_ids = st.from_regex(r"\Adev-[a-z0-9][a-z0-9-]{1,59}\Z")
short_ids = st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")
staff_ids = st.from_regex(r"\A[A-Za-z0-9._-]{1,64}\Z")


def _check_round_trip(claims: CommandClaims, offset: float, as_bytes: bool) -> None:
    token = sign(claims, FLEET)
    assert len(token) <= MAX_TOKEN_BYTES
    # Anywhere in [nbf, exp) the device accepts it, with exactly the claims that were signed.
    instant = claims.nbf + offset * (claims.exp - claims.nbf)
    if instant >= claims.exp:
        instant = claims.nbf
    got = verify(
        token.encode() if as_bytes else token, keys=KEYS, device_id=claims.aud, now=instant
    )
    assert got == claims
    assert got.model_dump() == claims.model_dump()
    header_ = jwt.get_unverified_header(token)
    assert header_ == {"alg": "EdDSA", "typ": tk.TOKEN_TYPE, "kid": FLEET.kid}


@settings(max_examples=60, deadline=None)
@given(
    device=device_ids,
    seq=seqs,
    now=epochs,
    length=st.integers(min_value=1, max_value=tk.MAX_LIFETIME_S),
    jti=short_ids,
    offset=st.floats(min_value=0, max_value=1),
    as_bytes=st.booleans(),
)
def test_arm_round_trip(
    device: str, seq: int, now: int, length: int, jti: str, offset: float, as_bytes: bool
) -> None:
    claims = tk.arm(device, seq=seq, now=now, until=now + length, jti=jti)
    assert claims.cmd is CommandKind.ARM and claims.until == now + length == claims.exp
    _check_round_trip(claims, offset, as_bytes)


@settings(max_examples=60, deadline=None)
@given(
    device=device_ids,
    seq=seqs,
    now=epochs,
    ttl=st.integers(min_value=1, max_value=tk.MAX_LIFETIME_S),
    offset=st.floats(min_value=0, max_value=1),
    as_bytes=st.booleans(),
)
def test_disarm_round_trip(
    device: str, seq: int, now: int, ttl: int, offset: float, as_bytes: bool
) -> None:
    claims = tk.disarm(device, seq=seq, now=now, ttl_s=ttl)
    assert claims.cmd is CommandKind.DISARM and claims.until is None
    _check_round_trip(claims, offset, as_bytes)


@settings(max_examples=60, deadline=None)
@given(
    device=device_ids,
    seq=seqs,
    now=epochs,
    ttl=st.integers(min_value=1, max_value=600),
    staff=staff_ids,
    max_s=st.integers(min_value=1, max_value=tk.MAX_LOOK_S),
    look_id=short_ids,
    offset=st.floats(min_value=0, max_value=1),
    as_bytes=st.booleans(),
)
def test_look_round_trip(
    device: str,
    seq: int,
    now: int,
    ttl: int,
    staff: str,
    max_s: int,
    look_id: str,
    offset: float,
    as_bytes: bool,
) -> None:
    claims = tk.look(device, seq=seq, now=now, staff=staff, max_s=max_s, look_id=look_id, ttl_s=ttl)
    assert (claims.staff, claims.max_s, claims.look) == (staff, max_s, look_id)
    _check_round_trip(claims, offset, as_bytes)


def test_fresh_jtis_are_unique_and_short_ids() -> None:
    jtis = {tk.new_jti() for _ in range(200)}
    assert len(jtis) == 200
    assert all(len(j) == 32 and j.isalnum() for j in jtis)


# --- refusals, in the order verify checks them -------------------------------------------


def test_too_large() -> None:
    genuine = sign_raw(arm_claims())
    padded = genuine + "A" * (MAX_TOKEN_BYTES + 1 - len(genuine))
    assert len(padded) == MAX_TOKEN_BYTES + 1
    assert refusal(padded) is RefusalReason.TOO_LARGE
    assert refusal(padded.encode()) is RefusalReason.TOO_LARGE
    assert refusal(b"\xff" * 5000) is RefusalReason.TOO_LARGE
    # One byte less is judged on its content, not its size.
    assert refusal(padded[:-1]) is not RefusalReason.TOO_LARGE


def test_big_claims_inside_the_limit_are_not_too_large() -> None:
    # A genuine token padded through a signed (but unknown) claim stays under the limit:
    # the refusal is about the claim, not the size.
    token = sign_raw(arm_claims(pad="x" * 1000))
    assert len(token) <= MAX_TOKEN_BYTES
    assert refusal(token) is RefusalReason.BAD_CLAIMS


@pytest.mark.parametrize(
    "token",
    [
        "",
        ".",
        "..",
        "abc",
        "a.b",
        "not a token at all",
        "!!!.@@@.###",
        b"\xff\xfe.\x00\x01.\x02",  # not ASCII
        "é.é.é",  # not ASCII, as text
        b64(b"not json") + "." + b64(b"{}") + ".",
        b64(b"[1, 2]") + "." + b64(b"{}") + ".",  # header not an object
        b64(b'"EdDSA"') + "." + b64(b"{}") + ".",
        b64(b"null") + "." + b64(b"{}") + ".",
        b64(b'{"alg": "EdDSA"') + "." + b64(b"{}") + ".",  # truncated JSON
    ],
)
def test_malformed(token: str | bytes) -> None:
    assert refusal(token) is RefusalReason.MALFORMED


def test_truncated_genuine_tokens_are_refused() -> None:
    genuine = sign_raw(arm_claims())
    accepts(genuine)
    for cut in range(len(genuine)):
        reason = refusal(genuine[:cut])
        assert reason in {RefusalReason.MALFORMED, RefusalReason.BAD_SIGNATURE}, cut


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[1, 2, 3]", b'"arm"', b"null", b"{", b"\xff\xfe"],
)
def test_signed_payload_that_is_not_a_claims_object_is_malformed(payload: bytes) -> None:
    assert refusal(sign_raw(payload)) is RefusalReason.MALFORMED


def _public_raw(key: SigningKey) -> bytes:
    return key.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(hand_built(header(alg="none"), arm_claims()), id="alg-none"),
        pytest.param(hand_built(header(alg="None"), arm_claims()), id="alg-None"),
        pytest.param(hand_built(header(alg="NONE"), arm_claims(), b"x"), id="alg-NONE-sig"),
        pytest.param(
            hs256(header(alg="HS256"), arm_claims(), FLEET.public_pem()), id="hs256-pem-secret"
        ),
        pytest.param(
            hs256(header(alg="HS256"), arm_claims(), _public_raw(FLEET)), id="hs256-raw-secret"
        ),
        pytest.param(hand_built(header(alg="RS256"), arm_claims(), b"x" * 256), id="rs256"),
        pytest.param(hand_built(header(alg="ES256"), arm_claims(), b"x" * 64), id="es256"),
        pytest.param(hand_built(header(alg="eddsa"), arm_claims(), b"x" * 64), id="lower-case"),
        pytest.param(hand_built(header(alg=["EdDSA"]), arm_claims(), b"x" * 64), id="alg-list"),
        pytest.param(hand_built({"typ": tk.TOKEN_TYPE}, arm_claims(), b"x" * 64), id="no-alg"),
        # The algorithm is right but the token type is not (a JWT for another purpose).
        pytest.param(sign_raw(arm_claims(), headers=header(typ="JWT")), id="typ-JWT"),
        pytest.param(
            sign_raw(arm_claims(), headers={"alg": "EdDSA", "kid": FLEET.kid}), id="typ-missing"
        ),
    ],
)
def test_bad_algorithm(token: str) -> None:
    assert refusal(token) is RefusalReason.BAD_ALGORITHM


def test_hs256_confusion_attack_would_pass_a_naive_verifier() -> None:
    """The forged HS256 token is a real attack, not a strawman: with the public key as the
    HMAC secret it verifies under an HS256 verifier; ours must still refuse it."""
    secret = _public_raw(FLEET)
    forged = hs256(header(alg="HS256"), arm_claims(), secret)
    lax = {"verify_aud": False, "verify_iat": False, "verify_nbf": False, "verify_exp": False}
    naive = jwt.decode(forged, secret, algorithms=["HS256"], options=lax)
    assert naive["cmd"] == "arm"
    assert refusal(forged) is RefusalReason.BAD_ALGORITHM


@pytest.mark.parametrize("kid", [_DROP, "", "nope", ROGUE.kid, FLEET.kid.upper(), FLEET.kid + " "])
def test_unknown_key(kid: Any) -> None:
    hdr = {"alg": "EdDSA", "typ": tk.TOKEN_TYPE}
    if kid is not _DROP:
        hdr["kid"] = kid
    # Signed with the right key, so only the kid lookup can refuse it.
    assert refusal(sign_raw(arm_claims(), headers=hdr)) is RefusalReason.UNKNOWN_KEY


@pytest.mark.parametrize("kid", [5, None, ["x"], {"k": "v"}, True])
def test_non_string_kid_is_refused(kid: Any) -> None:
    # PyJWT already rejects a non-string kid while reading the header (malformed); either
    # way the token is refused before any key is chosen.
    hdr = {"alg": "EdDSA", "typ": tk.TOKEN_TYPE, "kid": kid}
    assert refusal(sign_raw(arm_claims(), headers=hdr)) in {
        RefusalReason.MALFORMED,
        RefusalReason.UNKNOWN_KEY,
    }


def test_rogue_key_with_its_own_kid_is_unknown() -> None:
    token = sign_raw(arm_claims(), key=ROGUE, headers=header(kid=ROGUE.kid))
    assert refusal(token) is RefusalReason.UNKNOWN_KEY


def test_bad_signature_flipped_byte() -> None:
    genuine = sign_raw(arm_claims())
    accepts(genuine)
    signing_input, sig = genuine.rsplit(".", 1)
    raw = bytearray(unb64(sig))
    assert len(raw) == 64
    for index in (0, 31, 63):
        flipped = bytearray(raw)
        flipped[index] ^= 0x01
        assert refusal(f"{signing_input}.{b64(bytes(flipped))}") is RefusalReason.BAD_SIGNATURE


def test_bad_signature_other_cases() -> None:
    genuine = sign_raw(arm_claims())
    h, p, s = genuine.split(".")
    # Signed by a rogue key that claims the fleet's kid.
    rogue = sign_raw(arm_claims(), key=ROGUE, headers=header())
    assert refusal(rogue) is RefusalReason.BAD_SIGNATURE
    # Claims edited after signing (a longer window).
    tampered = b64(json.dumps(arm_claims(until=NOW + 86_000)).encode())
    assert refusal(f"{h}.{tampered}.{s}") is RefusalReason.BAD_SIGNATURE
    # Signature stripped or replaced.
    assert refusal(f"{h}.{p}.") is RefusalReason.BAD_SIGNATURE
    assert refusal(f"{h}.{p}.{b64(bytes(64))}") is RefusalReason.BAD_SIGNATURE
    # Signature of another (genuine) token.
    other_sig = sign_raw(disarm_claims()).rsplit(".", 1)[1]
    assert refusal(f"{h}.{p}.{other_sig}") is RefusalReason.BAD_SIGNATURE


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param(arm_claims(extra="x"), id="extra-claim"),
        pytest.param(arm_claims(sub="fleet"), id="extra-registered-claim"),
        pytest.param(arm_claims(aud=_DROP), id="missing-aud"),
        pytest.param(arm_claims(jti=_DROP), id="missing-jti"),
        pytest.param(arm_claims(seq=_DROP), id="missing-seq"),
        pytest.param(arm_claims(iat=_DROP), id="missing-iat"),
        pytest.param(arm_claims(nbf=_DROP), id="missing-nbf"),
        pytest.param(arm_claims(exp=_DROP), id="missing-exp"),
        pytest.param(arm_claims(cmd=_DROP), id="missing-cmd"),
        pytest.param(arm_claims(until=_DROP), id="arm-without-until"),
        pytest.param(arm_claims(until=None), id="arm-until-null"),
        pytest.param(arm_claims(staff="nurse.anna"), id="arm-with-staff"),
        pytest.param(arm_claims(max_s=60), id="arm-with-max_s"),
        pytest.param(arm_claims(exp=NOW + 3601), id="arm-deliverable-after-window"),
        pytest.param(look_claims(staff=_DROP), id="look-without-staff"),
        pytest.param(look_claims(max_s=_DROP), id="look-without-max_s"),
        pytest.param(look_claims(look=_DROP), id="look-without-look-id"),
        pytest.param(look_claims(until=NOW + 60), id="look-with-until"),
        pytest.param(look_claims(max_s=0), id="look-max_s-zero"),
        pytest.param(look_claims(max_s=tk.MAX_LOOK_S + 1), id="look-max_s-too-long"),
        pytest.param(look_claims(max_s=60.0), id="look-max_s-float"),
        pytest.param(look_claims(max_s="60"), id="look-max_s-string"),
        pytest.param(look_claims(staff="nurse anna"), id="look-staff-space"),
        pytest.param(look_claims(staff=""), id="look-staff-empty"),
        pytest.param(look_claims(staff="a" * 65), id="look-staff-too-long"),
        pytest.param(disarm_claims(until=NOW + 60), id="disarm-with-until"),
        pytest.param(disarm_claims(staff="nurse.anna"), id="disarm-with-staff"),
        pytest.param(arm_claims(seq=True), id="bool-seq"),
        pytest.param(arm_claims(seq="8"), id="string-seq"),
        pytest.param(arm_claims(seq=8.0), id="float-seq"),
        pytest.param(arm_claims(seq=0), id="zero-seq"),
        pytest.param(arm_claims(seq=-1), id="negative-seq"),
        pytest.param(arm_claims(seq=2**53 + 1), id="huge-seq"),
        pytest.param(arm_claims(iat=float(NOW)), id="float-iat"),
        pytest.param(arm_claims(exp=str(NOW + 1800)), id="string-exp"),
        pytest.param(arm_claims(nbf=True), id="bool-nbf"),
        pytest.param(arm_claims(iat=NOW + 1), id="iat-after-nbf"),
        pytest.param(arm_claims(exp=NOW), id="nbf-equals-exp"),
        pytest.param(disarm_claims(exp=NOW + tk.MAX_LIFETIME_S + 1), id="lifetime-too-long"),
        pytest.param(arm_claims(until=5_000_000_000, exp=NOW + 60), id="until-past-2100"),
        pytest.param(arm_claims(cmd="config"), id="unknown-cmd"),
        pytest.param(arm_claims(cmd="ARM"), id="cmd-case"),
        pytest.param(arm_claims(aud="DEV-KITCHEN01"), id="aud-bad-pattern"),
        pytest.param(arm_claims(aud=[DEVICE]), id="aud-list"),
        pytest.param(arm_claims(jti="a/b"), id="jti-bad-chars"),
    ],
)
def test_bad_claims(claims: dict[str, Any]) -> None:
    assert refusal(sign_raw(claims)) is RefusalReason.BAD_CLAIMS


# Regression: PyJWT's own jti/sub type checks (verify_jti/verify_sub default to True) fired
# first, so a signed token with a non-string jti was reported MALFORMED, not BAD_CLAIMS.
@pytest.mark.parametrize("claims", [arm_claims(jti=123), arm_claims(sub=5)], ids=["jti", "sub"])
def test_non_string_jti_or_sub_is_bad_claims(claims: dict[str, Any]) -> None:
    assert refusal(sign_raw(claims)) is RefusalReason.BAD_CLAIMS


@pytest.mark.parametrize("iss", ["evil-fleet", "", "TILLSYN-FLEET", 5, None, ["tillsyn-fleet"]])
def test_wrong_issuer(iss: Any) -> None:
    assert refusal(sign_raw(arm_claims(iss=iss))) is RefusalReason.WRONG_ISSUER


# Regression: CommandClaims.iss had a default, so a token that omitted iss was accepted.
def test_missing_issuer_is_refused() -> None:
    assert refusal(sign_raw(arm_claims(iss=_DROP))) in {
        RefusalReason.WRONG_ISSUER,
        RefusalReason.BAD_CLAIMS,
    }


def test_wrong_audience() -> None:
    token = sign_raw(arm_claims(aud=OTHER_DEVICE))
    assert refusal(token) is RefusalReason.WRONG_AUDIENCE
    # ... and the same token is fine for the device it names.
    assert verify(token, keys=KEYS, device_id=OTHER_DEVICE, now=NOW).aud == OTHER_DEVICE


def test_not_yet_valid_with_leeway() -> None:
    token = sign_raw(arm_claims(iat=NOW + 100, nbf=NOW + 100, exp=NOW + 400, until=NOW + 500))
    assert refusal(token, now=NOW) is RefusalReason.NOT_YET_VALID
    assert refusal(token, now=NOW + 100 - tk.NBF_LEEWAY_S - 0.5) is RefusalReason.NOT_YET_VALID
    # Inside the small nbf leeway the fleet may be slightly ahead of the device.
    assert accepts(token, now=NOW + 100 - tk.NBF_LEEWAY_S).seq == 7
    assert accepts(token, now=NOW + 100).seq == 7


def test_expired_exactly_at_exp() -> None:
    token = sign_raw(arm_claims())  # exp = NOW + 1800
    assert accepts(token, now=NOW + 1800 - 0.001).cmd is CommandKind.ARM
    assert refusal(token, now=NOW + 1800) is RefusalReason.EXPIRED
    assert refusal(token, now=NOW + 1800.5) is RefusalReason.EXPIRED
    assert refusal(token, now=NOW + 10**6) is RefusalReason.EXPIRED


def test_refusal_precedence() -> None:
    """Cheaper and more fundamental checks win: a foreign expired token is foreign."""
    foreign_expired = sign_raw(arm_claims(aud=OTHER_DEVICE))
    assert refusal(foreign_expired, now=NOW + 10**6) is RefusalReason.WRONG_AUDIENCE
    rogue_bad_claims = sign_raw(arm_claims(extra=1), key=ROGUE, headers=header())
    assert refusal(rogue_bad_claims) is RefusalReason.BAD_SIGNATURE


# --- keys --------------------------------------------------------------------------------


def test_key_id_rfc8037_vector() -> None:
    x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    public = Ed25519PublicKey.from_public_bytes(unb64(x))
    assert key_id(public) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_key_id_of_rfc8037_private_key() -> None:
    # RFC 8037 A.1: the private key "d" whose public key is the vector above.
    d = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
    private = Ed25519PrivateKey.from_private_bytes(unb64(d))
    assert SigningKey.from_private(private).kid == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_keys_and_keyring() -> None:
    assert FLEET.kid != ROGUE.kid
    assert FLEET.kid == key_id(FLEET.public_key)
    ring = keyring(FLEET.public_key, ROGUE.public_key)
    assert set(ring) == {FLEET.kid, ROGUE.kid}
    loaded = load_public_key(FLEET.public_pem())
    assert key_id(loaded) == FLEET.kid
    # Rotation: a token from either pinned key verifies with the ring.
    token = sign_raw(arm_claims(), key=ROGUE, headers=header(kid=ROGUE.kid))
    assert verify(token, keys=ring, device_id=DEVICE, now=NOW).seq == 7


def test_load_public_key_refuses_other_key_types() -> None:
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(TokenError) as info:
        load_public_key(pem)
    assert info.value.reason is RefusalReason.UNKNOWN_KEY


def test_claims_constructors_refuse_bad_shapes() -> None:
    with pytest.raises(ValueError, match="deliverable after its window"):
        CommandClaims(
            iss=tk.ISSUER, aud=DEVICE, jti="a", seq=1, iat=NOW, nbf=NOW, exp=NOW + 10,
            cmd=CommandKind.ARM, until=NOW + 5,
        )  # fmt: skip
    with pytest.raises(ValueError, match="lifetime"):
        tk.disarm(DEVICE, seq=1, now=NOW, ttl_s=tk.MAX_LIFETIME_S + 1)
    with pytest.raises(ValueError, match="iat <= nbf < exp"):
        tk.arm(DEVICE, seq=1, now=NOW, until=NOW)
