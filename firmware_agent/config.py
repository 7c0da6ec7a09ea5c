"""Agent configuration: one TOML file, validated at start-up, failing with one clear line.

Example (see ``agent.example.toml``)::

    device_id = "dev-0a1b2c"
    state_dir = "/var/lib/tillsyn-agent"
    command_keys = ["/etc/tillsyn-agent/command-key.pem"]

    [broker]
    host = "mqtt.example.org"

    [tls]
    ca_file = "/etc/tillsyn-agent/ca.crt"
    cert_file = "/etc/tillsyn-agent/device.crt"
    key_file = "/etc/tillsyn-agent/device.key"

Relative paths are read relative to the directory of the config file. Every error is a
:class:`~firmware_agent.errors.ConfigError` whose message names the setting and why, e.g.
``broker.port: must be 1..65535`` or ``tls.cert_file: file not found: /etc/...``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from tillsyn_protocol import DeviceKind, is_device_id, keyring, load_public_key
from tillsyn_protocol.topics import DEVICE_ID_PATTERN

from . import __version__
from .errors import ConfigError

__all__ = [
    "AgentConfig",
    "BrokerConfig",
    "CameraConfig",
    "ClockConfig",
    "EnrollConfig",
    "ExecCameraConfig",
    "SimulatedCameraConfig",
    "TlsConfig",
    "load_config",
]

N = TypeVar("N", int, float)
_VERSION_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.+_-")
_UNION_TAGS = frozenset({"simulated", "exec"})


def _between(lo: float, hi: float) -> Callable[[N], N]:
    def check(value: N) -> N:
        if not lo <= value <= hi:
            raise ValueError(f"must be {lo:g}..{hi:g}")
        return value

    return check


def _resolve(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    path = value.expanduser()
    if not path.is_absolute() and isinstance(base, Path):
        path = base / path
    return path


def _existing_file(value: Path, info: ValidationInfo) -> Path:
    path = _resolve(value, info)
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"file not readable: {path}")
    return path


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(_Section):
    host: Annotated[str, Field(min_length=1, max_length=253)]
    port: Annotated[int, AfterValidator(_between(1, 65535))] = 8883
    keepalive_s: Annotated[int, AfterValidator(_between(5, 3600))] = 30
    # Kept by the broker while the device is away, so a queued QoS 1 command still arrives.
    session_expiry_s: Annotated[int, AfterValidator(_between(0, 2**32 - 1))] = 3600
    reconnect_min_s: Annotated[float, AfterValidator(_between(0.05, 3600))] = 1.0
    reconnect_max_s: Annotated[float, AfterValidator(_between(0.05, 3600))] = 60.0

    @field_validator("reconnect_max_s")
    @classmethod
    def _max_at_least_min(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("reconnect_min_s")
        if low is not None and value < low:
            raise ValueError(f"must be >= reconnect_min_s ({low:g})")
        return value


class TlsConfig(_Section):
    ca_file: Path
    cert_file: Path
    key_file: Path

    _files = field_validator("ca_file", "cert_file", "key_file")(_existing_file)


class EnrollConfig(_Section):
    """First boot without a certificate: enroll at the fleet (``firmware_agent/enroll.py``).

    With ``[enroll]``, ``device_id``, ``[tls]``, ``command_keys`` and the broker address
    come from the identity pairing stored in ``state_dir`` (``firmware_agent/identity.py``).
    """

    url: Annotated[str, Field(min_length=9, max_length=400)]
    # The CA bundle shipped with the device: checks the enrollment server and the broker.
    ca_file: Path
    serial: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    factory_cert_file: Path | None = None
    factory_key_file: Path | None = None
    timeout_s: Annotated[float, AfterValidator(_between(1, 120))] = 20.0
    retry_max_s: Annotated[float, AfterValidator(_between(1, 3600))] = 300.0

    _ca = field_validator("ca_file")(_existing_file)

    @field_validator("factory_cert_file", "factory_key_file")
    @classmethod
    def _factory(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _existing_file(value, info)

    @field_validator("url")
    @classmethod
    def _https(cls, value: str) -> str:
        if not value.startswith("https://"):
            raise ValueError("must be an https:// URL")
        return value.rstrip("/")


class SimulatedCameraConfig(_Section):
    type: Literal["simulated"] = "simulated"
    health_interval_s: Annotated[float, AfterValidator(_between(0.05, 3600))] = 5.0
    # kind = "video_phone": whether (and how fast) the simulated resident answers a call.
    answer_calls: bool = True
    answer_after_s: Annotated[float, AfterValidator(_between(0, 120))] = 0.2


class ExecCameraConfig(_Section):
    type: Literal["exec"]
    program: Path
    timeout_s: Annotated[float, AfterValidator(_between(0.1, 120))] = 5.0
    health_interval_s: Annotated[float, AfterValidator(_between(0.05, 3600))] = 5.0

    @field_validator("program")
    @classmethod
    def _executable(cls, value: Path, info: ValidationInfo) -> Path:
        path = _existing_file(value, info)
        if not os.access(path, os.X_OK):
            raise ValueError(f"not executable: {path}")
        return path


CameraConfig = Annotated[SimulatedCameraConfig | ExecCameraConfig, Field(discriminator="type")]


class ClockConfig(_Section):
    # Refuse commands (and re-lock) while the kernel reports the clock unsynchronised.
    require_ntp_sync: bool = False


class AgentConfig(_Section):
    device_id: str
    kind: DeviceKind = DeviceKind.CAMERA
    firmware_version: str = __version__
    broker: BrokerConfig
    tls: TlsConfig
    command_keys: Annotated[list[Path], Field(min_length=1, max_length=8)]
    state_dir: Path
    heartbeat_interval_s: Annotated[float, AfterValidator(_between(1, 3600))] = 30.0
    look_cap_s: Annotated[float, AfterValidator(_between(1, 600))] = 60.0
    camera: CameraConfig = SimulatedCameraConfig()
    clock: ClockConfig = ClockConfig()
    enroll: EnrollConfig | None = None

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        if not is_device_id(value):
            raise ValueError(f"must match {DEVICE_ID_PATTERN}")
        return value

    @field_validator("firmware_version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not 1 <= len(value) <= 32 or not set(value) <= _VERSION_CHARS:
            raise ValueError("must be 1-32 characters of A-Z a-z 0-9 . + _ -")
        return value

    @field_validator("command_keys")
    @classmethod
    def _keys(cls, value: list[Path], info: ValidationInfo) -> list[Path]:
        paths = []
        for i, raw in enumerate(value):
            path = _resolve(raw, info)
            try:
                load_public_key(path.read_bytes())
            except FileNotFoundError:
                raise ValueError(f"[{i}] file not found: {path}") from None
            except Exception:
                raise ValueError(f"[{i}] not an Ed25519 public key in PEM: {path}") from None
            paths.append(path)
        return paths

    @field_validator("state_dir")
    @classmethod
    def _state_dir(cls, value: Path, info: ValidationInfo) -> Path:
        path = _resolve(value, info)
        if path.exists() and not path.is_dir():
            raise ValueError(f"not a directory: {path}")
        return path

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, base_dir: Path | None = None) -> AgentConfig:
        """Validate a mapping (parsed TOML), translating errors into :class:`ConfigError`."""
        try:
            return cls.model_validate(data, context={"base_dir": base_dir})
        except ValidationError as exc:
            raise _config_error(exc) from None

    def command_keyring(self) -> dict[str, Ed25519PublicKey]:
        """The pinned command keys by key id. Re-read from disk, so errors stay typed."""
        keys = []
        for i, path in enumerate(self.command_keys):
            try:
                keys.append(load_public_key(path.read_bytes()))
            except Exception as exc:
                raise ConfigError(f"command_keys[{i}]", f"cannot load {path}: {exc}") from None
        return keyring(*keys)


def _config_error(exc: ValidationError) -> ConfigError:
    err = exc.errors(include_url=False, include_input=False)[0]
    parts = [str(p) for p in err["loc"] if p not in _UNION_TAGS]
    setting = ""
    for part in parts:
        setting += f"[{part}]" if part.isdigit() else (f".{part}" if setting else part)
    why = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "missing":
        why = "required"
    elif err["type"] == "extra_forbidden":
        why = "unknown setting"
    if why.startswith("[") and "]" in why:  # list item named by the validator itself
        index, _, why = why.partition(" ")
        setting += index
    return ConfigError(setting or "config", why)


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate the agent's TOML config file."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError("config", f"file not found: {file}") from None
    except OSError as exc:
        raise ConfigError("config", f"cannot read {file}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("config", f"invalid TOML in {file}: {exc}") from None
    base_dir = file.resolve().parent
    if isinstance(data.get("enroll"), dict):
        from .identity import with_identity

        data = with_identity(data, base_dir)
    return AgentConfig.from_mapping(data, base_dir=base_dir)
