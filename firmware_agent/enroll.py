"""First boot: enroll at the fleet and get a certificate (RFC 8628 device flow).

1. Make (or reload) the enrollment key; the device id is derived from it
   (:func:`tillsyn_protocol.enrollment.device_id_for_key`), the CSR carries it as CN.
   The private key never leaves the device.
2. ``POST /enroll/v1/device_authorization`` over HTTPS, the server checked against the CA
   bundle the device ships with (``[enroll] ca_file``): serial, kind, firmware, CSR and,
   if configured, a factory proof. The answer is a device code (kept, 0600) and a user
   code to show.
3. Show the code: a log line, ``{state_dir}/identity/pairing.json`` for a local status
   page or label, and the driver's ``show_pairing_code`` hook (LED pattern, display).
4. Poll ``POST /enroll/v1/token`` at the interval; ``slow_down`` adds 5 s for good; an
   expired or refused code starts over with a new code; a network error backs off.
5. On success, check the certificate (our key, our id, our CA) and store the identity:
   the agent then runs normally (``load_config`` fills in the rest from it).

A reboot in the middle resumes with the same key and, while it is valid, the same code.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from tillsyn_protocol import DeviceKind
from tillsyn_protocol.enrollment import (
    DEVICE_CODE_GRANT,
    ENROLL_AUTHORIZE_PATH,
    ENROLL_TOKEN_PATH,
    DeviceAuthorization,
    DeviceCredentials,
    TokenError,
    factory_proof_message,
)

from . import __version__
from .config import CameraConfig, EnrollConfig, SimulatedCameraConfig, _config_error, _resolve
from .errors import ConfigError
from .identity import Identity, IdentityStore, check_delivered, key_device_id, make_csr
from .link import backoff_delay

__all__ = ["EnrollSettings", "Enroller", "PairingDisplay", "load_enroll_settings"]

log = logging.getLogger(__name__)

_DENIED_PAUSE_S = 10.0


class EnrollSettings(BaseModel):
    """The part of the agent config enrollment needs (the rest waits for the identity)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    state_dir: Path
    kind: DeviceKind = DeviceKind.CAMERA
    firmware_version: str = __version__
    enroll: EnrollConfig
    camera: CameraConfig = SimulatedCameraConfig()

    @field_validator("state_dir")
    @classmethod
    def _state(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve(value, info)


def load_enroll_settings(path: Path) -> EnrollSettings:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("config", f"cannot read {path}: {exc}") from None
    return enroll_settings(data, base_dir=path.resolve().parent)


def enroll_settings(data: Mapping[str, Any], *, base_dir: Path | None) -> EnrollSettings:
    try:
        return EnrollSettings.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise _config_error(exc) from None


class PairingDisplay(Protocol):
    """Optional driver hooks to show the code (LED pattern, screen) and the result."""

    async def show_pairing_code(self, user_code: str, verification_uri: str) -> None: ...

    async def pairing_done(self) -> None: ...


class _Retry(Exception):
    def __init__(self, why: str, *, rekey: bool = False) -> None:
        super().__init__(why)
        self.why = why
        self.rekey = rekey


def _factory_signature(settings: EnrollSettings, csr_pem: str) -> tuple[str, str] | None:
    e = settings.enroll
    if e.factory_cert_file is None or e.factory_key_file is None:
        return None
    key = serialization.load_pem_private_key(e.factory_key_file.read_bytes(), password=None)
    csr_der = _csr_der(csr_pem)
    message = factory_proof_message(e.serial, csr_der)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        sig = key.sign(message, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        sig = key.sign(message)
    else:
        raise ConfigError("enroll.factory_key_file", "must be an EC or Ed25519 key")
    encoded = base64.urlsafe_b64encode(sig).decode().rstrip("=")
    return e.factory_cert_file.read_text(), encoded


def _csr_der(csr_pem: str) -> bytes:
    from cryptography import x509

    return x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)


class Enroller:
    def __init__(
        self,
        settings: EnrollSettings,
        *,
        display: object | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.store = IdentityStore(settings.state_dir)
        self._display = display
        self._transport = transport
        self.user_code: str | None = None  # what is shown right now
        self.device_id: str | None = None

    def _ssl(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(cafile=str(self.settings.enroll.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("enroll.ca_file", f"cannot load CA: {exc}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    async def run(self) -> Identity:
        """Enroll until paired (or cancelled); returns the stored identity."""
        identity = self.store.load()
        if identity is not None:
            return identity
        e = self.settings.enroll
        async with httpx.AsyncClient(
            base_url=e.url,
            verify=self._ssl(),
            timeout=e.timeout_s,
            transport=self._transport,
            headers={"User-Agent": f"tillsyn-agent/{self.settings.firmware_version}"},
        ) as http:
            attempt = 0
            while True:
                try:
                    identity = await self._round(http)
                except _Retry as exc:
                    if exc.rekey:
                        self.store.discard_enroll_key()
                    delay = backoff_delay(attempt, 1.0, e.retry_max_s)
                    attempt += 1
                    log.warning("enrollment: %s; retrying in %.0f s", exc.why, delay)
                    await asyncio.sleep(delay)
                    continue
                if identity is not None:
                    return identity
                attempt = 0

    async def _round(self, http: httpx.AsyncClient) -> Identity | None:
        """One code's life: authorize (or resume), show, poll. None: start over."""
        key = self.store.enroll_key()
        device_id = key_device_id(key)
        self.device_id = device_id
        grant = self.store.enrollment()
        now = time.time()
        if grant is None or grant.get("device_id") != device_id or now >= grant["expires_at"]:
            grant = await self._authorize(http, key, device_id)
        await self._show(grant)
        result = await self._poll(http, grant)
        if isinstance(result, str):
            log.warning("pairing code %s: %s; getting a new one", grant["user_code"], result)
            self.store.forget_enrollment()
            if result == "denied":
                await asyncio.sleep(_DENIED_PAUSE_S)
            return None
        check_delivered(
            certificate=result.certificate,
            ca_chain=result.ca_chain,
            key=key,
            device_id=device_id,
            trusted_ca=self.settings.enroll.ca_file.read_bytes(),
        )
        if result.device_id != device_id:
            raise _Retry(f"the fleet answered for {result.device_id}", rekey=True)
        identity = self.store.enrolled(
            key=key,
            device_id=device_id,
            certificate=result.certificate,
            command_keys=result.command_keys,
            broker_host=result.broker_host,
            broker_port=result.broker_port,
            renew_after=result.renew_after,
            not_after=result.not_after,
        )
        self.user_code = None
        log.info("paired as %s; broker %s:%d", device_id, result.broker_host, result.broker_port)
        await self._hook("pairing_done")
        return identity

    async def _authorize(
        self, http: httpx.AsyncClient, key: ec.EllipticCurvePrivateKey, device_id: str
    ) -> dict[str, Any]:
        s = self.settings
        csr = make_csr(key, device_id)
        body: dict[str, Any] = {
            "serial": s.enroll.serial,
            "kind": s.kind.value,
            "fw": s.firmware_version,
            "csr": csr,
        }
        proof = _factory_signature(s, csr)
        if proof is not None:
            body["factory_cert"], body["factory_sig"] = proof
        try:
            resp = await http.post(ENROLL_AUTHORIZE_PATH, json=body)
        except httpx.HTTPError as exc:
            raise _Retry(f"cannot reach {s.enroll.url}: {type(exc).__name__}") from None
        if resp.status_code != 200:
            error, why = _error_of(resp)
            raise _Retry(f"refused ({error}): {why}", rekey=error == "key_already_paired")
        try:
            grant = DeviceAuthorization.model_validate_json(resp.content)
        except ValidationError:
            raise _Retry("the fleet sent a malformed authorization") from None
        if grant.device_id != device_id:
            raise _Retry(f"the fleet derived {grant.device_id}, not {device_id}")
        data = {
            "device_id": device_id,
            "device_code": grant.device_code,
            "user_code": grant.user_code,
            "verification_uri": grant.verification_uri,
            "verification_uri_complete": grant.verification_uri_complete,
            "interval": grant.interval,
            "expires_at": time.time() + grant.expires_in,
        }
        self.store.save_enrollment(data)
        return data

    async def _show(self, grant: dict[str, Any]) -> None:
        code, uri = grant["user_code"], grant["verification_uri"]
        self.user_code = code
        minutes = max(0, int(grant["expires_at"] - time.time())) // 60
        log.info(
            "PAIRING CODE %s: enter it at %s (serial %s, valid %d min)",
            code,
            uri,
            self.settings.enroll.serial,
            minutes,
        )
        self.store.show_pairing(
            {
                "user_code": code,
                "verification_uri": uri,
                "verification_uri_complete": grant.get("verification_uri_complete"),
                "expires_at": grant["expires_at"],
                "serial": self.settings.enroll.serial,
                "device_id": grant["device_id"],
            }
        )
        await self._hook("show_pairing_code", code, uri)

    async def _hook(self, name: str, *args: str) -> None:
        hook = getattr(self._display, name, None)
        if hook is None:
            return
        try:
            async with asyncio.timeout(10):
                await hook(*args)
        except Exception as exc:  # a display problem must not stop pairing
            log.warning("display hook %s failed: %s", name, type(exc).__name__)

    async def _poll(
        self, http: httpx.AsyncClient, grant: dict[str, Any]
    ) -> DeviceCredentials | str:
        interval = float(grant["interval"])
        failures = 0
        body = {"grant_type": DEVICE_CODE_GRANT, "device_code": grant["device_code"]}
        while True:
            await asyncio.sleep(interval)
            if time.time() >= grant["expires_at"]:
                return "expired"
            try:
                resp = await http.post(ENROLL_TOKEN_PATH, json=body)
            except httpx.HTTPError as exc:
                failures += 1
                wait = backoff_delay(failures, interval, self.settings.enroll.retry_max_s)
                log.warning("token poll failed (%s); waiting %.0f s", type(exc).__name__, wait)
                await asyncio.sleep(wait)
                continue
            failures = 0
            if resp.status_code == 200:
                try:
                    return DeviceCredentials.model_validate_json(resp.content)
                except ValidationError:
                    return "malformed credentials"
            try:
                error = TokenError.model_validate_json(resp.content)
            except ValidationError:
                continue
            match error.error:
                case "authorization_pending":
                    continue
                case "slow_down":
                    interval = float(error.interval or interval + 5)
                    log.info("polling slower: every %.0f s", interval)
                case "expired_token" | "invalid_grant":
                    return "expired"
                case "access_denied":
                    return "denied"
                case "invalid_request":
                    return "invalid request"


def _error_of(resp: httpx.Response) -> tuple[str, str]:
    try:
        data = resp.json()
    except ValueError:
        return f"http_{resp.status_code}", resp.text[:120]
    if isinstance(data, dict):
        return str(data.get("error", resp.status_code)), str(data.get("error_description", ""))
    return f"http_{resp.status_code}", ""
