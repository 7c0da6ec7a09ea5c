"""Every refusal of pairing: each answered with a clear message and an audit entry.

These drive the real HTTPS enrollment endpoint and the staff API of a running fleet
(no agent process is needed until a device must connect).
"""

from __future__ import annotations

import base64
import json
import ssl
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from sqlmodel import select

from broker.pki import init_pki, load_ca
from fleet.auth import Role
from fleet.inventory import Enrollment
from tests.integration.pairing_support import PairingEnv, run_pairing_env
from tillsyn_protocol.enrollment import (
    DEVICE_CODE_GRANT,
    ENROLL_AUTHORIZE_PATH,
    ENROLL_TOKEN_PATH,
    device_id_for_key,
    factory_proof_message,
)

pytestmark = pytest.mark.integration


def _csr(key: Any, cn: str) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _own_id(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return device_id_for_key(der)


class Device:
    """A device that speaks the enrollment protocol by hand."""

    def __init__(self, env: PairingEnv, serial: str) -> None:
        self.env = env
        self.serial = serial
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.grant: dict[str, Any] = {}

    def _client(self) -> httpx.AsyncClient:
        ctx = ssl.create_default_context(cafile=str(self.env.h.pki.ca_cert))
        return httpx.AsyncClient(base_url=self.env.enroll_url, verify=ctx, timeout=10)

    async def authorize(self, csr: str | None = None) -> httpx.Response:
        body = {"serial": self.serial, "kind": "camera", "fw": "1.0.0"}
        body["csr"] = csr or _csr(self.key, _own_id(self.key))
        async with self._client() as client:
            resp = await client.post(ENROLL_AUTHORIZE_PATH, json=body)
        if resp.status_code == 200:
            self.grant = resp.json()
        return resp

    async def authorize_with(self, csr: str, **extra: str) -> httpx.Response:
        body = {"serial": self.serial, "kind": "camera", "fw": "1.0.0", "csr": csr, **extra}
        async with self._client() as client:
            return await client.post(ENROLL_AUTHORIZE_PATH, json=body)

    async def poll(self) -> httpx.Response:
        body = {"grant_type": DEVICE_CODE_GRANT, "device_code": self.grant["device_code"]}
        async with self._client() as client:
            return await client.post(ENROLL_TOKEN_PATH, json=body)

    @property
    def code(self) -> str:
        return str(self.grant["user_code"])


async def _refusals(env: PairingEnv, reason: str) -> list[dict[str, Any]]:
    rows = await env.audits("pairing.refused") + await env.audits("enroll.refused")
    found = [json.loads(r.detail) | {"actor": r.actor} for r in rows]
    return [f for f in found if f.get("reason") == reason]


async def _pair(env: PairingEnv, token: str, code: str, **body: Any) -> httpx.Response:
    payload = {"code": code, "resident_id": "res-refuse-1", **body}
    return await env.call("POST", "/api/pairing", token=token, json=payload)


@pytest.fixture
async def env(make_harness, tmp_path: Path, pki_dir, mosquitto):
    async with run_pairing_env(
        make_harness,
        tmp_path,
        pki_dir,
        mosquitto,
        guess_limit_per_staff=3,
        guess_limit_global=5,
        commissioning_connect_s=5,
    ) as pairing_env:
        yield pairing_env


async def test_device_poll_answers_follow_rfc_8628(env: PairingEnv) -> None:
    device = Device(env, "SN-POLL-1")
    resp = await device.authorize()
    assert resp.status_code == 200, resp.text
    grant = resp.json()
    assert grant["device_id"] == _own_id(device.key)
    assert grant["interval"] == 1 and grant["expires_in"] == 300
    assert grant["verification_uri_complete"].endswith(f"?code={grant['user_code']}")
    assert resp.headers["cache-control"] == "no-store"
    first = await device.poll()
    assert (first.status_code, first.json()["error"]) == (400, "authorization_pending")
    second = await device.poll()  # at once: faster than the interval
    assert second.json() == {"error": "slow_down", "interval": 6}
    device.grant["device_code"] = "not-a-code"
    assert (await device.poll()).json()["error"] == "invalid_grant"


async def test_technician_refuses_the_device_and_it_is_told_access_denied(
    env: PairingEnv,
) -> None:
    tech = await env.token("tech-deny")
    device = Device(env, "SN-DENY-1")
    await device.authorize()
    resp = await env.call("POST", "/api/pairing/deny", token=tech, json={"code": device.code})
    assert resp.status_code == 200, resp.text
    assert (await device.poll()).json()["error"] == "access_denied"
    again = await _pair(env, tech, device.code)
    assert again.status_code == 409 and "refused" in again.json()["detail"]


async def test_expired_code_is_refused_to_the_technician_and_the_device(env: PairingEnv) -> None:
    tech = await env.token("tech-expired")
    device = Device(env, "SN-EXPIRED-1")
    await device.authorize()

    def expire(session: Any) -> None:
        row = session.exec(select(Enrollment).where(Enrollment.serial == "SN-EXPIRED-1")).one()
        row.expires_at = time.time() - 1
        session.add(row)

    await env.db(expire)
    resp = await _pair(env, tech, device.code)
    assert resp.status_code == 410
    assert resp.json()["detail"].startswith("this code has expired")
    assert (await device.poll()).json()["error"] == "expired_token"
    [entry] = await _refusals(env, "code_expired")
    assert entry["actor"] == "tech-expired"


async def test_code_used_twice_is_refused(env: PairingEnv) -> None:
    tech = await env.token("tech-twice")
    device = Device(env, "SN-TWICE-1")
    await device.authorize()
    first = await _pair(env, tech, device.code, serial="SN-TWICE-1")
    assert first.status_code == 201, first.text
    second = await _pair(env, tech, device.code.lower().replace("-", " "), serial="SN-TWICE-1")
    assert second.status_code == 409
    assert "already used" in second.json()["detail"]
    assert len(await _refusals(env, "code_used")) == 1
    # The device picks up its credentials (and may again, if the answer was lost).
    creds = await device.poll()
    assert creds.status_code == 200 and creds.json()["device_id"] == _own_id(device.key)
    assert (await device.poll()).status_code in (200, 400)  # 400 only as slow_down


async def test_wrong_codes_are_refused_and_guessing_is_rate_limited(env: PairingEnv) -> None:
    guesser = await env.token("tech-guesser")
    other = await env.token("tech-other")
    device = Device(env, "SN-GUESS-1")
    await device.authorize()
    wrong = "BBBB-BBBB" if device.code != "BBBB-BBBB" else "CCCC-CCCC"
    for _ in range(3):
        resp = await env.call("POST", "/api/pairing/lookup", token=guesser, json={"code": wrong})
        assert resp.status_code == 404
        assert resp.json()["detail"] == "no device is waiting with this code"
    # Per technician: the fourth try is refused even with the right code.
    limited = await _pair(env, guesser, device.code)
    assert limited.status_code == 429 and "too many wrong codes" in limited.json()["detail"]
    # Globally: two more wrong guesses by someone else exhaust the fleet-wide budget.
    for _ in range(2):
        resp = await _pair(env, other, "not a code")
        assert resp.status_code == 404
    blocked = await _pair(env, other, device.code)
    assert blocked.status_code == 429
    assert len(await _refusals(env, "wrong_code")) == 5
    assert len(await _refusals(env, "rate_limited")) == 2


async def test_serial_already_live_elsewhere_is_refused(env: PairingEnv) -> None:
    tech = await env.token("tech-serial")
    first = Device(env, "SN-DUP-1")
    await first.authorize()
    assert (await _pair(env, tech, first.code, serial="SN-DUP-1")).status_code == 201
    clone = Device(env, "SN-DUP-1")  # same hardware serial, another key
    await clone.authorize()
    resp = await _pair(env, tech, clone.code, serial="SN-DUP-1")
    assert resp.status_code == 409
    assert resp.json()["detail"].startswith("serial SN-DUP-1 is already in service as dev-")
    assert len(await _refusals(env, "serial_live")) == 1


async def test_serial_that_does_not_match_the_label_is_refused(env: PairingEnv) -> None:
    tech = await env.token("tech-label")
    device = Device(env, "SN-LABEL-1")
    await device.authorize()
    resp = await _pair(env, tech, device.code, serial="SN-LABEL-2")
    assert resp.status_code == 409
    assert resp.json()["detail"] == (
        "the device with this code reports serial SN-LABEL-1, not SN-LABEL-2"
    )
    assert len(await _refusals(env, "serial_mismatch")) == 1


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("subject", "csr_subject_mismatch"),
        ("extra_subject", "csr_subject_mismatch"),
        ("signature", "csr_key_mismatch"),
        ("rsa", "csr_key_type"),
    ],
)
async def test_csr_whose_subject_or_key_does_not_match_is_refused(
    env: PairingEnv, case: str, reason: str
) -> None:
    device = Device(env, f"SN-CSR-{case}")
    key = device.key
    match case:
        case "subject":
            csr = _csr(key, "dev-chosen-by-me")
        case "extra_subject":
            name = x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, _own_id(key)),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tillsyn Fleet"),
                ]
            )
            built = x509.CertificateSigningRequestBuilder().subject_name(name)
            csr = built.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
        case "signature":
            # Carries our key but is signed by another one: no proof of possession.
            good = x509.load_pem_x509_csr(_csr(key, _own_id(key)).encode())
            der = bytearray(good.public_bytes(serialization.Encoding.DER))
            der[-5] ^= 0x55
            csr = (
                x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()
            )
        case "rsa":
            rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            der = rsa_key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            csr = _csr(rsa_key, device_id_for_key(der))
    resp = await device.authorize(csr)
    assert resp.status_code == 400
    assert resp.json()["error"] == reason
    assert resp.json()["error_description"]
    entries = await _refusals(env, reason)
    assert any(e["actor"] == "enroll" for e in entries)


