"""Dev PKI: certificate profiles, key file modes, CRL, revocation, CSR signing, CLI."""

from __future__ import annotations

import ipaddress
import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from broker.cli import pki as pki_cli
from broker.errors import BrokerError, InvalidDeviceIdError, PkiError
from broker.pki import (
    FLEET_COMMON_NAME,
    PkiPaths,
    init_pki,
    is_valid_device_id,
    issue_device_cert,
    load_ca,
    load_certificate,
    make_foreign_ca,
    revoke,
    sign_csr,
)


@pytest.fixture
def pki(tmp_path: Path) -> PkiPaths:
    return init_pki(tmp_path / "pki")


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _crl(pki: PkiPaths) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(pki.crl.read_bytes())


def _csr(common_names: list[str], key: object | None = None) -> tuple[bytes, object]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in common_names])
    builder = x509.CertificateSigningRequestBuilder().subject_name(name)
    # Asking for CA rights must have no effect.
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(key, algorithm)  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM), key


# --------------------------------------------------------------------- layout


def test_init_creates_every_file(pki: PkiPaths) -> None:
    for path in (
        pki.ca_cert,
        pki.ca_key,
        pki.broker_cert,
        pki.broker_key,
        pki.fleet_cert,
        pki.fleet_key,
        pki.crl,
    ):
        assert path.is_file(), path


