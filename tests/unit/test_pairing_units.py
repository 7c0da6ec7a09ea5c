"""Pairing pieces without a broker: codes, ids, guessing limits, CSV, settings, the
device's identity store and its enrollment client against an in-memory fleet."""

from __future__ import annotations

import base64
import json
import re
import stat
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ValidationError

from broker.pki import init_pki, issue_server_cert, load_ca, sign_csr
from firmware_agent.camera import SimulatedCamera
from firmware_agent.config import load_config
from firmware_agent.enroll import Enroller, enroll_settings
from firmware_agent.errors import ConfigError, NotEnrolled
from firmware_agent.identity import IdentityStore, key_device_id, make_csr, new_key
from fleet.enrollment import GuessLimiter
from fleet.inventory import to_csv
from fleet.pairing_config import PairingSettings
from tillsyn_protocol.enrollment import (
    USER_CODE_ALPHABET,
    device_id_for_key,
    new_device_code,
    new_user_code,
    normalize_user_code,
)
from tillsyn_protocol.topics import DEVICE_ID_PATTERN

# --- codes and ids -----------------------------------------------------------------------


def test_user_codes_are_short_unambiguous_and_forgiving_to_type() -> None:
    for _ in range(200):
        code = new_user_code()
        assert re.fullmatch(r"[A-Z]{4}-[A-Z]{4}", code)
        assert not set(code.replace("-", "")) - set(USER_CODE_ALPHABET)
    assert not set("0O1IAEUY") & set(USER_CODE_ALPHABET)
    assert normalize_user_code("bcdf-ghjk") == "BCDFGHJK"
    assert normalize_user_code(" BCDF GHJK ") == "BCDFGHJK"
    for bad in ("BCDF-GHJ", "BCDF-GHJKL", "BCD0-GHJK", "ABCD-EFGH", "", "x" * 100):
        assert normalize_user_code(bad) is None, bad


def test_device_codes_are_secret_and_ids_come_from_the_key() -> None:
    assert len({new_device_code() for _ in range(100)}) == 100
    assert len(new_device_code()) >= 43  # 256 bits
    key = new_key()
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    device_id = device_id_for_key(der)
    assert re.fullmatch(DEVICE_ID_PATTERN, device_id)
    assert device_id == key_device_id(key) == device_id_for_key(der)
    assert device_id != key_device_id(new_key())


def test_guess_limiter_per_staff_and_global_with_a_sliding_window() -> None:
    now = [1000.0]
    limiter = GuessLimiter(per_staff=2, total=3, window_s=60, clock=lambda: now[0])
    assert limiter.blocked("a") is None
    limiter.wrong("a")
    limiter.wrong("a")
    assert limiter.blocked("a") == pytest.approx(60)
    assert limiter.blocked("b") is None
    limiter.wrong("b")
    assert limiter.blocked("b") == pytest.approx(60)  # the fleet-wide budget is spent
    now[0] += 61
    assert limiter.blocked("a") is None and limiter.blocked("b") is None


def test_csv_export_never_lets_a_spreadsheet_run_a_formula() -> None:
    text = to_csv([{"device_id": "dev-a1", "site": "=HYPERLINK(1)", "serial": "-1+1"}])
    lines = text.splitlines()
    assert lines[0].startswith("device_id,serial,kind,state,site")
    assert "'=HYPERLINK(1)" in lines[1] and "'-1+1" in lines[1]


def test_pairing_settings_refuse_an_enrollment_listener_without_a_ca() -> None:
    with pytest.raises(ValidationError, match="enroll_port needs pki_dir"):
        PairingSettings(enroll_port=8443)
    with pytest.raises(ValidationError, match="go together"):
        PairingSettings(pki_dir=Path("/tmp"), enroll_cert_file=Path("/tmp/x"))
    assert not PairingSettings().enabled


# --- PKI additions -----------------------------------------------------------------------