async def test_staff_without_the_technician_role_cannot_pair(env: PairingEnv) -> None:
    nurse = await env.token("nurse-1", Role.NIGHT_STAFF)
    admin = await env.token("admin-1", Role.IT_ADMIN)
    device = Device(env, "SN-ROLE-1")
    await device.authorize()
    for token in (nurse, admin):
        resp = await _pair(env, token, device.code)
        assert resp.status_code == 403
        assert resp.json()["detail"] == "requires role technician"
    anonymous = await _pair(env, "", device.code)
    assert anonymous.status_code == 401
    actors = sorted(e["actor"] for e in await _refusals(env, "role"))
    assert actors == ["admin-1", "nurse-1"]
    # The code is still good for a technician.
    tech = await env.token("tech-role")
    assert (await _pair(env, tech, device.code, serial="SN-ROLE-1")).status_code == 201


def _factory_cert(factory_dir: Path, serial: str) -> tuple[str, ec.EllipticCurvePrivateKey]:
    """A manufacturer certificate for ``serial`` (CN), from the factory CA in factory_dir."""
    ca = load_ca(factory_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, serial)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365))
        .sign(ca.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key


def _proof(key: ec.EllipticCurvePrivateKey, serial: str, csr_pem: str) -> str:
    csr_der = x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    sig = key.sign(factory_proof_message(serial, csr_der), ec.ECDSA(hashes.SHA256()))
    return base64.urlsafe_b64encode(sig).decode().rstrip("=")


async def test_factory_identity_is_required_when_configured(
    make_harness, tmp_path: Path, pki_dir, mosquitto
) -> None:
    factory = init_pki(tmp_path / "factory")
    async with run_pairing_env(
        make_harness, tmp_path, pki_dir, mosquitto, factory_ca_file=factory.ca_cert
    ) as env:
        device = Device(env, "SN-FACTORY-1")
        csr = _csr(device.key, _own_id(device.key))
        missing = await device.authorize(csr)
        assert (missing.status_code, missing.json()["error"]) == (400, "factory_proof_missing")

        cert_pem, factory_key = _factory_cert(factory.directory, "SN-FACTORY-1")
        other_pem, other_key = _factory_cert(factory.directory, "SN-SOMEONE-ELSE")
        foreign = init_pki(tmp_path / "counterfeit")
        fake_pem, fake_key = _factory_cert(foreign.directory, "SN-FACTORY-1")
        cases = [
            (other_pem, _proof(other_key, "SN-FACTORY-1", csr), "factory_serial_mismatch"),
            (fake_pem, _proof(fake_key, "SN-FACTORY-1", csr), "factory_proof_invalid"),
            (cert_pem, _proof(factory_key, "SN-FACTORY-2", csr), "factory_proof_invalid"),
        ]
        for pem, sig, reason in cases:
            resp = await device.authorize_with(csr, factory_cert=pem, factory_sig=sig)
            assert (resp.status_code, resp.json()["error"]) == (400, reason)
            assert await _refusals(env, reason)
        good = await device.authorize_with(
            csr, factory_cert=cert_pem, factory_sig=_proof(factory_key, "SN-FACTORY-1", csr)
        )
        assert good.status_code == 200, good.text