def test_private_keys_are_0600(pki: PkiPaths) -> None:
    cert, key = issue_device_cert(pki.directory, "dev-modes")
    for path in (pki.ca_key, pki.broker_key, pki.fleet_key, key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644


def test_keys_are_created_0600_not_chmodded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With umask 0 and chmod forbidden, keys can only be 0600 if created so."""

    def no_chmod(*args: object, **kwargs: object) -> None:
        raise AssertionError("chmod must not be used")

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    old = os.umask(0)
    try:
        paths = init_pki(tmp_path / "pki")
        _, key = issue_device_cert(paths.directory, "dev-umask")
    finally:
        os.umask(old)
    for path in (paths.ca_key, paths.broker_key, paths.fleet_key, key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_init_is_idempotent_and_keeps_the_ca(pki: PkiPaths) -> None:
    before = {p: p.read_bytes() for p in (pki.ca_cert, pki.ca_key, pki.broker_cert, pki.fleet_cert)}
    init_pki(pki.directory)
    after = {p: p.read_bytes() for p in before}
    assert before == after


def test_init_reissues_broker_cert_when_hosts_change(pki: PkiPaths) -> None:
    ca_before = pki.ca_cert.read_bytes()
    init_pki(pki.directory, broker_hosts=("mqtt.example.org", "10.0.0.5"))
    assert pki.ca_cert.read_bytes() == ca_before
    san = load_certificate(pki.broker_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == ["mqtt.example.org"]
    assert [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]


# --------------------------------------------------------------- certificates


def test_ca_profile(pki: PkiPaths) -> None:
    ca = load_certificate(pki.ca_cert)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = ca.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"


def test_server_cert_chains_to_ca_for_its_names(pki: PkiPaths) -> None:
    ca = load_certificate(pki.ca_cert)
    broker = load_certificate(pki.broker_cert)
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(name)
        chain = verifier.verify(broker, [])
        assert chain[-1] == ca
    wrong = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("evil.test"))
    with pytest.raises(VerificationError):
        wrong.verify(broker, [])
    assert _eku(broker) == {ExtendedKeyUsageOID.SERVER_AUTH}


@pytest.mark.parametrize("kind", ["fleet", "device"])
def test_client_certs_chain_to_ca(pki: PkiPaths, kind: str) -> None:
    if kind == "fleet":
        path, expected_cn = pki.fleet_cert, FLEET_COMMON_NAME
    else:
        path, _ = issue_device_cert(pki.directory, "dev-chain")
        expected_cn = "dev-chain"
    ca = load_certificate(pki.ca_cert)
    cert = load_certificate(path)
    verified = PolicyBuilder().store(Store([ca])).build_client_verifier().verify(cert, [])
    assert verified.chain[-1] == ca
    assert _cn(cert) == expected_cn
    assert _eku(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)


def test_client_cert_is_not_a_server_cert(pki: PkiPaths) -> None:
    ca = load_certificate(pki.ca_cert)
    verifier = PolicyBuilder().store(Store([ca])).build_client_verifier()
    with pytest.raises(VerificationError):
        verifier.verify(load_certificate(pki.broker_cert), [])


def test_foreign_ca_does_not_verify(pki: PkiPaths, tmp_path: Path) -> None:
    foreign = make_foreign_ca(tmp_path / "foreign")
    cert, _ = issue_device_cert(foreign.directory, "dev-foreign")
    ca = load_certificate(pki.ca_cert)
    assert load_certificate(foreign.ca_cert).subject == ca.subject  # same name, other key
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([ca])).build_client_verifier().verify(
            load_certificate(cert), []
        )


def test_device_cert_is_not_overwritten_without_asking(pki: PkiPaths) -> None:
    cert, _ = issue_device_cert(pki.directory, "dev-again")
    serial = load_certificate(cert).serial_number
    with pytest.raises(PkiError, match="already exists"):
        issue_device_cert(pki.directory, "dev-again")
    issue_device_cert(pki.directory, "dev-again", overwrite=True)
    assert load_certificate(cert).serial_number != serial


# ----------------------------------------------------------------- device ids


@pytest.mark.parametrize(
    "device_id",
    [
        FLEET_COMMON_NAME,
        "",
        "dev-",
        "dev-a",
        "dev--x",
        "DEV-abc",
        "dev-ABC",
        "dev-abc/cmd",
        "dev-+",
        "dev-ab#",
        "dev-ab+",
        "dev-ab\n",
        "dev-a b",
        "../dev-abc",
        "dev-" + "a" * 61,  # 65 characters: one too many
    ],
)
def test_bad_device_ids_are_refused(pki: PkiPaths, device_id: str) -> None:
    assert not is_valid_device_id(device_id)
    with pytest.raises(InvalidDeviceIdError) as info:
        issue_device_cert(pki.directory, device_id)
    assert "invalid device id" in str(info.value)
    assert isinstance(info.value, BrokerError)
    assert not any(pki.devices.iterdir())


@pytest.mark.parametrize("device_id", ["dev-ab", "dev-0-1", "dev-" + "a" * 60, "dev-a-"])
def test_good_device_ids(device_id: str) -> None:
    assert is_valid_device_id(device_id)


# ------------------------------------------------------------------------ CRL


def test_crl_is_valid_signed_and_empty(pki: PkiPaths) -> None:
    crl = _crl(pki)
    ca = load_certificate(pki.ca_cert)
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(ca_key)
    assert crl.issuer == ca.subject
    now = datetime.now(UTC)
    assert crl.last_update_utc <= now
    assert crl.next_update_utc is not None and crl.next_update_utc > now
    assert len(crl) == 0
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number >= 1


def test_revoke_by_path_adds_serial(pki: PkiPaths) -> None:
    cert_path, _ = issue_device_cert(pki.directory, "dev-revoke-me")
    keep_path, _ = issue_device_cert(pki.directory, "dev-keep-me")
    number_before = _crl(pki).extensions.get_extension_for_class(x509.CRLNumber).value
    serial = revoke(pki.directory, cert_path)
    assert serial == load_certificate(cert_path).serial_number
    crl = _crl(pki)
    ca_key = load_certificate(pki.ca_cert).public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(ca_key)
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    keep = load_certificate(keep_path).serial_number
    assert crl.get_revoked_certificate_by_serial_number(keep) is None
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value
    assert number.crl_number > number_before.crl_number
    state = json.loads(pki.revoked.read_text())
    assert [int(e["serial"], 16) for e in state["revoked"]] == [serial]


def test_revoke_is_idempotent_and_accepts_a_serial(pki: PkiPaths) -> None:
    cert_path, _ = issue_device_cert(pki.directory, "dev-twice")
    serial = load_certificate(cert_path).serial_number
    revoke(pki.directory, serial)
    revoke(pki.directory, cert_path)
    assert len(_crl(pki)) == 1
    assert len(json.loads(pki.revoked.read_text())["revoked"]) == 1


def test_revoke_refuses_foreign_cert(pki: PkiPaths, tmp_path: Path) -> None:
    foreign = make_foreign_ca(tmp_path / "foreign")
    cert, _ = issue_device_cert(foreign.directory, "dev-foreign")
    with pytest.raises(PkiError, match="not issued by this CA"):
        revoke(pki.directory, cert)


def test_revocations_survive_crl_refresh(tmp_path: Path) -> None:
    paths = init_pki(tmp_path / "pki", crl_days=1)
    cert, _ = issue_device_cert(paths.directory, "dev-persist")
    serial = revoke(paths.directory, cert, crl_days=1)
    number = _crl(paths).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    init_pki(paths.directory)  # CRL is near expiry: re-signed from revoked.json
    crl = _crl(paths)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > number
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None


# ------------------------------------------------------------------------ CSR


def test_sign_csr_issues_a_device_client_cert(pki: PkiPaths) -> None:
    csr_pem, key = _csr(["dev-paired"])
    ca = load_ca(pki.directory)
    cert = sign_csr(ca, csr_pem, "dev-paired")
    assert _cn(cert) == "dev-paired"
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert cert.public_key() == key.public_key()
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _eku(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    PolicyBuilder().store(Store([ca.cert])).build_client_verifier().verify(cert, [])


def test_sign_csr_accepts_ed25519_and_str(pki: PkiPaths) -> None:
    csr_pem, _ = _csr(["dev-edkey"], ed25519.Ed25519PrivateKey.generate())
    cert = sign_csr(load_ca(pki.directory), csr_pem.decode(), "dev-edkey", days=30)
    assert _cn(cert) == "dev-edkey"


@pytest.mark.parametrize(
    ("cns", "device_id"),
    [
        (["dev-other"], "dev-mine"),
        (["tillsyn-fleet"], "dev-mine"),
        (["dev-mine", "dev-mine"], "dev-mine"),
        ([], "dev-mine"),
    ],
)
def test_sign_csr_refuses_mismatched_cn(pki: PkiPaths, cns: list[str], device_id: str) -> None:
    csr_pem, _ = _csr(cns)
    with pytest.raises(PkiError, match="does not match"):
        sign_csr(load_ca(pki.directory), csr_pem, device_id)


def test_sign_csr_refuses_invalid_device_id(pki: PkiPaths) -> None:
    csr_pem, _ = _csr([FLEET_COMMON_NAME])
    with pytest.raises(InvalidDeviceIdError):
        sign_csr(load_ca(pki.directory), csr_pem, FLEET_COMMON_NAME)


def test_sign_csr_refuses_bad_signature(pki: PkiPaths) -> None:
    csr_pem, _ = _csr(["dev-tampered"])
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature value
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(PkiError, match="signature"):
        sign_csr(load_ca(pki.directory), tampered, "dev-tampered")


def test_sign_csr_refuses_weak_key_and_garbage(pki: PkiPaths) -> None:
    ca = load_ca(pki.directory)
    csr_pem, _ = _csr(["dev-weak"], rsa.generate_private_key(65537, 1024))
    with pytest.raises(PkiError, match="too small"):
        sign_csr(ca, csr_pem, "dev-weak")
    with pytest.raises(PkiError, match="PEM"):
        sign_csr(ca, b"not a csr", "dev-weak")


# ---------------------------------------------------------------------- errors


def test_load_ca_errors(tmp_path: Path, pki: PkiPaths) -> None:
    with pytest.raises(PkiError, match="not found"):
        load_ca(tmp_path / "nothing-here")
    other = init_pki(tmp_path / "other")
    pki.ca_key.write_bytes(other.ca_key.read_bytes())
    with pytest.raises(PkiError, match="does not match"):
        load_ca(pki.directory)


# ------------------------------------------------------------------------- CLI


def test_cli_init_device_revoke(tmp_path: Path) -> None:
    runner = CliRunner()
    d = str(tmp_path / "pki")
    assert runner.invoke(pki_cli, ["init", "--dir", d]).exit_code == 0
    result = runner.invoke(pki_cli, ["device", "dev-cli", "--dir", d])
    assert result.exit_code == 0, result.output
    result = runner.invoke(pki_cli, ["revoke", "dev-cli", "--dir", d])
    assert result.exit_code == 0, result.output
    assert "revoked serial 0x" in result.output
    serial = int(result.output.split("revoked serial ")[1].split(";")[0], 16)
    assert (
        x509.load_pem_x509_crl((tmp_path / "pki" / "crl.pem").read_bytes())[0].serial_number
        == serial
    )


@pytest.mark.parametrize(
    "args",
    [
        ["device", "tillsyn-fleet"],
        ["device", "dev-x/../../etc"],
        ["revoke", "not-a-thing"],
        ["revoke", "dev-never-issued"],
    ],
)
def test_cli_errors_are_one_line(tmp_path: Path, args: list[str]) -> None:
    d = str(tmp_path / "pki")
    runner = CliRunner()
    assert runner.invoke(pki_cli, ["init", "--dir", d]).exit_code == 0
    result = runner.invoke(pki_cli, [*args, "--dir", d])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, BrokerError)  # translated to ClickException


def test_cli_device_without_pki(tmp_path: Path) -> None:
    result = CliRunner().invoke(pki_cli, ["device", "dev-nopki", "--dir", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "file not found" in result.stderr