def test_short_lived_device_certificates_and_an_enrollment_server_certificate(
    tmp_path: Path,
) -> None:
    pki = init_pki(tmp_path / "pki")
    ca = load_ca(pki.directory)
    key = new_key()
    device_id = key_device_id(key)
    cert = sign_csr(ca, make_csr(key, device_id), device_id, lifetime=timedelta(minutes=2))
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(minutes=2) <= life <= timedelta(minutes=8)  # notBefore is back-dated
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"urn:tillsyn:device:{device_id}"
    ]
    server, server_key = issue_server_cert(pki.directory, "tillsyn-enroll", ["localhost"])
    again = issue_server_cert(pki.directory, "tillsyn-enroll", ["localhost"])
    assert again == (server, server_key)
    assert stat.S_IMODE(server_key.stat().st_mode) == 0o600
    loaded = x509.load_pem_x509_certificate(server.read_bytes())
    usage = loaded.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]


# --- the device side ---------------------------------------------------------------------


def _enroll_toml(tmp: Path, ca: Path) -> Path:
    path = tmp / "agent.toml"
    path.write_text(
        'state_dir = "state"\nheartbeat_interval_s = 5\n\n'
        f'[enroll]\nurl = "https://fleet.test"\nca_file = "{ca}"\nserial = "SN-UNIT-1"\n\n'
        "[broker]\nkeepalive_s = 10\n"
    )
    return path


class FakeFleet:
    """The enrollment endpoint in memory: pending, slow down, then a real certificate."""

    def __init__(self, pki_dir: Path) -> None:
        self.ca = load_ca(pki_dir)
        self.polls = 0
        self.device_id = ""
        self.csr = ""

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path == "/enroll/v1/device_authorization":
            csr = x509.load_pem_x509_csr(body["csr"].encode())
            self.csr = body["csr"]
            self.device_id = str(csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
            return httpx.Response(
                200,
                json={
                    "device_code": "secret-device-code",
                    "user_code": "BCDF-GHJK",
                    "verification_uri": "https://fleet.test/pair",
                    "expires_in": 600,
                    "interval": 1,
                    "device_id": self.device_id,
                },
            )
        assert body["device_code"] == "secret-device-code"
        self.polls += 1
        if self.polls == 1:
            return httpx.Response(400, json={"error": "authorization_pending"})
        if self.polls == 2:
            return httpx.Response(400, json={"error": "slow_down", "interval": 1})
        cert = sign_csr(self.ca, self.csr, self.device_id, lifetime=timedelta(hours=1))
        ca_pem = self.ca.cert.public_bytes(serialization.Encoding.PEM).decode()
        key_pem = _KEY_PEM
        return httpx.Response(
            200,
            json={
                "device_id": self.device_id,
                "certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
                "ca_chain": ca_pem,
                "broker_host": "mqtt.test",
                "broker_port": 8883,
                "command_keys": [key_pem],
                "renew_after": cert.not_valid_after_utc.timestamp() - 1200,
                "not_after": cert.not_valid_after_utc.timestamp(),
            },
        )


def _command_key_pem() -> str:
    from tillsyn_protocol import SigningKey

    return SigningKey.generate().public_pem().decode()


_KEY_PEM = _command_key_pem()


async def test_enrollment_client_shows_the_code_polls_and_stores_its_identity(
    tmp_path: Path,
) -> None:
    pki = init_pki(tmp_path / "pki")
    config_path = _enroll_toml(tmp_path, pki.ca_cert)
    with pytest.raises(NotEnrolled):
        load_config(config_path)
    settings = enroll_settings(
        {
            "state_dir": "state",
            "enroll": {"url": "https://fleet.test", "ca_file": str(pki.ca_cert), "serial": "S1"},
        },
        base_dir=tmp_path,
    )
    fleet = FakeFleet(pki.directory)
    display = SimulatedCamera()
    enroller = Enroller(settings, display=display, transport=httpx.MockTransport(fleet.handle))
    identity = await enroller.run()

    assert fleet.polls == 3
    assert display.pairing_codes == ["BCDF-GHJK", "paired"]
    assert identity.device_id == fleet.device_id == enroller.device_id
    store = IdentityStore(tmp_path / "state")
    key_file = store.key_path(1)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert not store.enroll_key_path.exists() and not store.enrollment_path.exists()
    config = load_config(config_path)
    assert config.device_id == identity.device_id
    assert (config.broker.host, config.broker.port, config.broker.keepalive_s) == (
        "mqtt.test",
        8883,
        10,
    )
    assert config.tls.cert_file == store.cert_path(1)
    assert config.command_keys == [store.command_key_path]


def test_identity_generations_switch_atomically_and_the_old_one_is_dropped_on_confirm(
    tmp_path: Path,
) -> None:
    pki = init_pki(tmp_path / "pki")
    ca = load_ca(pki.directory)
    store = IdentityStore(tmp_path / "state")
    key = store.enroll_key()
    device_id = key_device_id(key)
    assert store.enroll_key() is not None and key_device_id(store.enroll_key()) == device_id
    first = sign_csr(ca, make_csr(key, device_id), device_id)
    identity = store.enrolled(
        key=key,
        device_id=device_id,
        certificate=first.public_bytes(serialization.Encoding.PEM).decode(),
        command_keys=[_KEY_PEM],
        broker_host="mqtt.test",
        broker_port=8883,
        renew_after=1.0,
        not_after=2.0,
    )
    assert store.load() == identity and identity.confirmed
    next_key = store.pending_key(identity)
    assert key_device_id(store.pending_key(identity)) == key_device_id(next_key)
    second = sign_csr(ca, make_csr(next_key, device_id), device_id)
    pem = second.public_bytes(serialization.Encoding.PEM).decode()
    new = store.install(identity, pem, renew_after=3.0, not_after=4.0)
    assert (new.generation, new.previous, new.confirmed) == (2, 1, False)
    assert store.load() == new and store.key_path(1).exists()
    done = store.confirmed(new)
    assert done.previous is None and done.confirmed
    assert not store.key_path(1).exists() and not store.cert_path(1).exists()
    store.key_path(2).unlink()
    assert store.load() is None  # a generation without its key is no identity


def test_agent_signs_its_serial_and_csr_with_the_factory_key(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from firmware_agent.enroll import _factory_signature
    from tillsyn_protocol.enrollment import factory_proof_message

    pki = init_pki(tmp_path / "pki")
    factory_key = new_key()
    (tmp_path / "factory.key").write_bytes(
        factory_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "factory.crt").write_text("-----BEGIN CERTIFICATE-----\n...")
    settings = enroll_settings(
        {
            "state_dir": "state",
            "enroll": {
                "url": "https://fleet.test",
                "ca_file": str(pki.ca_cert),
                "serial": "SN-F1",
                "factory_cert_file": "factory.crt",
                "factory_key_file": "factory.key",
            },
        },
        base_dir=tmp_path,
    )
    key = new_key()
    csr = make_csr(key, key_device_id(key))
    proof = _factory_signature(settings, csr)
    assert proof is not None
    cert_text, sig = proof
    assert cert_text.startswith("-----BEGIN CERTIFICATE-----")
    raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    der = x509.load_pem_x509_csr(csr.encode()).public_bytes(serialization.Encoding.DER)
    factory_key.public_key().verify(
        raw, factory_proof_message("SN-F1", der), ec.ECDSA(hashes.SHA256())
    )
    with pytest.raises(ConfigError, match=r"enroll.url: must be an https:// URL"):
        enroll_settings(
            {
                "state_dir": "s",
                "enroll": {"url": "http://x.test", "ca_file": str(pki.ca_cert), "serial": "S"},
            },
            base_dir=tmp_path,
        )
